"""`export_coreml`: the checkpoint built into a stateful Core ML ML Program (program.py), proved on Linux, published.

Output folder:
  Qwen2.mlpackage        the model (iOS 18 / macOS 15): inputIds + causalMask -> logits, states keyCache/valueCache
  tokenizer.json, tokenizer_config.json, config.json   what swift-transformers loads next to a model
  qwen2_coreml.json      sidecar for app code: I/O, state shapes, context, eos, chat template, compute units
  export_report.json     what was done, how long, how much memory, and how close to the reference
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

import devices
from qwen2_ref.checkpoint import Checkpoint
from qwen2_ref.errors import Qwen2Error
from qwen2_ref.progress import status
from qwen2_ref.tokenizer import Tokenizer

from ..gate import GateSubject, ParityError, reference_step
from ..pipeline import run_export
from ..plan import ExportPlan, make_plan
from . import verify
from .convert import NeuralEngineOptions, compress, describe
from .model import head_slices
from .program import Weights, build_program, convert_program

# Off macOS coremltools warns at import that Core ML's runtime is missing (prediction needs macOS; docs/coreml.md)
# and that torch 2.13 is newer than it was tested with: known, and not the user's business; errors still show.
if sys.platform != "darwin":
    logging.getLogger("coremltools").setLevel(logging.ERROR)

PACKAGE = "Qwen2.mlpackage"
SIDECAR = "qwen2_coreml.json"
LICENSE = "Apache-2.0 (Qwen2 / Qwen2.5 weights; check the license of the checkpoint you converted)"


def neural_engine_options(profile: devices.DeviceProfile | None) -> NeuralEngineOptions:
    if profile is None:
        return NeuralEngineOptions()
    return NeuralEngineOptions(profile.ane_state_multiple, profile.ane_max_width,
                               profile.coreml_compute_units or "ALL")


def export_coreml(ckpt: Checkpoint, plan: ExportPlan) -> dict:
    """Export `ckpt` as `plan` says (`make_plan("coreml", ckpt, ...)`; see the module docstring). Builds in a
    temporary folder beside the destination, runs the parity gate on the saved package, then moves it into place."""
    if plan.target != "coreml":
        raise ValueError(f"export_coreml got a {plan.target} plan")
    return run_export(ckpt, plan, CoreMLTarget())


class CoreMLTarget:
    label = "Core ML"

    def check(self, ckpt: Checkpoint, plan: ExportPlan) -> None:
        cfg = ckpt.config
        if cfg.is_moe or cfg.dual_chunk_attention_config is not None:
            raise Qwen2Error(f"{ckpt.path}: the Core ML export covers the dense phone-class models (0.5B, 1.5B); "
                             "this checkpoint is MoE or uses Dual Chunk Attention")
        if plan.gate.batch != 1:
            raise ValueError("a Core ML package runs batch 1: the gate's batch must be 1")
        if plan.precision.compute != torch.float16 or plan.precision.kv_cache != torch.float16:
            raise ValueError(f"{plan.precision.name}: the converter builds fp16 programs (activations, I/O and "
                             "KV-cache states); a Core ML precision must compute in fp16")

    def memory_needed(self, ckpt: Checkpoint, plan: ExportPlan) -> tuple[int, str, str]:
        return (_memory_bytes(ckpt.config, plan), "converting" + (" and the parity gate" if plan.gate.enabled else ""),
                "close other work, pass --no-verify, or use a smaller --size")

    def build(self, ckpt: Checkpoint, plan: ExportPlan, folder: Path, tokenizer) -> dict:
        """The program built from the checkpoint's tensors with the MIL builder (program.py): weights go into
        their stored format one tensor at a time; no float model is traced."""
        prec, cfg = plan.precision, ckpt.config
        ane = neural_engine_options(plan.profile)
        facts: dict = {"minimum_deployment_target": "iOS18 / macOS15", "compute_precision": prec.hf_torch_dtype,
                       "context_requested": plan.context}
        t1 = time.perf_counter()
        calibrated, facts["calibration"] = self._calibrated(ckpt, plan)
        weights = Weights(ckpt.source, prec, requantize=plan.recipe == "requantize", calibrated=calibrated)
        prog, context = build_program(cfg, weights, plan.context, ane.state_multiple, ane.max_width)
        facts["build_s"] = round(time.perf_counter() - t1, 2)
        status(f"converting to a Core ML ML Program (iOS 18, fp16; {cfg.num_hidden_layers} layers, context "
               f"{context}) ...")
        t1 = time.perf_counter()
        mlmodel = convert_program(prog, context, fold_constants=weights.palette)
        del prog
        facts["convert_s"] = round(time.perf_counter() - t1, 2)
        t1 = time.perf_counter()
        mlmodel = compress(mlmodel, prec)  # palettize4 only: the affine formats were built in
        facts["compress_s"] = round(time.perf_counter() - t1, 2)
        describe(mlmodel, cfg, prec.name, context, str(ckpt.path), LICENSE)
        facts["ops"] = dict(Counter(op.op_type for op in mlmodel._mil_program.functions["main"].operations))
        status(f"saving {plan.out}/{PACKAGE} ...")
        t1 = time.perf_counter()
        mlmodel.save(str(folder / PACKAGE))
        facts["save_s"] = round(time.perf_counter() - t1, 2)
        del mlmodel
        slices = head_slices(cfg.vocab_size, ane.max_width)
        state = [cfg.num_hidden_layers, 1, cfg.num_key_value_heads, context, cfg.head_dim]
        facts |= {"context": context, "state_shape": state,
                  "lm_head_slices": [[b - a, cfg.hidden_size] for a, b in slices],
                  "tied_embedding_stored": None if not cfg.tie_word_embeddings else
                  "twice (palettized head slices of their own)" if weights.palette else "once",
                  "weights_mib": round(weights.stored_bytes / 2**20, 1), "weights": weights.report}
        write_sidecars(folder, ckpt, tokenizer(), prec.name, context, state, slices, ane)
        return facts

    @staticmethod
    def _calibrated(ckpt: Checkpoint, plan: ExportPlan) -> tuple[dict, dict | None]:
        """--quantizer calibrated: GPTQ 4-bit for every linear weight (the embedding excepted: a gather has no
        inputs to calibrate against) against the fp32 reference's own inputs; it needs that reference in memory."""
        if plan.recipe != "calibrated":
            return {}, None
        from qwen2_ref.weights import expected_tensors

        from ..calibrate import calibrated_weights
        from ..precision import quantizable

        names = {n for n, shape in expected_tensors(ckpt.config).items()
                 if quantizable(n, shape) and "embed_tokens" not in n}
        results, info = calibrated_weights(ckpt, names, text=plan.calibration)
        return {n: c.quantized for n, c in results.items()}, info

    @contextmanager
    def gate_subject(self, ckpt: Checkpoint, plan: ExportPlan, folder: Path):
        def reference():
            return reference_step(ckpt.load_model(progress=False))  # the step holds the only reference

        def target():
            model, backend = verify.open_package(folder / PACKAGE)
            return verify.package_step(model), backend

        yield GateSubject(reference, target, "full model")


