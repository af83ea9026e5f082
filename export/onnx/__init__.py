"""`export_onnx`: the reference traced to ONNX, weights streamed in, proved against the reference, published whole.

The steps every export shares (staging, the gate, the report) are in export/pipeline.py; this module supplies the
ONNX build and a step function over the saved graph.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir
import torch

from qwen2_ref.checkpoint import Checkpoint, empty_model
from qwen2_ref.errors import Qwen2Error
from qwen2_ref.progress import counter, status
from qwen2_ref.weights import expected_tensors, load_into

from ..calibrate import MAX_REFERENCE_BYTES, StreamedReference, calibrated_weights
from ..mixed import mixed_weights
from ..gate import GateSubject, ParityError, reference_step
from ..pipeline import run_export
from ..plan import CALIBRATED_RECIPES, CHOOSING_RECIPES, REBLOCKING_RECIPES, ExportPlan, make_plan
from ..precision import quantizable
from ..quant import QuantSpec
from ..sizing import weight_bytes
from .fuse import fold_matmulnbits_bias, fuse_rms_norm, fuse_skip_rms_norm, pack_qkv, share_attention_inputs
from .fused import fuse_moe
from .graph import OPSET, add_logits_to_keep, trace
from .irutil import ops_histogram
from .linears import ACCURACY_LEVEL, lower_linears
from .metadata import write_metadata
from .verify import backend, onnx_step, read_dequantized, seqlens_step, session
from .weights import WeightStreamer

# A reference bigger than this (fp32 bytes) is not materialized for the gate; a 2-layer truncation is checked.
FULL_REFERENCE_MAX_BYTES = MAX_REFERENCE_BYTES
TRUNCATED_GATE_LAYERS = 2

__all__ = ["export_onnx", "build_onnx", "make_plan", "reference_model", "dequantized_reference", "ParityError",
           "OnnxTarget"]


def export_onnx(ckpt: Checkpoint, plan: ExportPlan) -> dict:
    """Export `ckpt` as `plan` says (`make_plan("onnx", ckpt, ...)`): model.onnx + external data + metadata +
    tokenizer + export_report.json, built in a temporary folder, gated, then moved into place."""
    if plan.target != "onnx":
        raise ValueError(f"export_onnx got a {plan.target} plan")
    return run_export(ckpt, plan, OnnxTarget())


def base_spec(plan: ExportPlan) -> QuantSpec | None:
    """The MatMulNBits block format of a quantized precision (None for float precisions)."""
    fmt = plan.precision.weights
    if fmt is None:
        return None
    if fmt.scheme != "affine" or fmt.block is None:
        raise ValueError(f"{plan.precision.name}: ONNX stores affine block-quantized weights only")
    return QuantSpec(bits=fmt.bits, block=fmt.block)


def build_onnx(ckpt: Checkpoint, folder: Path, plan: ExportPlan, num_layers: int | None = None) -> dict:
    """Trace, lower, attach streamed weights and save into `folder`. Returns facts for the report.

    plan.lowering: "function" (standard ops + our qwen2 domain's function-body ops) or "fused" (ONNX Runtime's
    contrib kernels: GroupQueryAttention, MoE, SkipSimplifiedLayerNormalization; see fused.py)."""
    prec, fused = plan.precision, plan.lowering == "fused"
    cfg = ckpt.config if num_layers is None else ckpt.config.replace(num_hidden_layers=num_layers)
    t0 = time.perf_counter()
    status(f"tracing {cfg.model_type} ({cfg.num_hidden_layers} layers, {prec.name}, {plan.lowering} lowering) ...")
    model = trace(cfg, prec.compute, fused_attention=fused, attention=plan.attention)
    base = base_spec(plan)
    calibrated, calibration = _calibrated(ckpt, plan, model, num_layers)
    streamer = WeightStreamer(ckpt.source, cfg, base, requantize=plan.recipe == "requantize",
                              calibrated=calibrated, reblock=plan.recipe in REBLOCKING_RECIPES)
    quant = None
    if base is not None:
        quant = {n: streamer.quant_spec(n) for n, v in model.graph.initializers.items() if quantizable(n, v.shape)}
    uses = lower_linears(model, quant, accuracy_level=ACCURACY_LEVEL)
    add_logits_to_keep(model)
    fusions = None
    if fused:
        fusions = {"GroupQueryAttention": sum(n.op_type == "GroupQueryAttention" for n in model.graph),
                   "MoE": fuse_moe(model, uses, _expert_quant(cfg, base)),
                   "SimplifiedLayerNormalization": fuse_rms_norm(model)}
        fusions["SkipSimplifiedLayerNormalization"] = fuse_skip_rms_norm(model)
        fusions["shared attention inputs"] = share_attention_inputs(model)
    if base is not None:
        folded = fold_matmulnbits_bias(model)
        fusions = (fusions or {}) | {"MatMulNBits bias": folded}
    if fused:
        fusions["packed QKV"] = pack_qkv(model, uses)
    streamer.attach(uses)
    t_trace = time.perf_counter() - t0
    model.producer_name, model.producer_version = "qwen2-export", "0.1.0"
    model.metadata_props.update({"qwen2_export.dtype": prec.name, "qwen2_export.source": str(ckpt.path),
                                 "qwen2_export.config": json.dumps(cfg.to_hf_config())})
    n_init = len(model.graph.initializers)
    # What ir.save streams into model.onnx.data: the initializers over `inline` bytes; the others stay in model.onnx.
    inline = 256
    external = [v.const_value for g in model.graphs() for v in g.initializers.values()
                if v.const_value is not None and v.const_value.nbytes > inline]
    # Messages name the destination (--out), never the hidden folder the export is staged in.
    where = f"{plan.out}/model.onnx.data" if num_layers is None else f"the gate's {num_layers}-layer model.onnx.data"
    t1 = time.perf_counter()
    with counter(f"writing {where}", len(external), "tensors",
                 detail=f"{sum(t.nbytes for t in external) / 2**20:.1f} MiB; {n_init - len(external)} "
                        f"initializers of {inline} B or less stay inline in model.onnx") as meter:
        started = [0]

        def progress(tensor, info) -> None:  # called as each tensor starts: the ones before it are written
            if info.total != meter.total:
                meter.set_total(info.total)
            meter.update(started[0])
            started[0] += 1

        try:
            ir.save(model, folder / "model.onnx", external_data="model.onnx.data", callback=progress,
                    size_threshold_bytes=inline)
        except Exception as e:  # onnx_ir wraps what a streamed tensor raised (damaged data, a full disk)
            raise _root_cause(e) from None
        meter.update(started[0])
    t_write = time.perf_counter() - t1
    write_metadata(folder, cfg, prec, plan.context)
    quantized = {u.source: {"bits": u.spec.bits, "block": u.spec.block, "from": u.spec.source}
                 | ({"folded": True} if u.spec.folded else {})
                 | ({"output_error": round(calibrated[u.source].error, 6)} if u.source in calibrated else {})
                 for use in uses.values() for u in (use.parts or (use,)) if u.spec is not None}
    return {"ops": ops_histogram(model), "trace_s": round(t_trace, 2), "write_s": round(t_write, 2),
            "initializers": n_init, "quantized": quantized, "layers": cfg.num_hidden_layers,
            "lowering": plan.lowering, "fusions": fusions, "calibration": calibration}


def _root_cause(e: BaseException) -> BaseException:
    """The user error (Qwen2Error) or system error (OSError) inside a wrapped exception chain, else `e` itself."""
    c: BaseException | None = e
    while c is not None:
        if isinstance(c, (Qwen2Error, OSError)):
            return c
        c = c.__cause__ or c.__context__
    return e


TIED = "model.embed_tokens.weight"  # the name a tied embedding/head table has in the traced graph


def _calibrated(ckpt: Checkpoint, plan: ExportPlan, model: ir.Model, num_layers: int | None
                ) -> tuple[dict, dict | None]:
    """The calibrated recipe's GPTQ results for the traced graph's linear weights ({} for other recipes). The
    size limit is the whole model's, so a big model's gate (its first layers) is quantized as the export is."""
    if plan.recipe not in CALIBRATED_RECIPES:
        return {}, None
    inits = model.graph.initializers
    names = {n for n, v in inits.items() if quantizable(n, v.shape) and "embed_tokens" not in n}
    # a tied table is the head's weight too (the graph calls it the embedding's): calibrated as the head, whose
    # inputs it multiplies, and written under its graph name, the embedding gathering from those blocks
    tied = TIED if TIED in inits and ckpt.config.tie_word_embeddings and quantizable(TIED, inits[TIED].shape) else None
    if tied:
        names.add("lm_head.weight")
    cfg = ckpt.config if num_layers is None else ckpt.config.replace(num_hidden_layers=num_layers)
    reference = StreamedReference(cfg, ckpt.source)
    if plan.recipe in CHOOSING_RECIPES:
        out = mixed_weights(ckpt, names, reference, lambda: reference_model(ckpt, num_layers),
                            plan.calibration, plan.max_kl, scope="all" if plan.recipe == "mixed" else "head")
    else:
        out = calibrated_weights(ckpt, names, reference, plan.calibration)
    if tied and "lm_head.weight" in out[0]:
        out[0][tied] = out[0].pop("lm_head.weight")
    return out


def _expert_quant(cfg, base: QuantSpec | None) -> QuantSpec | None:
    """Block-quantized experts for QMoE; None keeps them float (a float precision, or sizes that do not divide)."""
    if base is None or not cfg.is_moe:
        return None
    if cfg.hidden_size % base.block or cfg.moe_intermediate_size % base.block:
        return None
    return base


class OnnxTarget:
    label = "ONNX"

    def check(self, ckpt: Checkpoint, plan: ExportPlan) -> None:
        """Everything an ONNX export can refuse (the context) is settled by make_plan."""

    def memory_needed(self, ckpt: Checkpoint, plan: ExportPlan) -> tuple[int, str, str] | None:
        if not plan.gate.enabled:
            return None
        return (gate_memory_bytes(ckpt.config, plan), "the parity gate",
                "pass --no-verify to export without it (the report will say so)")

    def build(self, ckpt: Checkpoint, plan: ExportPlan, folder: Path, tokenizer) -> dict:
        facts = build_onnx(ckpt, folder, plan)
        facts["opset"] = OPSET
        facts["custom_ops"] = sorted({k for k in facts["ops"] if "::" in k})
        facts["custom_op_lowering"] = "function" if any(k.startswith("qwen2::") for k in facts["ops"]) else None
        return facts

    @contextmanager
    def gate_subject(self, ckpt: Checkpoint, plan: ExportPlan, folder: Path):
        layers = gate_layers(ckpt.config)
        providers, act = gate_providers(plan), (plan.precision.activations, plan.attention)
        if layers is None:
            yield GateSubject(lambda: reference_step(reference_model(ckpt)),
                              lambda: export_step(folder, providers, act), "full model")
            return
        cfg = ckpt.config
        status(f"the gate checks a {layers}-layer truncation (the full fp32 reference would need "
               f"{cfg.num_parameters() * 4 / 2**30:.0f} GiB)")
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".gate-") as td:
            build_onnx(ckpt, Path(td), plan, num_layers=layers)
            yield GateSubject(lambda: reference_step(reference_model(ckpt, layers)),
                              lambda: export_step(Path(td), providers, act),
                              f"first {layers} of {cfg.num_hidden_layers} layers, same weights")


def gate_providers(plan: ExportPlan) -> tuple[str, ...]:
    """Where the gate runs the export: on the GPU when the plan's profile is a CUDA one and this onnxruntime has
    CUDA (onnxruntime-gpu), else ONNX Runtime's CPU execution provider (the CPU twin of a GPU layout)."""
    from runtime.session import CUDA, cuda_unusable

    if plan.profile is not None and CUDA in plan.profile.execution_providers and cuda_unusable() is None:
        return (CUDA, "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def export_step(folder: Path, providers: tuple[str, ...], how: tuple[str, str]):
    """(A step function over the saved export, run as its attention layout must be; what runs it). `how`:
    (activations, attention) from its plan."""
    try:
        sess = session(folder, providers)
    except Exception as e:  # ORT's own exception types
        missing = re.search(r"Could not find an implementation for (\w+)\(\d+\) node", str(e))
        if missing is None:
            raise
        raise Qwen2Error(f"the gate cannot run this export: ONNX Runtime's {', '.join(providers)} has no "
                         f"{missing.group(1)} kernel for {how[0]} activations; export it where the gate can run it "
                         "(a CUDA machine with onnxruntime-gpu and a CUDA --device profile), or pass --no-verify "
                         "(the report will say so)") from None
    return (seqlens_step(sess) if how[1] == "seqlens" else onnx_step(sess)), backend(sess)


def gate_layers(cfg) -> int | None:
    """None: the gate checks the full model; else the number of leading layers it checks."""
    return None if cfg.num_parameters() * 4 <= FULL_REFERENCE_MAX_BYTES else TRUNCATED_GATE_LAYERS


def gate_memory_bytes(cfg, plan: ExportPlan) -> int:
    """The gate holds the fp32 reference, then (after releasing it) an ONNX Runtime session of the gated model,
    whose weights ORT may hold twice while it pre-packs them: the larger of the two, plus working room."""
    layers = gate_layers(cfg)
    gated = cfg if layers is None else cfg.replace(num_hidden_layers=layers)
    ref = gated.num_parameters() * 4
    sess = weight_bytes(gated, plan.precision, plan.lowering)[0] * 2
    return int(max(ref, sess) + 2**30)


def reference_model(ckpt: Checkpoint, num_layers: int | None = None):
    cfg = ckpt.config if num_layers is None else ckpt.config.replace(num_hidden_layers=num_layers)
    model = empty_model(cfg, torch.float32)
    load_into(model, _Truncated(ckpt.source, cfg), cfg, progress=False)
    return model.eval()


def dequantized_reference(ckpt: Checkpoint, report: dict, folder: Path, num_layers: int | None = None):
    """The reference with every weight an int4 export quantized replaced by its dequantized value as read back
    from the export in `folder`: what the export computes, up to activation rounding."""
    model = reference_model(ckpt, num_layers)
    streamer = WeightStreamer(ckpt.source, model.config)
    written = read_dequantized(folder, report, model.config)
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
            if name in params:
                params[name].copy_(torch.from_numpy(written[name][:, :params[name].shape[1]]))
    return model


class _Truncated:
    """A weight source restricted to the tensors of a truncated config (the first N layers)."""

    def __init__(self, source, cfg):
        self._src, self.path = source, source.path
        have = set(source.names())
        self._names = [n for n in expected_tensors(cfg) if n in have]

    def names(self):
        return self._names

    def __getattr__(self, item):
        return getattr(self._src, item)
