"""Attach checkpoint weights to a traced graph as streamed external data.

Every initializer gets a lazily evaluated tensor; `onnx_ir.save` then writes them one at a time, in graph order,
into `model.onnx.data`. Large float tensors are produced in row blocks; a quantized weight is quantized once, in row
blocks, and its three MatMulNBits tensors are written from that packed result. Peak memory is bounded by about one
tensor, never the model.
"""

from __future__ import annotations

from typing import Callable, Iterator

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from qwen2_ref.config import ModelArgs
from qwen2_ref import rope
from qwen2_ref.weights import WeightSource

from ..quant import GGUF_EXACT, QuantSpec, carried_spec, quantize_from_gguf, quantize_rtn
from .linears import WeightKind, WeightUse

ROW_BLOCK = 8192  # rows per block when streaming a float tensor or quantizing
# Buffers computed from the config, not read from the checkpoint (GroupQueryAttention's cos/sin caches).
COMPUTED = {"rope_inv_freq": lambda cfg: rope.inv_freq_and_scale(cfg)[0],
            "rope_cos_cache": lambda cfg: rope.rope_tables(cfg, rope.max_positions(cfg), half=True)[0],
            "rope_sin_cache": lambda cfg: rope.rope_tables(cfg, rope.max_positions(cfg), half=True)[1]}


class StreamedTensor(ir.LazyTensor):
    """A tensor whose bytes are produced block by block when written (never materialized whole)."""

    def __init__(self, blocks: Callable[[], Iterator[np.ndarray]], dtype: ir.DataType, shape: tuple[int, ...],
                 name: str):
        super().__init__(lambda: ir.tensor(np.concatenate([b.reshape(-1) for b in blocks()]).reshape(shape)),
                         dtype=dtype, shape=ir.Shape(list(shape)), name=name)
        self._blocks = blocks

    def tofile(self, file) -> None:
        for b in self._blocks():
            file.write(np.ascontiguousarray(b).tobytes())


NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
         ir.DataType.UINT8: np.uint8}


