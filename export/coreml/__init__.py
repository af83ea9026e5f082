"""`export_coreml`: the reference converted to a stateful Core ML ML Program, compressed, proved on Linux, published.

Output folder:
  Qwen2.mlpackage        the model (iOS 18 / macOS 15): inputIds + causalMask -> logits, states keyCache/valueCache
  tokenizer.json, tokenizer_config.json, config.json   what swift-transformers loads next to a model
  qwen2_coreml.json      sidecar for app code: I/O, state shapes, context, eos, chat template, compute units
  export_report.json     what was done, how long, how much memory, and how close to the reference
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import devices
from qwen2_ref.checkpoint import Checkpoint
from qwen2_ref.errors import Qwen2Error
from qwen2_ref.progress import status
from qwen2_ref.tokenizer import Tokenizer
from qwen2_ref.weights import validate

from ..output import staged_folder
from ..tolerances import COREML_GATE, Tolerance
from . import verify
from .convert import DTYPES, NeuralEngineOptions, compress, convert, describe, wrap

# Off macOS coremltools warns at import that Core ML's runtime is missing and that torch 2.13 is untested: known
# (FACTS.md), and not the user's business; errors still show.
if sys.platform != "darwin":
    logging.getLogger("coremltools").setLevel(logging.ERROR)

PACKAGE = "Qwen2.mlpackage"
SIDECAR = "qwen2_coreml.json"
GATE_DECODE_STEPS = 4
# The ONNX gate's prompt (export/onnx is not imported: the Core ML path must not need the onnx extra).
GATE_PROMPT = "def quicksort(items):\n    if len(items) <= 1:\n        return items\n"
LICENSE = "Apache-2.0 (Qwen2 / Qwen2.5 weights; check the license of the checkpoint you converted)"


class ParityError(Qwen2Error):
    """The saved package does not compute what the reference does, beyond the dtype's tolerance."""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def neural_engine_options(profile: devices.DeviceProfile | None) -> NeuralEngineOptions:
    if profile is None:
        return NeuralEngineOptions()
    return NeuralEngineOptions(profile.ane_state_multiple, profile.ane_max_width,
                               profile.coreml_compute_units or "ALL")


