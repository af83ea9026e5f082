"""`export_onnx`: the reference traced to ONNX, weights streamed in, proved against the reference, published whole."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import onnx_ir as ir
import torch

from qwen2_ref.checkpoint import Checkpoint, empty_model
from qwen2_ref.errors import Qwen2Error
from qwen2_ref.progress import console, status
from qwen2_ref.tokenizer import Tokenizer
from qwen2_ref.weights import load_into, validate

from ..output import staged_folder
from ..tolerances import GATE, Tolerance
from .fuse import fold_matmulnbits_bias, fuse_rms_norm, fuse_skip_rms_norm, share_attention_inputs
from .fused import fuse_moe
from .graph import OPSET, add_logits_to_keep, lower_linears, ops_histogram, trace
from .metadata import write_metadata
from .verify import check_parity, session
from .weights import WeightStreamer

DTYPES = ("fp32", "fp16", "int4")
LOWERINGS = ("function", "fused")
# A reference bigger than this (fp32 bytes) is not materialized for the gate; a 2-layer truncation is checked.
FULL_REFERENCE_MAX_BYTES = 6 * 2**30
GATE_DECODE_STEPS = 4
GATE_PROMPT = "def quicksort(items):\n    if len(items) <= 1:\n        return items\n"


class ParityError(Qwen2Error):
    """The export does not compute what the reference does, beyond the dtype's tolerance."""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_onnx(ckpt: Checkpoint, folder: Path, dtype: str, context: int, requantize: bool = False,
               num_layers: int | None = None, accuracy_level: int = 4, lowering: str = "function") -> dict:
    """Trace, lower, attach streamed weights and save into `folder`. Returns facts for the report.

    lowering: "function" (standard ops + our qwen2 domain's function-body ops) or "fused" (ONNX Runtime's
    contrib kernels: GroupQueryAttention, MoE, SkipSimplifiedLayerNormalization; see fused.py)."""
    if lowering not in LOWERINGS:
        raise Qwen2Error(f"--lowering {lowering!r} is not one of {', '.join(LOWERINGS)}")
    fused = lowering == "fused"
    cfg = ckpt.config if num_layers is None else ckpt.config.replace(num_hidden_layers=num_layers)
    t0 = time.perf_counter()
    status(f"tracing {cfg.model_type} ({cfg.num_hidden_layers} layers, {dtype}, {lowering} lowering) ...")
    model = trace(cfg, dtype, fused_attention=fused)
    streamer = WeightStreamer(ckpt.source, cfg, requantize=requantize)
    quant = None
    if dtype == "int4":
        quant = {n: streamer.quant_spec(n) for n, v in model.graph.initializers.items()
                 if len(v.shape or ()) == 2 and n.endswith(".weight")
                 # MoE routers stay float: a rounded router logit can pick a different expert
                 and not n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))}
    uses = lower_linears(model, quant, accuracy_level=accuracy_level)
    add_logits_to_keep(model)
    fusions = None
    if fused:
        fusions = {"GroupQueryAttention": sum(n.op_type == "GroupQueryAttention" for n in model.graph),
                   "MoE": fuse_moe(model, uses, _expert_quant(cfg) if dtype == "int4" else None),
                   "SimplifiedLayerNormalization": fuse_rms_norm(model)}
        fusions["SkipSimplifiedLayerNormalization"] = fuse_skip_rms_norm(model)
        fusions["shared attention inputs"] = share_attention_inputs(model)
    if dtype == "int4":
        folded = fold_matmulnbits_bias(model)
        fusions = (fusions or {}) | {"MatMulNBits bias": folded}
    streamer.attach(uses)
    t_trace = time.perf_counter() - t0
    model.producer_name, model.producer_version = "qwen2-export", "0.1.0"
    model.metadata_props.update({"qwen2_export.dtype": dtype, "qwen2_export.source": str(ckpt.path),
                                 "qwen2_export.config": json.dumps(cfg.to_hf_config())})
    n_init = len(model.graph.initializers)
    written = [0]

    def progress(tensor, info) -> None:
        written[0] += 1
        if console.is_terminal and written[0] % 16 == 0:
            console.print(f"  writing weights {info.index + 1}/{info.total}", end="\r")

    status(f"writing {n_init} tensors to {folder.name}/model.onnx.data (streamed) ...")
    t1 = time.perf_counter()
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data", callback=progress)
    t_write = time.perf_counter() - t1
    write_metadata(folder, cfg, dtype, context)
    quantized = {u.source: {"bits": u.spec.bits, "block": u.spec.block, "from": u.spec.source}
                 for u in uses.values() if u.spec is not None}
    return {"ops": ops_histogram(model), "trace_s": round(t_trace, 2), "write_s": round(t_write, 2),
            "initializers": n_init, "quantized": quantized, "layers": cfg.num_hidden_layers,
            "lowering": lowering, "fusions": fusions}


