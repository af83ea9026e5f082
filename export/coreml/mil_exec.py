"""Run a saved `.mlpackage` on Linux: its MIL program, rebuilt from the package, evaluated op by op in numpy.

Core ML's runtime exists only on Apple platforms, so this is how the exporter's parity gate and the tests check what
was *written* (not the in-memory program before saving). The program is rebuilt with coremltools' milproto loader;
each op runs through a numpy implementation (`mil_ops.py`), or through the op's own `value_inference()` for the ops we have
none for. Our own implementations cover the ops value inference lacks (`scaled_dot_product_attention`, `silu`,
`layer_norm`, state reads/writes, `slice_update`, the `constexpr_*` dequantizers) and those where coremltools 9.0's
is wrong (`concat` with interleave, `cumsum` exclusive, `reduce_*` with array axes).

Precision: every op computes in float32 and rounds its result to the dtype the program declares (fp16 in an fp16
program): the rounding a Core ML backend does at op boundaries, without the cost of numpy's slow fp16 arithmetic.
Weights stay in their declared dtype between uses (the 0.5B's in fp16: 1 GB, not 2).
The API mirrors `coremltools.models.MLModel`: `make_state()`, then `predict(inputs, state)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen2_ref.errors import Qwen2Error

from .mil_ops import _IMPLS, _constexpr


def load_program(package: Path):
    """The MIL program of a saved package (weights read from its weight file)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    package = Path(package)
    if not (package / "Manifest.json").exists():
        raise Qwen2Error(f"{package}: not an .mlpackage (no Manifest.json)")
    spec = ct.utils.load_spec(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise Qwen2Error(f"{package}: not an ML Program")
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return milproto_load(spec, spec.specificationVersion, str(weights)), spec


class MILModel:
    """One function of a saved package, executable with numpy."""

    def __init__(self, package: Path | str, function: str = "main"):
        self.program, self.spec = load_program(Path(package))
        if function not in self.program.functions:
            raise Qwen2Error(f"{package}: no function {function!r} (has {', '.join(self.program.functions)})")
        self.func = self.program.functions[function]
        self._consts: dict[str, np.ndarray] = {}  # const and dequantized constexpr values, computed once
        self._states = {n: v for n, v in self.func.inputs.items() if _is_state(v)}
        self._order = {id(op): i for i, op in enumerate(self.func.operations)}

    # ---- MLModel-like API ---------------------------------------------------------------------------------
    def make_state(self) -> dict[str, np.ndarray]:
        return {n: np.zeros(v.sym_type.wrapped_type().get_shape(), dtype=_np_dtype(v)) for n, v in self._states.items()}

    def predict(self, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {}
        for name, var in self.func.inputs.items():
            if name in self._states:
                if state is None:
                    raise Qwen2Error(f"the model has state {name!r}: pass state=model.make_state()")
                env[name] = state[name]
            elif name not in inputs:
                raise Qwen2Error(f"missing input {name!r}")
            else:
                env[name] = np.asarray(inputs[name]).astype(_np_dtype(var))
        self._state = state
        for op in self.func.operations:
            self._run(op, env)
        return {v.name: env[v.name].astype(np.float32) if env[v.name].dtype == np.float16 else env[v.name]
                for v in self.func.outputs}

    def dequantized_weights(self) -> dict[str, np.ndarray]:
        """Every compressed weight (the last `constexpr_*` op of a chain) dequantized to float32, by output name."""
        out = {}
        for op in self.func.operations:
            if op.op_type.startswith("constexpr_") and not all(
                    c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops):
                out[op.outputs[0].name] = _constexpr(op, self._const_input)
        return out

    # ---- op by op ---------------------------------------------------------------------------------------------
    def _run(self, op, env: dict) -> None:
        out = op.outputs
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            name = out[0].name
            if name not in self._consts:
                # Weights kept in their declared dtype (fp16: half the memory of float32; a dequantized constexpr
                # is rounded to it already); ops convert them to float32 where they use them (`_f`), since
                # numpy's fp16 matmul is slow.
                self._consts[name] = out[0].val if op.op_type == "const" else _constexpr(op, self._const_input)
            env[name] = self._consts[name]
            return
        impl = _IMPLS.get(op.op_type)
        if impl is not None:
            result = impl(op, lambda p: self._input(op, p, env), self)
        else:
            result = self._value_inference(op, env)
        results = result if isinstance(result, tuple) else (result,)
        for var, val in zip(out, results):
            env[var.name] = _as_dtype(val, var)

    def _const_input(self, op, param: str):
        var = op.inputs.get(param)
        if var is None:
            return None
        if var.op is not None and var.op.op_type.startswith("constexpr_"):
            return _constexpr(var.op, self._const_input)
        return var.val

    def _input(self, op, param: str, env: dict):
        var = op.inputs.get(param)
        if var is None:
            return None
        if isinstance(var, (list, tuple)):
            return [self._value(v, env) for v in var]
        return self._value(var, env)

    @staticmethod
    def _value(var, env: dict):
        if var.name in env:
            return env[var.name]
        if var.val is not None:  # an inline constant (attribute)
            return var.val
        raise Qwen2Error(f"MIL executor: no value for {var.name!r}")

    def _value_inference(self, op, env: dict):
        """coremltools' own op semantics, with the inputs' values attached for the call."""
        from coremltools.converters.mil.mil.types.type_mapping import numpy_val_to_builtin_val

        saved = []
        for v in _flat_inputs(op):
            if v.name in env and v.val is None:
                saved.append((v, v._sym_val))
                val = env[v.name]
                v._sym_val = numpy_val_to_builtin_val(val if isinstance(val, np.ndarray) else np.array(val))[0]
        try:
            result = op.value_inference()
        except Exception as e:  # noqa: BLE001 - reported with the op's name
            raise Qwen2Error(f"MIL executor: op {op.op_type} ({op.name}) has no numpy implementation and its value "
                             f"inference failed: {e}") from None
        finally:
            for v, s in saved:
                v._sym_val = s
        return result


# ---- helpers ------------------------------------------------------------------------------------------------------
def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def _np_dtype(var):
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(var.dtype)


def _as_dtype(val, var):
    """Round a float32 result to the declared dtype (fp16 programs round at every op boundary)."""
    try:
        dt = _np_dtype(var)
    except Exception:  # noqa: BLE001 - lists / strings keep their value
        return val
    arr = np.asarray(val)
    return arr.astype(dt) if arr.dtype != dt else arr


def _flat_inputs(op):
    for v in op.inputs.values():
        yield from (v if isinstance(v, (list, tuple)) else (v,))
