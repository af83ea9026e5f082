"""Device profiles as data (`profiles.toml`): runtime, precision, context and session settings per target."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from qwen2_ref.config import ModelArgs
from qwen2_ref.errors import Qwen2Error

_FILE = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    runtime: str  # "onnx" | "coreml"
    memory_gib: float
    bandwidth_gbs: float
    default_dtype: str
    default_context: int
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0  # 0: ONNX Runtime's default
    onnx_lowering: str = "fused"  # ONNX export: "fused" (ORT contrib kernels) or "function" (portable)
    prefill_chunk: int = 0  # runner: prompt tokens per forward step (bounds attention memory); 0: whole prompt
    coreml_compute_units: str | None = None
    ane_state_multiple: int | None = None
    ane_max_width: int | None = None
    extra: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def profiles() -> dict[str, DeviceProfile]:
    data = tomllib.loads(_FILE.read_text())
    out = {}
    for name, d in data.items():
        d = dict(d)
        if "execution_providers" in d:
            d["execution_providers"] = tuple(d["execution_providers"])
        out[name] = DeviceProfile(name=name, **d)
    return out


def get(name: str) -> DeviceProfile:
    p = profiles()
    if name not in p:
        raise Qwen2Error(f"unknown device profile {name!r}; valid: {', '.join(p)}")
    return p[name]


# ---- memory and speed estimates -----------------------------------------------------------------------------
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int4": 0.5 + 4 / 32 + 0.5 / 32}  # int4: codes + fp32 scale + zp


def weight_bytes(cfg: ModelArgs, dtype: str) -> tuple[float, float]:
    """(bytes stored, bytes read per decoded token). int4 keeps the embedding table in float (a gather reads one
    row); MoE reads only the top-k routed experts per token."""
    h, v = cfg.hidden_size, cfg.vocab_size
    total = cfg.num_parameters()
    embed = v * h
    per_param = BYTES_PER_PARAM[dtype]
    emb_bytes = embed * (4.0 if dtype in ("fp32", "int4") else 2.0)
    tied = cfg.tie_word_embeddings
    body = total - embed  # includes an untied head
    stored = emb_bytes + body * per_param + (embed * per_param if tied and dtype == "int4" else 0)
    read = body * per_param + (embed * per_param if tied else 0)
    if cfg.is_moe:
        inactive = cfg.num_experts - cfg.num_experts_per_tok
        sparse_layers = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers))
        read -= sparse_layers * inactive * 3 * h * cfg.moe_intermediate_size * per_param
    return stored, read


def kv_bytes(cfg: ModelArgs, dtype: str, context: int, batch: int = 1) -> float:
    kv_dtype = 2.0 if dtype == "fp16" else 4.0
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * batch * kv_dtype


def plan(cfg: ModelArgs, profile: DeviceProfile, dtype: str, context: int) -> dict:
    stored, read = weight_bytes(cfg, dtype)
    kv = kv_bytes(cfg, dtype, context)
    total = stored + kv
    budget = profile.memory_gib * 2**30
    bw = profile.bandwidth_gbs * 1e9
    return {"weights_gib": stored / 2**30, "kv_cache_gib": kv / 2**30, "total_gib": total / 2**30,
            "budget_gib": profile.memory_gib, "fits": total <= budget,
            "decode_bound_short_tok_s": bw / read, "decode_bound_full_context_tok_s": bw / (read + kv)}
