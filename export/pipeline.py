"""The spine every export runs on: check the input, build into a hidden temporary folder beside the destination,
prove it against the reference (one gate), write the report, then publish it by renaming (export/output.py).

A target (ONNX, Core ML) supplies only what differs: what it refuses, the memory it needs, how it writes its files,
and a step function over what it wrote (`GateSubject`). Everything else is here, once.
"""

from __future__ import annotations

import functools
import json
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Protocol

from qwen2_ref.checkpoint import Checkpoint
from qwen2_ref.memory import peak_rss_mib
from qwen2_ref.progress import status
from qwen2_ref.tokenizer import Tokenizer
from qwen2_ref.weights import validate

from .gate import GateSubject, gate_prompts, require_memory, run_gate
from .output import REPORT, staged_folder
from .plan import ExportPlan
from .sizing import weight_bytes



class Target(Protocol):
    label: str  # "ONNX", "Core ML": how messages name the export

    def check(self, ckpt: Checkpoint, plan: ExportPlan) -> None:
        """Refuse, with a Qwen2Error, what this target cannot export (before any work)."""

    def memory_needed(self, ckpt: Checkpoint, plan: ExportPlan) -> tuple[int, str, str] | None:
        """(bytes, what needs them, what the user can do) when the export needs much memory, else None."""

    def build(self, ckpt: Checkpoint, plan: ExportPlan, folder: Path,
              tokenizer: Callable[[], Tokenizer | None]) -> dict:
        """Write the export into `folder`; return facts for the report. `tokenizer()` builds the checkpoint's
        tokenizer once (a GGUF's takes seconds), for a target that needs it while building."""

    def gate_subject(self, ckpt: Checkpoint, plan: ExportPlan, folder: Path
                     ) -> AbstractContextManager[GateSubject]:
        """The reference and a step over the saved export in `folder`, for the gate."""


def run_export(ckpt: Checkpoint, plan: ExportPlan, target: Target) -> dict:
    """Export `ckpt` as `plan` says; returns the report (also written to `export_report.json` in the folder)."""
    cfg = ckpt.config
    inputs = () if ckpt.kind == "random" else (ckpt.path,)
    # Every check that can fail fast, before any work: the destination (staged_folder: not the input, writable,
    # room for the estimated size), names and shapes, what the target refuses, memory, the tokenizer.
    with staged_folder(plan.out, plan.overwrite, inputs, weight_bytes(cfg, plan.precision, plan.lowering)[0]) as tmp:
        validate(ckpt.source, cfg)
        target.check(ckpt, plan)
        need = target.memory_needed(ckpt, plan)
        if need is not None:
            require_memory(*need)
        tokenizer = functools.cache(ckpt.tokenizer)
        if tokenizer() is None:  # said before the work: the export will not generate text from a prompt
            what = "random weights have" if ckpt.kind == "random" else f"{ckpt.path} has"
            status(f"note: {what} no tokenizer: the export runs on token ids, but `qwen2-run generate` and "
                   "onnxruntime-genai's Tokenizer need one to turn text into ids")
        t0 = time.perf_counter()
        report: dict = {"format": plan.target, "size": ckpt.size, "model_type": cfg.model_type,
                        "dtype": plan.precision.name, "activations": plan.precision.activations,
                        "source": str(ckpt.path), "source_kind": ckpt.kind,
                        "device_profile": plan.profile.name if plan.profile else None, "context": plan.context,
                        "plan": plan.describe(), "config": cfg.to_hf_config()}
        report |= target.build(ckpt, plan, tmp, tokenizer)
        report["export_peak_rss_mib"] = round(peak_rss_mib())
        tok = tokenizer()
        if tok is not None:
            tok.save(tmp)
        report["files_mib"] = folder_sizes_mib(tmp)
        if plan.gate.enabled:
            # Random weights give near-flat logits whose arg-max is noise: their gate holds the logit bound only,
            # unless the caller chose the tolerance (the tests do, on tiny models where the arg-max is meaningful).
            top1 = plan.gate.tolerance is not None or not ckpt.random_weights
            prompts = gate_prompts(cfg.vocab_size, tok, plan.gate.batch)
            report["parity"] = run_gate(target.gate_subject(ckpt, plan, tmp), prompts, plan.tolerance, top1,
                                        f"{plan.precision.label} {target.label} export")
        else:
            report["parity"] = {"skipped": "--no-verify"}
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        report["peak_rss_mib"] = round(peak_rss_mib())
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    status(f"exported {plan.out} ({sum(report['files_mib'].values()):.0f} MiB, {report['wall_s']:.0f} s)")
    return report


def folder_sizes_mib(folder: Path) -> dict[str, float]:
    """Each entry of `folder` (a package folder counted whole) in MiB."""
    out = {}
    for p in sorted(folder.iterdir()):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        out[p.name] = round(size / 2**20, 2)
    return out