class WeightStreamer:
    """Reads reference parameters (by model parameter name) from a checkpoint's weight source."""

    def __init__(self, source: WeightSource, cfg: ModelArgs, base: QuantSpec | None = None,
                 requantize: bool = False, calibrated: dict | None = None, reblock: bool = False):
        """`base`: the precision's block format for weights re-quantized from floats; `requantize`: never carry a
        GGUF's own blocks over; `reblock`: carry them with 8-bit codes on blocks of 128 (quant.carried_spec);
        `calibrated`: {param: Calibrated} weights already quantized against calibration inputs
        (export/calibrate.py), used instead of either."""
        self.source, self.cfg, self.requantize, self.reblock = source, cfg, requantize, reblock
        self.base = base or QuantSpec(bits=4, block=32)
        self.calibrated = calibrated or {}

    # -- reading ------------------------------------------------------------------------------------------------
    def checkpoint_names(self, param: str) -> list[str]:
        """Checkpoint tensors behind a model parameter (a stacked expert parameter has one per expert)."""
        if param.endswith((".experts.gate_proj", ".experts.up_proj", ".experts.down_proj", ".experts.gate_up_proj")):
            base, proj = param.rsplit(".", 1)
            return [f"{base}.{e}.{proj}.weight" for e in range(self.cfg.num_experts)]
        return [param]

    def rows(self, param: str, start: int, stop: int) -> torch.Tensor:
        if param.endswith(".experts.gate_up_proj"):  # ORT MoE fc1: gate and up rows interleaved, (E, 2I, H)
            base = param[: -len("gate_up_proj")]
            gate, up = self.rows(base + "gate_proj", start, stop), self.rows(base + "up_proj", start, stop)
            return torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1], gate.shape[2])
        names = self.checkpoint_names(param)
        if len(names) == 1:
            return self.source.get_rows(names[0], start, stop).to(torch.float32)
        return torch.stack([self.source.get(names[e]).to(torch.float32) for e in range(start, stop)])

    def n_rows(self, param: str) -> int:
        if param in COMPUTED:
            return 1
        names = self.checkpoint_names(param)
        return len(names) if len(names) > 1 else self.source.shape(names[0])[0]

    def quant_spec(self, param: str) -> QuantSpec:
        """How a linear weight is quantized: a GGUF tensor keeps its grid where MatMulNBits can carry it (exactly,
        or its 8-bit codes re-blocked)."""
        if param in self.calibrated:
            return self.calibrated[param].quantized.spec
        raw = getattr(self.source, "raw", None)
        if raw is not None and not self.requantize:
            gtype = self.source.tensor_type(param)
            if gtype in GGUF_EXACT:
                return carried_spec(gtype, self.reblock, self.source.shape(param)[-1])
        return self.base

    def _quantized_blocks(self, param: str, spec: QuantSpec):
        if param in self.calibrated:
            yield self.calibrated[param].quantized
            return
        n = self.n_rows(param)
        for r in range(0, n, ROW_BLOCK):
            e = min(n, r + ROW_BLOCK)
            w = self.rows(param, r, e)
            if spec.source != "rtn":
                gtype, raw = self.source.raw(param)
                yield quantize_from_gguf(gtype, raw[r:e], w.numpy(), spec)
            else:
                yield quantize_rtn(w, spec)

    def quantized_experts(self, param: str, spec: QuantSpec):
        """Per-expert block quantization of a stacked (E, N, K) expert tensor (QMoE), one expert at a time."""
        for e in range(self.n_rows(param)):
            yield quantize_rtn(self.rows(param, e, e + 1)[0], spec)

    def dequantized_experts(self, param: str, spec: QuantSpec) -> np.ndarray:
        return np.stack([q.dequantize() for q in self.quantized_experts(param, spec)])

    def quantize(self, param: str, spec: QuantSpec) -> dict[str, np.ndarray]:
        parts = [q.pack() for q in self._quantized_blocks(param, spec)]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def dequantized(self, param: str, spec: QuantSpec) -> np.ndarray:
        """The dequantized values of what `quantize` writes (for checking an export against them)."""
        return np.concatenate([q.dequantize() for q in self._quantized_blocks(param, spec)], axis=0)

    # -- attaching ----------------------------------------------------------------------------------------------
    def attach(self, uses: dict[str, WeightUse]) -> None:
        for use in uses.values():
            if use.kind is WeightKind.QUANTIZED_EXPERTS:
                self._attach_quantized_experts(use.outputs, use.source, use.spec)
            elif use.kind is WeightKind.TRANSPOSED:
                self._attach_float(use.outputs[0], use.source, transpose=True)
            elif use.kind in (WeightKind.QUANTIZED, WeightKind.QUANTIZED_AND_PLAIN):
                outs = list(use.outputs)
                if use.kind is WeightKind.QUANTIZED_AND_PLAIN:
                    self._attach_float(outs.pop(0), use.source)
                self._attach_quantized(outs, use.source, use.spec, use.keys)
            elif use.kind is WeightKind.PACKED:
                self._attach_packed(use)
            else:  # PLAIN, INTERLEAVED (rows() interleaves gate and up)
                self._attach_float(use.outputs[0], use.source)

    def _attach_float(self, value: ir.Value, param: str, transpose: bool = False) -> None:
        dt = NUMPY[value.dtype]
        shape = tuple(value.shape.numpy())
        if param in COMPUTED:  # not in the checkpoint: computed from the config
            value.const_value = ir.tensor(COMPUTED[param](self.cfg).numpy().astype(dt), name=value.name)
            return

        def blocks() -> Iterator[np.ndarray]:
            if transpose:
                yield self.rows(param, 0, self.n_rows(param)).T.contiguous().numpy().astype(dt)
                return
            n = self.n_rows(param)
            # rows of a stacked expert tensor are whole experts: one at a time
            step = ROW_BLOCK if len(shape) <= 2 else max(1, ROW_BLOCK // int(np.prod(shape[1:-1])))
            for r in range(0, n, step):
                yield self.rows(param, r, min(n, r + step)).numpy().astype(dt)

        value.const_value = StreamedTensor(blocks, value.dtype, shape, value.name)

    def _attach_quantized_experts(self, outs: list[ir.Value], param: str, spec: QuantSpec) -> None:
        """QMoE's (E, N, K·bits/8) codes, (E, N, K/block) scales and (E, N, ·) zero points (4-bit: two per byte),
        each expert in MatMulNBits' layout; quantized expert by expert on first demand (4-bit: the packed result is
        ~1/7 of the fp32 tensor), each written once."""
        cache: dict[str, np.ndarray] = {}
        keys = ("B", "scales", "zero_points")

        def make(key: str, value: ir.Value):
            shape = tuple(value.shape.numpy())

            def blocks() -> Iterator[np.ndarray]:
                if not cache:
                    parts = [q.pack() for q in self.quantized_experts(param, spec)]
                    for k in keys:
                        cache[k] = np.stack([p[k] for p in parts])
                yield cache.pop(key).astype(NUMPY[value.dtype]).reshape(shape)
            return blocks

        for key, v in zip(keys, outs):
            v.const_value = StreamedTensor(make(key, v), v.dtype, tuple(v.shape.numpy()), v.name)

    def _attach_quantized(self, outs: list[ir.Value], param: str, spec: QuantSpec,
                          keys: tuple[str, ...] = ("B", "scales", "zero_points")) -> None:
        cache: dict[str, np.ndarray] = {}

        def make(key: str, value: ir.Value):
            def blocks() -> Iterator[np.ndarray]:
                if not cache:
                    cache.update({k: v for k, v in self.quantize(param, spec).items() if k in keys})
                arr = cache.pop(key)  # each packed tensor is written once, then freed
                if key == "offsets":  # (N, K/block) per row -> (K/block, N): the right operand of a MatMul
                    arr = arr.T
                yield arr.astype(NUMPY[value.dtype]).reshape(tuple(value.shape.numpy()))
            return blocks

        for key, v in zip(keys, outs):
            v.const_value = StreamedTensor(make(key, v), v.dtype, tuple(v.shape.numpy()), v.name)

    def _attach_packed(self, use: WeightUse) -> None:
        """Several weights side by side along N (packed Q/K/V): each output is its parts' tensors concatenated —
        rows for MatMulNBits blocks and biases, columns for a transposed (K, N) MatMul weight."""
        kind = use.parts[0].kind
        cache: dict[str, np.ndarray] = {}

        def part_arrays(part: WeightUse) -> dict[str, np.ndarray]:
            if kind is WeightKind.QUANTIZED:
                return {k: v for k, v in self.quantize(part.source, part.spec).items() if k in use.keys}
            w = self.rows(part.source, 0, self.n_rows(part.source))
            return {"": (w.T.contiguous() if kind is WeightKind.TRANSPOSED else w).numpy()}

        keys = use.keys if kind is WeightKind.QUANTIZED else ("",)
        axis = 1 if kind is WeightKind.TRANSPOSED else 0

        def make(key: str, value: ir.Value):
            def blocks() -> Iterator[np.ndarray]:
                if not cache:
                    arrays = [part_arrays(p) for p in use.parts]
                    cache.update({k: np.concatenate([a[k] for a in arrays], axis=axis) for k in keys})
                yield cache.pop(key).astype(NUMPY[value.dtype]).reshape(tuple(value.shape.numpy()))
            return blocks

        for key, v in zip(keys, use.outputs):
            v.const_value = StreamedTensor(make(key, v), v.dtype, tuple(v.shape.numpy()), v.name)
