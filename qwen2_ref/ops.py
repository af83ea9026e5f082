"""The two computations that need their own op: Qwen2-MoE routed experts and Dual Chunk Attention.

Each is a `torch.library` custom op: exact eager code for the reference, and a fake (meta) implementation so
`torch.export` / `torch.onnx.export` see one opaque node that the exporters lower to a custom ONNX op
(function body or ONNX Runtime's fused kernel). Everything else in the model is plain traceable torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("qwen2::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, router_logits: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                down_proj: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """Routed-expert sum of a Qwen2-MoE block.

    x (N, H); router_logits (N, E); gate_proj / up_proj (E, I, H); down_proj (E, H, I) -> (N, H).
    Routing weights: softmax over all E experts in fp32, top-k, renormalized over the k only if
    `norm_topk_prob`, then cast to x's dtype; each expert is a SwiGLU MLP. Only experts that some token picked run,
    so the cost scales with k, not E.
    """
    weights = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, chosen = torch.topk(weights, top_k, dim=-1)  # (N, k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    for e in torch.unique(chosen).tolist():
        tok, slot = torch.where(chosen == e)
        h = x[tok]
        y = F.linear(F.silu(F.linear(h, gate_proj[e])) * F.linear(h, up_proj[e]), down_proj[e])
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


@moe_experts.register_fake
def _(x, router_logits, gate_proj, up_proj, down_proj, top_k, norm_topk_prob):
    return torch.empty_like(x)


@torch.library.custom_op("qwen2::dual_chunk_attention", mutates_args=())
def dual_chunk_attention(q_intra: torch.Tensor, q_succ: torch.Tensor, q_inter: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, allowed: torch.Tensor,
                         chunk_len: int, scale: float) -> torch.Tensor:
    """Dual Chunk Attention over a KV cache (An et al. 2024).

    q_intra / q_succ / q_inter (B, Hq, T, hd): the queries rotated at the intra-, successive- and inter-chunk
    positions; k (B, Hkv, S, hd) rotated at `j mod s`; v (B, Hkv, S, hd); q_pos (B, T) and k_pos (B, S) absolute
    positions; allowed (B, 1, T, S) bool (causal and padding mask). For each (i, j) the score comes from the query
    whose chunk relation matches: same chunk -> intra, previous chunk -> successive, earlier -> inter; then one
    softmax (fp32) over all keys. Returns (B, Hq, T, hd).
    """
    groups = q_intra.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, Hq, S, hd)
    v = v.repeat_interleave(groups, dim=1)
    rel = (q_pos[:, :, None] // chunk_len) - (k_pos[:, None, :] // chunk_len)  # (B, T, S)
    rel = rel[:, None]  # (B, 1, T, S)
    kt = k.transpose(-1, -2)
    scores = torch.where(rel == 0, q_intra @ kt, torch.where(rel == 1, q_succ @ kt, q_inter @ kt))
    return masked_softmax_av(scores * scale, allowed, v)


@dual_chunk_attention.register_fake
def _(q_intra, q_succ, q_inter, k, v, q_pos, k_pos, allowed, chunk_len, scale):
    return torch.empty_like(q_intra)


def masked_softmax_av(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(scores where allowed) @ v, softmax in fp32; a row with no allowed key (a pad query) stays finite."""
    scores = scores.to(torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return probs @ v
