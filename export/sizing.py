"""Will it fit, and how fast can it decode? Sizes of an export computed tensor by tensor from the config, with the
rules the exporters store weights by, so `python -m export plan` agrees with what an export writes.

Rules (the lowerings in export/onnx and export/coreml):
- a quantized precision stores every 2-D linear weight and the embedding in its `WeightFormat`; the MoE routers
  (`mlp.gate`, `shared_expert_gate`) stay float;
- ONNX: routed experts are quantized only by the fused lowering (QMoE); a tied embedding and head are stored once;
- Core ML: a tied table is stored once (the head's slices are views of it), except palettized packages, whose head
  slices are constants of their own.
A GGUF source exported with its own blocks kept (the ONNX int4 default) stores its 5/6/8-bit tensors as 8-bit codes
and so comes out larger than these 4-bit figures; `--requantize` gives them.
"""

from __future__ import annotations

import math

import torch

from devices import DeviceProfile
from qwen2_ref.config import ModelArgs
from qwen2_ref.rope import max_positions
from qwen2_ref.weights import expected_tensors

from .precision import Precision, quantizable


def _compressed(name: str, shape: tuple[int, ...], precision: Precision, lowering: str | None) -> bool:
    if not precision.quantized or not quantizable(name, shape):
        return False
    if ".mlp.experts." in name and precision.target == "onnx":
        block = precision.weights.block or 1
        return lowering == "fused" and shape[0] % block == 0 and shape[1] % block == 0
    return True


def _bytes(name: str, shape: tuple[int, ...], precision: Precision, lowering: str | None) -> float:
    if _compressed(name, shape, precision, lowering):
        return precision.weights.stored_bytes(shape[0], shape[1])
    return precision.float_bytes(math.prod(shape))


def weight_bytes(cfg: ModelArgs, precision: Precision, lowering: str | None = "fused") -> tuple[float, float]:
    """(bytes stored, bytes of weights read per decoded token). The embedding is a gather (one row per token); a
    MoE layer reads its top-k routed experts only."""
    tensors = expected_tensors(cfg)
    stored = read = 0.0
    embed = "model.embed_tokens.weight"
    for name, shape in tensors.items():
        b = _bytes(name, shape, precision, lowering)
        stored += b
        if name != embed:
            read += b
    head = _bytes(embed, tensors[embed], precision, lowering)
    if cfg.tie_word_embeddings:
        read += head  # the head is the embedding table, read whole every token
        if precision.target == "coreml" and precision.weights is not None and precision.weights.scheme == "palette":
            stored += head  # palettized Core ML packages keep the head's slices as constants of their own
    if cfg.is_moe:
        inactive = cfg.num_experts - cfg.num_experts_per_tok
        for i in range(cfg.num_hidden_layers):
            if cfg.is_sparse_layer(i):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    n = f"model.layers.{i}.mlp.experts.0.{proj}.weight"
                    read -= inactive * _bytes(n, tensors[n], precision, lowering)
    if precision.target == "onnx" and lowering == "fused" and cfg.dual_chunk_attention_config is None:
        stored += precision.float_bytes(2 * max_positions(cfg) * cfg.head_dim // 2)  # GQA's cos/sin caches
    return stored, read


def kv_bytes(cfg: ModelArgs, precision: Precision, context: int, batch: int = 1) -> float:
    per = torch.empty((), dtype=precision.kv_cache).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * batch * per


def fit(cfg: ModelArgs, profile: DeviceProfile, precision: Precision, context: int,
        lowering: str | None = "fused") -> dict:
    """Memory (weights + KV cache at `context`) against the profile's budget, and decode-speed upper bounds from
    its bandwidth (decoding is bandwidth-bound: tok/s <= bandwidth / bytes read per token)."""
    stored, read = weight_bytes(cfg, precision, lowering)
    kv = kv_bytes(cfg, precision, context)
    total = stored + kv
    bw = profile.bandwidth_gbs * 1e9
    return {"weights_gib": stored / 2**30, "kv_cache_gib": kv / 2**30, "total_gib": total / 2**30,
            "budget_gib": profile.memory_gib, "fits": total <= profile.memory_gib * 2**30,
            "decode_bound_short_tok_s": bw / read, "decode_bound_full_context_tok_s": bw / (read + kv)}