def write_sidecars(folder: Path, ckpt: Checkpoint, tok: Tokenizer | None, dtype: str, context: int,
                   shape: list[int], slices: list[tuple[int, int]], ane) -> None:
    cfg = ckpt.config
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config() | {"architectures": ["Qwen2ForCausalLM"]},
                                                   indent=2) + "\n")
    eos = tok.eos_token_ids if tok is not None else [cfg.eos_token_id]
    sidecar = {
        "model": PACKAGE, "architecture": "Qwen2ForCausalLM", "dtype": dtype, "compute_precision": "float16",
        "minimum_deployment_target": "iOS18",
        "context_length": context,
        "inputs": {"inputIds": {"shape": [1, "T"], "dtype": "int32", "range": [1, context]},
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
                          "lm_head_slices": [[b - a, cfg.hidden_size] for a, b in slices]},
    }
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")


def _memory_bytes(cfg, plan: ExportPlan) -> int:
    """Building holds the stored weights (codes take a byte each in memory until written) plus one tensor in fp32;
    the gate then holds the fp32 reference, and after it the executor's fp32 copy of the package's weights."""
    from ..sizing import weight_bytes

    stored = weight_bytes(cfg, plan.precision)[0]
    biggest = cfg.vocab_size * cfg.hidden_size * 4
    build = 2 * stored + 2 * biggest
    gate = cfg.num_parameters() * 4 if plan.gate.enabled else 0
    return int(max(build, gate) + 2**30)


__all__ = ["export_coreml", "make_plan", "CoreMLTarget", "PACKAGE", "SIDECAR", "ParityError"]
