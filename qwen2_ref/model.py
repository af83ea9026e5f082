"""The Qwen2 / Qwen2-MoE reference: exact eager math, traceable for export.

Ordered like the forward pass: norm -> attention -> MLP -> MoE -> block -> model. Parameter names are Hugging Face's
(`model.layers.N.self_attn.q_proj.weight`) except the routed experts, which are stacked per layer
(`model.layers.N.mlp.experts.gate_proj` (E, I, H)); `weights.py` maps the per-expert checkpoint tensors into them.

The KV cache is a value: `forward(input_ids, position_ids, attention_mask, past) -> (logits, present)` where
past / present are tuples of (key, value) per layer, each (B, n_kv, S, head_dim), keys already rotated.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, rope
from .config import ModelArgs

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the model dtype, as transformers does.
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.scale = self.head_dim ** -0.5
        self.dca = cfg.dual_chunk_attention_config

    def forward(self, x: torch.Tensor, ctx: "_Context", past: KV) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        k = rope.apply_rope(k, *ctx.k_rope)
        k = torch.cat([past[0], k], dim=2)  # (B, Hkv, S, hd)
        v = torch.cat([past[1], v], dim=2)
        if self.dca is None:
            out = self._attend(rope.apply_rope(q, *ctx.q_rope[0]), k, v, ctx.allowed)
        else:
            qs = [rope.apply_rope(q, *cs) for cs in ctx.q_rope]
            out = ops.dual_chunk_attention(*qs, k, v, ctx.q_pos, ctx.k_pos, ctx.allowed,
                                           self.dca.chunk_len, self.scale)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, Hq*hd)
        return self.o_proj(out), (k, v)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        groups = self.n_heads // self.n_kv
        k = k.repeat_interleave(groups, dim=1)  # (B, Hq, S, hd)
        v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, Hq, T, S)
        return ops.masked_softmax_av(scores, allowed, v)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """The routed experts of one layer, stacked: gate/up (E, I, H), down (E, H, I)."""

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)


class SparseMoE(nn.Module):
    """Qwen2-MoE block: routed top-k experts plus a sigmoid-gated shared expert."""

    def __init__(self, cfg: ModelArgs):
        super().__init__()
        h = cfg.hidden_size
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(h, cfg.num_experts, bias=False)  # router
        self.experts = Experts(cfg.num_experts, h, cfg.moe_intermediate_size)
        self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(B * T, H)  # (N, H)
        routed = ops.moe_experts(flat, self.gate(flat), self.experts.gate_proj, self.experts.up_proj,
                                 self.experts.down_proj, self.top_k, self.norm_topk_prob)
        shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return (routed + shared).reshape(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArgs, idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if cfg.is_sparse_layer(idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: "_Context", past: KV) -> tuple[torch.Tensor, KV]:
        a, present = self.self_attn(self.input_layernorm(x), ctx, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present


class _Context:
    """What every layer shares in one forward: RoPE tables, masks and positions."""

    def __init__(self, cfg: ModelArgs, inv_freq: torch.Tensor, rope_scale: float, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor, past_len: int | torch.Tensor):
        T = position_ids.shape[1]
        S = attention_mask.shape[1]
        self.position_ids, self.attention_mask = position_ids, attention_mask  # for fused-kernel exports
        key_valid = attention_mask.to(torch.bool)  # (B, S)
        q_slot = torch.arange(T, device=position_ids.device) + past_len  # (T,) cache slot of each query
        causal = torch.arange(S, device=position_ids.device)[None, :] <= q_slot[:, None]  # (T, S)
        self.allowed = causal[None, None] & key_valid[:, None, None, :]  # (B, 1, T, S)
        dca = cfg.dual_chunk_attention_config
        if dca is None:
            self.q_rope = [rope.cos_sin(inv_freq, rope_scale, position_ids)]
            self.k_rope = self.q_rope[0]
        else:
            # Key positions from the mask (left padding: the first real token is position 0), as in generation.
            self.k_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
            self.q_pos = position_ids
            self.q_rope = [rope.cos_sin(inv_freq, rope_scale, p)
                           for p in rope.dca_query_positions(position_ids, dca.chunk_size, dca.local_size)]
            self.k_rope = rope.cos_sin(inv_freq, rope_scale,
                                       rope.dca_key_positions(position_ids, dca.chunk_size, dca.local_size))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelArgs):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        inv_freq, self._rope_scale = rope.inv_freq_and_scale(cfg)
        # A buffer, so a trace on the meta device keeps it as a named initializer (`rope_inv_freq`) to fill later.
        self.register_buffer("rope_inv_freq", inv_freq.to(self.lm_head.weight.device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.rope_inv_freq.dtype != torch.float32:  # a dtype cast (e.g. .half()) must not round the frequencies
            self.init_buffers()
        return self

    def init_buffers(self) -> None:
        """Recompute non-checkpoint buffers (after `to_empty`, which leaves them uninitialized)."""
        self.rope_inv_freq = rope.inv_freq_and_scale(self.config)[0].to(self.rope_inv_freq.device)

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (again after `to_empty`, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def empty_past(self, batch: int) -> tuple[KV, ...]:
        cfg, p = self.config, next(self.parameters())
        shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        return tuple((p.new_zeros(shape), p.new_zeros(shape)) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, past: Optional[Sequence[KV]] = None,
                logits_to_keep: int = 0) -> tuple[torch.Tensor, tuple[KV, ...]]:
        """input_ids (B, T); attention_mask (B, past + T) of 1/0 (left padding); position_ids (B, T).

        Returns logits (B, T, vocab) — or only the last `logits_to_keep` positions — and the new cache.
        """
        B, T = input_ids.shape
        if past is None:
            past = self.empty_past(B)
        P = past[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, T)
        ctx = _Context(self.config, self.rope_inv_freq, self._rope_scale, position_ids,
                       attention_mask, P)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        present = []
        for layer, kv in zip(self.model.layers, past):
            x, kv = layer(x, ctx, kv)
            present.append(kv)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x), tuple(present)


def default_position_ids(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Positions of the last `new_tokens` slots: count of real tokens before each (left padding -> 0 at first real)."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, -new_tokens:]