def export_coreml(ckpt: Checkpoint, out: Path, dtype: str = "int4", *, context: int | None = None,
                  profile: devices.DeviceProfile | None = None, verify_package: bool = True,
                  overwrite: bool = False, tolerance: Tolerance | None = None) -> dict:
    """Export `ckpt` to `out` (see the module docstring). Builds in a temporary folder beside `out`, runs the
    parity gate on the saved package, and only then moves it into place."""
    if dtype not in DTYPES:
        raise Qwen2Error(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = ckpt.config
    if cfg.is_moe or cfg.dual_chunk_attention_config is not None:
        raise Qwen2Error(f"{ckpt.path}: the Core ML export covers the dense phone-class models (0.5B, 1.5B); "
                         "this checkpoint is MoE or uses Dual Chunk Attention")
    context = context or (profile.default_context if profile else 4096)
    if context > cfg.max_position_embeddings:
        raise Qwen2Error(f"--context {context} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    validate(ckpt.source, cfg)
    need, have = _memory_bytes(cfg), available_memory_bytes()
    if have is not None and need > have:
        raise Qwen2Error(f"converting needs about {need / 2**30:.0f} GiB of memory, {have / 2**30:.0f} GiB is "
                         "available; close other work or use a smaller --size")
    ane = neural_engine_options(profile)
    t0 = time.perf_counter()
    report: dict = {"format": "coreml", "size": ckpt.size, "dtype": dtype, "source": str(ckpt.path),
                    "source_kind": ckpt.kind, "device_profile": profile.name if profile else None,
                    "minimum_deployment_target": "iOS18 / macOS15", "compute_precision": "float16",
                    "context_requested": context, "config": cfg.to_hf_config()}
    with staged_folder(out, overwrite) as tmp:
        status(f"loading {ckpt.path} ...")
        ref = ckpt.load_model(progress=False)
        wrapper = wrap(ref, context, ane)
        t1 = time.perf_counter()
        mlmodel = convert(wrapper)
        report["convert_s"] = round(time.perf_counter() - t1, 2)
        t1 = time.perf_counter()
        mlmodel = compress(mlmodel, dtype)
        report["compress_s"] = round(time.perf_counter() - t1, 2)
        describe(mlmodel, cfg, dtype, wrapper.context, str(ckpt.path), LICENSE)
        report["ops"] = dict(Counter(op.op_type for op in mlmodel._mil_program.functions["main"].operations))
        status(f"saving {PACKAGE} ...")
        t1 = time.perf_counter()
        mlmodel.save(str(tmp / PACKAGE))
        report["save_s"] = round(time.perf_counter() - t1, 2)
        del mlmodel
        report |= {"context": wrapper.context, "state_shape": list(wrapper.keyCache.shape),
                   "lm_head_slices": [list(p.shape) for p in wrapper.lm_head],
                   "export_peak_rss_mib": round(peak_rss_mib())}
        tok = ckpt.tokenizer()
        write_sidecars(tmp, ckpt, tok, dtype, wrapper, ane)
        report["files_mib"] = _sizes(tmp)
        if verify_package:
            report["parity"] = _gate(ckpt, tmp / PACKAGE, ref, wrapper, dtype, tok, tolerance)
        else:
            report["parity"] = {"skipped": "--no-verify"}
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        report["peak_rss_mib"] = round(peak_rss_mib())
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    status(f"exported {out} ({report['files_mib'][PACKAGE]:.0f} MiB package, {report['wall_s']:.0f} s)")
    return report


def write_sidecars(folder: Path, ckpt: Checkpoint, tok: Tokenizer | None, dtype: str, wrapper, ane) -> None:
    cfg = ckpt.config
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config() | {"architectures": ["Qwen2ForCausalLM"]},
                                                   indent=2) + "\n")
    if tok is not None:
        tok.save(folder)
    eos = tok.eos_token_ids if tok is not None else [cfg.eos_token_id]
    shape = list(wrapper.keyCache.shape)
    sidecar = {
        "model": PACKAGE, "architecture": "Qwen2ForCausalLM", "dtype": dtype, "compute_precision": "float16",
        "minimum_deployment_target": "iOS18",
        "context_length": wrapper.context,
        "inputs": {"inputIds": {"shape": [1, "T"], "dtype": "int32", "range": [1, wrapper.context]},
                   "causalMask": {"shape": [1, 1, "T", "past + T"], "dtype": "float16",
                                  "values": {"attend": 0.0, "masked": -1e4}}},
        "outputs": {"logits": {"shape": [1, "T", cfg.vocab_size], "dtype": "float16"}},
        "states": {"keyCache": {"shape": shape, "dtype": "float16",
                                "layout": ["layers", "batch", "kv_heads", "context", "head_dim"]},
                   "valueCache": {"shape": shape, "dtype": "float16",
                                  "layout": ["layers", "batch", "kv_heads", "context", "head_dim"]}},
        "vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id, "eos_token_ids": eos,
        "chat_template": (tok.config.get("chat_template") if tok is not None else None),
        "neural_engine": {"compute_units": ane.compute_units, "state_multiple": ane.state_multiple,
                          "lm_head_max_width": ane.max_width,
                          "lm_head_slices": [list(p.shape) for p in wrapper.lm_head]},
    }
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")


def _gate(ckpt: Checkpoint, package: Path, ref, wrapper, dtype: str, tok: Tokenizer | None,
          tolerance: Tolerance | None) -> dict:
    """The saved package, executed, against the fp32 reference; for compressed weights also against the wrapper
    running the package's own dequantized weights (what remains is fp16 activation rounding)."""
    tol = tolerance or COREML_GATE[dtype]
    top1 = tolerance is not None or not ckpt.random_weights  # random logits: arg-max is noise (as for ONNX)
    prompt = tok.encode(GATE_PROMPT) if tok is not None else \
        torch.randint(0, ckpt.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1234)).tolist()
    status("verifying the saved package against the reference ...")
    model, backend = verify.open_package(package)
    p = verify.check_parity(verify.package_step(model), verify.reference_step(ref), prompt, GATE_DECODE_STEPS,
                            tol, backend, top1)
    result = p.to_dict() | {"scope": "full model", "top1_floor_applied": top1}
    if not p.passed:
        raise ParityError(f"parity gate failed for the {dtype} Core ML export: max |Δ logits| "
                          f"{p.max_abs_logits:.3g} (limit {tol.max_abs_logits}), top-1 agreement "
                          f"{p.top1_agreement:.3f} (floor {tol.min_top1_agreement}); nothing was written")
    status(f"parity: max |Δ logits| {p.max_abs_logits:.2e}, top-1 agreement {p.top1_agreement:.3f}")
    return result


def _memory_bytes(cfg) -> int:
    """fp32 reference + the converter's fp32 and fp16 copies of the weights + room."""
    return int(cfg.num_parameters() * 4 * 2.5 + 2**30)


def _sizes(folder: Path) -> dict[str, float]:
    out = {}
    for p in sorted(folder.iterdir()):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        out[p.name] = round(size / 2**20, 2)
    return out


__all__ = ["export_coreml", "PACKAGE", "SIDECAR", "DTYPES", "ParityError"]
