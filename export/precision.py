"""Precisions as values: what each `--dtype` stores, computes in, caches in, and must hold to at the gate.

A precision belongs to one target (ONNX and Core ML int4 differ: fp32 vs fp16 activations, ORT's MatMulNBits vs
Core ML's blockwise constants). Everything that varies with the dtype reads it from here: the CLI's choices, the
traced dtype, the weight format the lowering writes, the gate's tolerance, `python -m export plan`'s sizes and the
metadata. Adding a precision is one entry below plus its lowering (the ONNX or Core ML code that reads `weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qwen2_ref.errors import Qwen2Error

from .tolerances import COREML_GATE, GATE, GATE_ACTIVATIONS, Tolerance

TARGETS = ("onnx", "coreml")
RUNTIME = {"onnx": "ONNX", "coreml": "Core ML"}
# --activations: the dtype a graph computes in and caches keys and values in
ACTIVATIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Weights that stay float under every quantized precision: the MoE routers (a rounded router logit can pick a
# different expert).
ROUTERS = ("mlp.gate.weight", "shared_expert_gate.weight")


def quantizable(name: str, shape) -> bool:
    """A weight a quantized precision stores in its WeightFormat: every 2-D linear weight but the MoE routers.
    The ONNX lowering and `plan`'s sizes both decide by this."""
    return len(shape or ()) == 2 and name.endswith(".weight") and not name.endswith(ROUTERS)


