"""Run a saved `.mlpackage` on Linux: its MIL program, rebuilt from the package, evaluated op by op in numpy.

Core ML's runtime exists only on Apple platforms, so this is how the exporter's parity gate and the tests check what
was *written* (not the in-memory program before saving). The program is rebuilt with coremltools' milproto loader;
each op runs through a numpy implementation below, or through the op's own `value_inference()` for the ops we have
none for. Our own implementations cover the ops value inference lacks (`scaled_dot_product_attention`, `silu`,
`layer_norm`, state reads/writes, `slice_update`, the `constexpr_*` dequantizers) and those where coremltools 9.0's
is wrong (`concat` with interleave, `cumsum` exclusive, `reduce_*` with array axes).

Precision: every op computes in float32 and rounds its result to the dtype the program declares (fp16 in an fp16
program): the rounding a Core ML backend does at op boundaries, without the cost of numpy's slow fp16 arithmetic.
The API mirrors `coremltools.models.MLModel`: `make_state()`, then `predict(inputs, state)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from qwen2_ref.errors import Qwen2Error

_F32 = np.float32


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
                # Weights kept in float32: exact for fp16 values, and numpy's fp16 matmul is slow.
                val = out[0].val if op.op_type == "const" else _constexpr(op, self._const_input)
                self._consts[name] = val.astype(_F32) if isinstance(val, np.ndarray) and val.dtype == np.float16 \
                    else val
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


def _f(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(_F32) if x.dtype in (np.float16, np.float64) else x


def _blocks(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast per-block parameters `a` up to `shape` (block size along each axis = shape / a.shape)."""
    for axis, (n, m) in enumerate(zip(shape, a.shape)):
        if n != m:
            a = np.repeat(a, n // m, axis=axis)
    return a


def _constexpr(op, const: Callable) -> np.ndarray:
    """Dequantize a compile-time op into float32 (iOS 16 and iOS 18 forms)."""
    t = op.op_type
    if t == "constexpr_blockwise_shift_scale":
        data = _f(const(op, "data")).astype(_F32)
        scale, offset = _f(const(op, "scale")), const(op, "offset")
        if offset is not None:
            data = data - _blocks(_f(offset).astype(_F32), data.shape)
        return data * _blocks(scale, data.shape)
    if t == "constexpr_lut_to_dense":
        idx, lut = np.asarray(const(op, "indices")).astype(np.int64), _f(const(op, "lut"))
        vec = lut.shape[-1]
        if vec != 1:
            raise Qwen2Error(f"MIL executor: vector palettization (vector_size {vec}) is not supported")
        lut = lut[..., 0]  # (*groups, n_entries)
        groups = _blocks(np.arange(int(np.prod(lut.shape[:-1]))).reshape(lut.shape[:-1]), idx.shape)
        return lut.reshape(-1, lut.shape[-1])[groups, idx]
    if t == "constexpr_affine_dequantize":
        q = _f(const(op, "quantized_data")).astype(_F32)
        axis = int(op.axis.val)
        shape = [1] * q.ndim
        shape[axis] = -1
        zp = _f(const(op, "zero_point")).astype(_F32)
        sc = _f(const(op, "scale"))
        return (q - (zp.reshape(shape) if zp.ndim else zp)) * (sc.reshape(shape) if sc.ndim else sc)
    if t == "constexpr_cast":
        return _f(const(op, "source_val"))
    raise Qwen2Error(f"MIL executor: compile-time op {t} is not supported")


# ---- numpy implementations ------------------------------------------------------------------------------------
def _axes(a, rank: int) -> tuple[int, ...]:
    a = np.atleast_1d(np.asarray(a)).astype(int)
    return tuple(int(x) % rank for x in a)


def _binary(fn):
    return lambda op, x, m: fn(_f(x("x")), _f(x("y")))


def _slice_bounds(op, x, shape):
    """Python slices from MIL's begin/end/stride and masks."""
    rank = len(shape)
    begin = np.asarray(x("begin")).astype(int)
    end = np.asarray(x("end")).astype(int)
    stride = np.asarray(x("stride")).astype(int) if op.inputs.get("stride") is not None else np.ones(rank, int)
    bm = x("begin_mask") if op.inputs.get("begin_mask") is not None else [False] * rank
    em = x("end_mask") if op.inputs.get("end_mask") is not None else [False] * rank
    sm = x("squeeze_mask") if op.inputs.get("squeeze_mask") is not None else [False] * rank
    out = []
    for i in range(rank):
        if sm[i]:
            b = int(begin[i]) % shape[i]
            out.append(slice(b, b + 1, 1))
            continue
        s = int(stride[i])
        b = None if bm[i] else int(begin[i])
        e = None if em[i] else int(end[i])
        out.append(slice(b, e, s))
    return tuple(out), [i for i in range(rank) if sm[i]]


def _slice_by_index(op, x, m):
    data = np.asarray(x("x"))
    sl, squeeze = _slice_bounds(op, x, data.shape)
    r = data[sl]
    return r.squeeze(axis=tuple(squeeze)) if squeeze else r


def _slice_update(op, x, m):
    # In place when every other reader of `x` has already run (the cache between two state writes): saves copying
    # the whole cache twice per layer.
    data = np.asarray(x("x"))
    mine = m._order[id(op)]
    if op.x in op.enclosing_block.outputs or any(m._order.get(id(c), mine + 1) > mine
                                                 for c in op.x.child_ops if c is not op):
        data = data.copy()
    sl, squeeze = _slice_bounds(op, x, data.shape)
    upd = np.asarray(x("update"))
    target_shape = data[sl].shape
    data[sl] = upd.reshape(target_shape)
    return data


def _read_state(op, x, m):
    return m._state[op.inputs["input"].name]


def _update_state(op, x, m):
    value = np.asarray(x("value"))
    target = m._state[op.inputs["state"].name]
    if value is not target:
        target[...] = value
    return value


def _concat(op, x, m):
    vals = [np.asarray(v) for v in x("values")]
    axis = int(x("axis"))
    if op.inputs.get("interleave") is not None and bool(x("interleave")):
        stacked = np.stack(vals, axis=axis + 1 if axis >= 0 else axis)
        shape = list(vals[0].shape)
        shape[axis] *= len(vals)
        return stacked.reshape(shape)
    vals = [np.atleast_1d(v) for v in vals]
    return np.concatenate(vals, axis=axis)


def _gather(op, x, m):
    data, idx = np.asarray(x("x")), np.asarray(x("indices")).astype(np.int64)
    axis = int(x("axis")) if op.inputs.get("axis") is not None else 0
    if op.inputs.get("batch_dims") is not None and int(x("batch_dims")) != 0:
        raise Qwen2Error("MIL executor: gather with batch_dims is not supported")
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return np.take(data, idx, axis=axis)


def _linear(op, x, m):
    y = _f(x("x")) @ _f(x("weight")).T
    b = x("bias")
    return y + _f(b) if b is not None else y


def _matmul(op, x, m):
    a, b = _f(x("x")), _f(x("y"))
    if bool(x("transpose_x")):
        a = np.swapaxes(a, -1, -2)
    if bool(x("transpose_y")):
        b = np.swapaxes(b, -1, -2)
    return a @ b


def _layer_norm(op, x, m):
    v = _f(x("x"))
    axes = _axes(x("axes"), v.ndim) if op.inputs.get("axes") is not None else (v.ndim - 1,)
    mean = v.mean(axis=axes, keepdims=True)
    var = ((v - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (v - mean) / np.sqrt(var + float(x("epsilon")))
    g, b = x("gamma"), x("beta")
    return y * (_f(g) if g is not None else 1) + (_f(b) if b is not None else 0)


def _softmax(v: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sdpa(op, x, m):
    q, k, v = _f(x("query")), _f(x("key")), _f(x("value"))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    mask = x("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + _f(mask)
    return _softmax(scores, -1) @ v


def _reduce(fn):
    def run(op, x, m):
        v = _f(x("x"))
        axes = _axes(x("axes"), v.ndim) if op.inputs.get("axes") is not None else None
        keep = bool(x("keep_dims")) if op.inputs.get("keep_dims") is not None else False
        return fn(v, axis=axes, keepdims=keep)
    return run


def _cumsum(op, x, m):
    v = _f(x("x"))
    axis = int(x("axis"))
    rev = bool(x("reverse")) if op.inputs.get("reverse") is not None else False
    exclusive = bool(x("exclusive")) if op.inputs.get("exclusive") is not None else False
    if rev:
        v = np.flip(v, axis)
    c = np.cumsum(v, axis=axis)
    if exclusive:
        c = c - v
    return np.flip(c, axis) if rev else c


def _tile(op, x, m):
    return np.tile(np.asarray(x("x")), tuple(int(r) for r in np.asarray(x("reps"))))


def _reshape(op, x, m):
    data = np.asarray(x("x"))
    shape = [int(s) for s in np.asarray(x("shape"))]
    shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _cast(op, x, m):
    from coremltools.converters.mil.mil import types

    return np.asarray(x("x")).astype(types.nptype_from_builtin(types.string_to_builtin(x("dtype"))))


_IMPLS: dict[str, Callable] = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(np.divide), "maximum": _binary(np.maximum), "minimum": _binary(np.minimum),
    "pow": _binary(np.power), "equal": _binary(np.equal), "not_equal": _binary(np.not_equal),
    "less": _binary(np.less), "less_equal": _binary(np.less_equal), "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "floor_div": _binary(np.floor_divide), "mod": _binary(np.mod),
    "silu": lambda op, x, m: (lambda v: v / (1 + np.exp(-v)))(_f(x("x"))),
    "sigmoid": lambda op, x, m: 1 / (1 + np.exp(-_f(x("x")))),
    "exp": lambda op, x, m: np.exp(_f(x("x"))),
    "sqrt": lambda op, x, m: np.sqrt(_f(x("x"))),
    "rsqrt": lambda op, x, m: 1 / np.sqrt(_f(x("x")) + float(x("epsilon") or 0)),
    "inverse": lambda op, x, m: 1 / (_f(x("x")) + float(x("epsilon") or 0)),
    "cos": lambda op, x, m: np.cos(_f(x("x"))), "sin": lambda op, x, m: np.sin(_f(x("x"))),
    "softmax": lambda op, x, m: _softmax(_f(x("x")), int(x("axis"))),
    "select": lambda op, x, m: np.where(np.asarray(x("cond")), x("a"), x("b")),
    "shape": lambda op, x, m: np.array(np.asarray(x("x")).shape, dtype=np.int32),
    "cast": _cast,
    "gather": _gather,
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "read_state": _read_state,
    "coreml_update_state": _update_state,
    "expand_dims": lambda op, x, m: np.expand_dims(np.asarray(x("x")), _axes(x("axes"), np.ndim(x("x")) + len(np.atleast_1d(x("axes"))))),
    "squeeze": lambda op, x, m: (np.squeeze(np.asarray(x("x")), axis=_axes(x("axes"), np.ndim(x("x"))))
                                 if op.inputs.get("axes") is not None else np.squeeze(np.asarray(x("x")))),
    "reshape": _reshape,
    "transpose": lambda op, x, m: np.transpose(np.asarray(x("x")), [int(p) for p in np.asarray(x("perm"))]),
    "tile": _tile,
    "linear": _linear,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "scaled_dot_product_attention": _sdpa,
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "cumsum": _cumsum,
    "range_1d": lambda op, x, m: np.arange(x("start"), x("end"), x("step")),
    "identity": lambda op, x, m: np.asarray(x("x")),
}
