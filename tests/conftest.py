"""Shared test runner pieces: tiny random Hugging Face checkpoints and the tolerances the tests assert."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qwen2_ref.config import ModelArgs, from_name

os.environ.setdefault("QWEN2_QUIET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

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
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF (REAL_MODEL.md), fetched once into the user cache, sha256-checked."""
    from qwen2_ref.hub import fetch_real_model

    return fetch_real_model()


@pytest.fixture(scope="session")
def real_checkpoint(real_gguf):
    from qwen2_ref.checkpoint import open_checkpoint

    return open_checkpoint(real_gguf)


@pytest.fixture(scope="session")
def real_model(real_checkpoint):
    return real_checkpoint.load_model(progress=False)


@pytest.fixture(scope="session")
def real_tokenizer(real_checkpoint):
    return real_checkpoint.tokenizer()
