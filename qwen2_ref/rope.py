"""Rotary position embeddings: one factory for default RoPE and YaRN, and the Dual Chunk Attention positions."""

from __future__ import annotations

import math

import torch

from .config import ModelArgs


def inv_freq_and_scale(cfg: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in fp32 and the factor cos/sin are multiplied by.

    YaRN follows transformers 4.57.6 `_compute_yarn_parameters`: a linear ramp between the dims found from
    beta_fast / beta_slow at `original_max_position_embeddings` blends interpolated (÷ factor) and extrapolated
    frequencies; cos/sin are scaled by 0.1 · ln(factor) + 1.
    """
    dim, base = cfg.head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    if rs.rope_type != "yarn":
        raise ValueError(f"unknown rope_type {rs.rope_type!r}")
    factor = rs.factor
    attn_factor = rs.attention_factor
    if attn_factor is None:
        attn_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 where the dim keeps its original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


def cos_sin(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (B, T, head_dim) in fp32 for integer positions (B, T)."""
    freqs = positions[..., None].to(torch.float32) * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos() * scale, emb.sin() * scale


def max_positions(cfg: ModelArgs) -> int:
    """The longest position a table must cover: the context, or YaRN's extended one if that is longer."""
    rs = cfg.rope_scaling
    longest = cfg.max_position_embeddings
    if rs is not None:
        longest = max(longest, int(rs.original_max_position_embeddings * rs.factor))
    return longest


def rope_tables(cfg: ModelArgs, rows: int, half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant cos/sin tables for positions 0 .. rows-1 in fp32, YaRN's attention factor folded in.

    (rows, head_dim) for an exporter that rotates with them as they are (Core ML), or with `half` the
    (rows, head_dim / 2) form that ONNX Runtime's GroupQueryAttention takes as its cos/sin caches."""
    inv_freq, scale = inv_freq_and_scale(cfg)
    cos, sin = cos_sin(inv_freq, scale, torch.arange(rows)[None])  # (1, rows, hd)
    if half:
        return cos[0, :, : inv_freq.shape[0]].contiguous(), sin[0, :, : inv_freq.shape[0]].contiguous()
    return cos[0], sin[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by cos/sin (B, T, hd) — NEOX / HF `rotate_half` layout."""
    cos = cos[:, None].to(x.dtype)  # (B, 1, T, hd)
    sin = sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def dca_query_positions(positions: torch.Tensor, chunk_size: int, local_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three query positions of Dual Chunk Attention for absolute positions (B, T).

    With chunk length s = c - w: intra-chunk `i mod s`, successive-chunk `min(i mod s + s, c)`,
    inter-chunk the constant `min(2s - 1, c)`. Keys are rotated at `j mod s` (see `dca_key_positions`).
    """
    s = chunk_size - local_size
    intra = positions % s
    succ = torch.clamp(intra + s, max=chunk_size)
    inter = torch.full_like(positions, min(2 * s - 1, chunk_size))
    return intra, succ, inter


def dca_key_positions(positions: torch.Tensor, chunk_size: int, local_size: int) -> torch.Tensor:
    return positions % (chunk_size - local_size)