@dataclass(frozen=True)
class WeightFormat:
    """How linear-layer (and embedding) weights are stored when they are not plain floats.

    scheme "affine": w = (code − zero_point) · scale, one scale per `block` elements along the input dimension
    (per output channel when `block` is None); "palette": each weight an index into a `2**bits`-entry table shared by
    `group` output channels."""

    scheme: str
    bits: int
    block: int | None = None
    symmetric: bool = False
    group: int | None = None
    scale_bytes: int = 4  # bytes of one scale (and of one float table entry)

    def stored_bytes(self, rows: int, cols: int) -> float:
        """Bytes of a (rows, cols) weight in this format: codes, scales and zero points (or tables)."""
        if self.scheme == "palette":
            return rows * cols * self.bits / 8 + -(-rows // (self.group or 1)) * (1 << self.bits) * self.scale_bytes
        per_row = -(-cols // self.block) if self.block else 1  # blocks per output row
        codes = rows * per_row * (self.block or cols) * self.bits / 8  # a row's last block padded whole
        zero_points = 0 if self.symmetric else rows * -(-per_row * self.bits // 8)  # packed per row
        return codes + rows * per_row * self.scale_bytes + zero_points


@dataclass(frozen=True)
class Precision:
    """One `--dtype` of one target."""

    name: str  # the --dtype value
    target: str  # "onnx" | "coreml"
    summary: str  # for --help
    compute: torch.dtype  # activations: the dtype the graph computes in
    kv_cache: torch.dtype  # the KV cache's dtype
    float_weights: torch.dtype  # weights stored as floats (all of them, unless `weights` says otherwise)
    weights: WeightFormat | None  # the linear layers' (and embedding's) format; None: floats
    tolerance: Tolerance  # the export gate's bar on a real checkpoint

    @property
    def quantized(self) -> bool:
        return self.weights is not None

    @property
    def activations(self) -> str:
        """The --activations name of `compute`: fp32, fp16 or bf16."""
        return next(k for k, v in ACTIVATIONS.items() if v == self.compute)

    @property
    def label(self) -> str:
        """The --dtype, with the activations when they are not the dtype's own: "int4", "int4 (fp16 activations)"."""
        own = PRECISIONS[self.target][self.name].activations
        return self.name if self.activations == own else f"{self.name} ({self.activations} activations)"

    @property
    def slug(self) -> str:
        """For file names: "int4", "int4-fp16act"."""
        own = PRECISIONS[self.target][self.name].activations
        return self.name if self.activations == own else f"{self.name}-{self.activations}act"

    def with_activations(self, activations: str | None, what: str = "--activations") -> "Precision":
        """This precision computing (and caching keys and values) in `activations`: ONNX int4 only, whose weights
        are codes with scales, and so can feed any float dtype; floats stay in the dtype they store (None or the
        precision's own activations: itself). The quantized weights' scales, the float weights (embedding, norms,
        biases) and the KV cache follow the activations; norms and softmax still accumulate in fp32."""
        if activations is None or activations == self.activations:
            return self
        if activations not in ACTIVATIONS:
            raise Qwen2Error(f"{what} {activations!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.target != "onnx" or not self.quantized:
            raise Qwen2Error(f"{what} {activations} applies to ONNX int4; {RUNTIME[self.target]} {self.name} "
                             f"computes in {self.activations}")
        dt = ACTIVATIONS[activations]
        size = torch.empty((), dtype=dt).element_size()
        return replace(self, compute=dt, kv_cache=dt, float_weights=dt,
                       weights=replace(self.weights, scale_bytes=size), tolerance=GATE_ACTIVATIONS[activations],
                       summary=f"{self.summary.split(',')[0]}, {activations} activations and KV cache")

    def float_bytes(self, n: int) -> float:
        return n * torch.empty((), dtype=self.float_weights).element_size()

    @property
    def hf_torch_dtype(self) -> str:
        """config.json's `torch_dtype` for runtimes that read it (optimum): the dtype of the graph's activations."""
        return str(self.compute).removeprefix("torch.")


# ONNX Runtime's MatMulNBits: 4-bit codes, block 32 along K, fp32 scales, packed 4-bit zero points.
MATMUL_NBITS_4 = WeightFormat("affine", bits=4, block=32)

_ONNX = [
    Precision("fp32", "onnx", "fp32 weights and activations", torch.float32, torch.float32, torch.float32, None,
              GATE["fp32"]),
    Precision("fp16", "onnx", "fp16 weights, activations and KV cache (norms and softmax in fp32)", torch.float16,
              torch.float16, torch.float16, None, GATE["fp16"]),
    Precision("int4", "onnx", "4-bit MatMulNBits weights (block 32), fp32 activations; a GGUF keeps its own blocks",
              torch.float32, torch.float32, torch.float32, MATMUL_NBITS_4, GATE["int4"]),
]
# Core ML computes in fp16 whatever the weights (activations and the KV-cache states); scales are fp16.
_COREML = [
    Precision("int4", "coreml", "4-bit per-block (32) weights with offsets, clip-searched", torch.float16,
              torch.float16, torch.float16, WeightFormat("affine", 4, 32, scale_bytes=2), COREML_GATE["int4"]),
    Precision("int8", "coreml", "8-bit symmetric per-channel weights", torch.float16, torch.float16, torch.float16,
              WeightFormat("affine", 8, None, symmetric=True, scale_bytes=2), COREML_GATE["int8"]),
    Precision("fp16", "coreml", "fp16 weights", torch.float16, torch.float16, torch.float16, None,
              COREML_GATE["fp16"]),
    Precision("palettize4", "coreml", "16-entry k-means table per 16 output channels", torch.float16, torch.float16,
              torch.float16, WeightFormat("palette", 4, group=16, scale_bytes=2), COREML_GATE["palettize4"]),
]
PRECISIONS: dict[str, dict[str, Precision]] = {t: {p.name: p for p in ps if p.target == t}
                                               for t, ps in (("onnx", _ONNX), ("coreml", _COREML))}


def names(target: str) -> list[str]:
    """The --dtype choices of a target, in the order --help lists them."""
    return list(PRECISIONS[target])


def get(target: str, name: str, what: str = "--dtype") -> Precision:
    try:
        return PRECISIONS[target][name]
    except KeyError:
        raise Qwen2Error(f"{what} {name!r} is not a {target} precision; valid: {', '.join(names(target))}") from None