def _expert_quant(cfg):
    """int4 experts for QMoE (block 32 along K); None keeps them float where the sizes do not divide."""
    from ..quant import QuantSpec

    spec = QuantSpec(bits=4, block=32)
    if cfg.is_moe and cfg.hidden_size % spec.block == 0 and cfg.moe_intermediate_size % spec.block == 0:
        return spec
    return None


def reference_model(ckpt: Checkpoint, num_layers: int | None = None):
    cfg = ckpt.config if num_layers is None else ckpt.config.replace(num_hidden_layers=num_layers)
    model = empty_model(cfg, torch.float32)
    load_into(model, _Truncated(ckpt.source, cfg), cfg, progress=False)
    return model.eval()


def dequantized_reference(ckpt: Checkpoint, report: dict, num_layers: int | None = None):
    """The reference with every weight an int4 export quantized replaced by its dequantized value: what the
    export computes, up to activation rounding."""
    from ..quant import GGUF_EXACT, QuantSpec

    model = reference_model(ckpt, num_layers)
    streamer = WeightStreamer(ckpt.source, model.config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, q in report["quantized"].items():
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # QMoE experts
                deq = torch.from_numpy(streamer.dequantized_experts(name, QuantSpec(q["bits"], q["block"])))
                if name.endswith("down_proj"):
                    params[name].copy_(deq)
                else:  # fc1 rows interleave gate and up
                    base = name[: -len("gate_up_proj")]
                    params[base + "gate_proj"].copy_(deq[:, 0::2])
                    params[base + "up_proj"].copy_(deq[:, 1::2])
                continue
            if name not in params:
                continue
            spec = GGUF_EXACT[q["from"]][2] if q["from"] in GGUF_EXACT else QuantSpec(q["bits"], q["block"])
            params[name].copy_(torch.from_numpy(streamer.dequantized(name, spec)))
    return model


class _Truncated:
    """A weight source restricted to the tensors of a truncated config (the first N layers)."""

    def __init__(self, source, cfg):
        from qwen2_ref.weights import expected_tensors

        self._src, self.path = source, source.path
        have = set(source.names())
        self._names = [n for n in expected_tensors(cfg) if n in have]

    def names(self):
        return self._names

    def __getattr__(self, item):
        return getattr(self._src, item)


def gate_prompts(ckpt: Checkpoint, tok: Tokenizer | None, batch: int = 1) -> list[list[int]]:
    if tok is not None:
        ids = tok.encode(GATE_PROMPT)
    else:
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, ckpt.config.vocab_size, (24,), generator=g).tolist()
    prompts = [ids]
    if batch > 1:  # a shorter second row exercises left padding
        prompts += [ids[: max(2, len(ids) // 2 - i)] for i in range(batch - 1)]
    return prompts


def export_onnx(ckpt: Checkpoint, out: Path, dtype: str = "fp32", *, context: int | None = None,
                verify: bool = True, overwrite: bool = False, requantize: bool = False,
                tolerance: Tolerance | None = None, gate_batch: int = 1, device_profile: str | None = None,
                lowering: str = "function") -> dict:
    """Export `ckpt` to `out` (model.onnx + external data + metadata + tokenizer + export_report.json).

    Writes into a temporary folder beside `out`, runs the parity gate, and only then moves it into place.
    """
    if dtype not in DTYPES:
        raise Qwen2Error(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    cfg = ckpt.config
    context = context or cfg.max_position_embeddings
    if context > cfg.max_position_embeddings and cfg.rope_scaling is None \
            and cfg.dual_chunk_attention_config is None:
        raise Qwen2Error(f"--max-context {context} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}; configure YaRN or DCA for longer contexts")
    validate(ckpt.source, cfg)  # names and shapes, before any work
    if verify:
        need, have = gate_memory_bytes(cfg, dtype), available_memory_bytes()
        if have is not None and need > have:
            raise Qwen2Error(f"the parity gate needs about {need / 2**30:.0f} GiB of memory, {have / 2**30:.0f} GiB "
                             "is available: pass --no-verify to export without it (the report will say so)")
    tol = tolerance or GATE[dtype]
    t0 = time.perf_counter()
    report: dict = {"format": "onnx", "size": ckpt.size, "model_type": cfg.model_type, "dtype": dtype,
                    "opset": OPSET, "source": str(ckpt.path), "source_kind": ckpt.kind,
                    "device_profile": device_profile, "context": context,
                    "config": cfg.to_hf_config()}
    with staged_folder(out, overwrite) as tmp:
        report |= build_onnx(ckpt, tmp, dtype, context, requantize, lowering=lowering)
        report["custom_ops"] = sorted({k for k in report["ops"] if "::" in k})
        report["custom_op_lowering"] = "function" if any(k.startswith("qwen2::") for k in report["ops"]) else None
        report["export_peak_rss_mib"] = round(peak_rss_mib())
        tok = ckpt.tokenizer()
        if tok is not None:
            tok.save(tmp)
        report["files_mib"] = {p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(tmp.iterdir())}
        if verify:
            report["parity"] = _gate(ckpt, tmp, dtype, context, requantize, tol, gate_batch, tok,
                                     explicit_tolerance=tolerance is not None, lowering=lowering)
        else:
            report["parity"] = {"skipped": "--no-verify"}
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        report["peak_rss_mib"] = round(peak_rss_mib())
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    status(f"exported {out} ({sum(report['files_mib'].values()):.0f} MiB, {report['wall_s']:.0f} s)")
    return report


def gate_layers(cfg) -> int | None:
    """None: the gate checks the full model; else the number of leading layers it checks."""
    return None if cfg.num_parameters() * 4 <= FULL_REFERENCE_MAX_BYTES else 2


def gate_memory_bytes(cfg, dtype: str) -> int:
    """Reference in fp32 plus an ONNX Runtime session of the gated model, plus working room."""
    layers = gate_layers(cfg)
    ref = (cfg if layers is None else cfg.replace(num_hidden_layers=layers)).num_parameters() * 4
    return int(ref * (1 + {"fp32": 1.0, "fp16": 0.5, "int4": 0.35}[dtype]) + 2**30)


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gate(ckpt: Checkpoint, folder: Path, dtype: str, context: int, requantize: bool, tol: Tolerance,
          batch: int, tok: Tokenizer | None, explicit_tolerance: bool = False, lowering: str = "function") -> dict:
    cfg = ckpt.config
    # Random weights give near-flat logits whose arg-max is noise: their gate holds the logit bound only,
    # unless the caller chose the tolerance (the tests do, on tiny models where the arg-max is meaningful).
    top1 = explicit_tolerance or not ckpt.random_weights
    full_bytes = cfg.num_parameters() * 4
    prompts = gate_prompts(ckpt, tok, batch)
    if gate_layers(cfg) is None:
        status("verifying against the reference (ONNX Runtime vs PyTorch) ...")
        ref = reference_model(ckpt)
        p = check_parity(session(folder), ref, prompts, GATE_DECODE_STEPS, tol, top1)
        result = p.to_dict() | {"scope": "full model"}
    else:
        layers = gate_layers(cfg)
        status(f"verifying a {layers}-layer truncation (the full fp32 reference would need "
               f"{full_bytes / 2**30:.0f} GiB) ...")
        import tempfile

        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".gate-") as td:
            build_onnx(ckpt, Path(td), dtype, context, requantize, num_layers=layers, lowering=lowering)
            ref = reference_model(ckpt, layers)
            p = check_parity(session(td), ref, prompts, GATE_DECODE_STEPS, tol, top1)
            del ref
        result = p.to_dict() | {"scope": f"first {layers} of {cfg.num_hidden_layers} layers, same weights"}
    result["top1_floor_applied"] = top1
    if not p.passed:
        raise ParityError(f"parity gate failed for the {dtype} export: max |Δ logits| {p.max_abs_logits:.3g} "
                          f"(limit {tol.max_abs_logits}), top-1 agreement {p.top1_agreement:.3f} "
                          f"(floor {tol.min_top1_agreement}); nothing was written")
    status(f"parity: max |Δ logits| {p.max_abs_logits:.2e}, top-1 agreement {p.top1_agreement:.3f}, "
           f"greedy agreement {p.greedy_agreement:.2f}")
    return result
