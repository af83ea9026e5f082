"""Dual Chunk Attention: against standard attention inside one chunk, across prefill / decode / chunked prefill,
and against a deliberately plain per-(query, key) implementation of the rules in
README.md's "Dual Chunk Attention" section (An et al. 2024, ChunkLlama)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwen2_ref.checkpoint import random_model
from qwen2_ref.config import DualChunkConfig, RopeScaling, from_name
from qwen2_ref.generate import left_pad
from qwen2_ref.model import _Context
from qwen2_ref.rope import inv_freq_and_scale

from .conftest import FP32_ATOL

CFG = from_name("tiny-dca")  # chunk_size 16, local_size 4 -> chunk length s = 12
S = CFG.dual_chunk_attention_config.chunk_len


def tokens(n, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (batch, n), generator=g)


def test_one_chunk_equals_standard_attention():
    dca = random_model(CFG, seed=3)
    std = random_model(CFG.replace(dual_chunk_attention_config=None), seed=3)
    ids = tokens(S)  # exactly one chunk
    a, _ = dca(ids)
    b, _ = std(ids)
    assert (a - b).abs().max() <= FP32_ATOL


def test_past_one_chunk_differs_from_standard_attention():
    dca = random_model(CFG, seed=3)
    std = random_model(CFG.replace(dual_chunk_attention_config=None), seed=3)
    ids = tokens(3 * S)
    assert (dca(ids)[0][:, S:] - std(ids)[0][:, S:]).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(rope_scaling=RopeScaling("yarn", 4.0, 32)),
                                 CFG.replace(dual_chunk_attention_config=DualChunkConfig(16, 8))],
                         ids=["dca", "dca+yarn", "dca-w-eq-half"])
def test_prefill_decode_and_chunked_prefill_agree(cfg):
    model = random_model(cfg, seed=1)
    n = 5 * S + 7  # spans 6 chunks
    ids = tokens(n, seed=2)
    with torch.no_grad():
        full, _ = model(ids)
        # token by token from an empty cache
        past, steps = None, []
        for t in range(n):
            lg, past = model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]),
                             attention_mask=torch.ones(1, t + 1, dtype=torch.long), past=past)
            steps.append(lg)
        decode = torch.cat(steps, dim=1)
        assert (decode - full).abs().max() <= FP32_ATOL
        # chunked prefill with chunk lengths that do not align with s
        for chunk in (5, 13, 2 * S):
            past, parts = None, []
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                lg, past = model(ids[:, s:e], attention_mask=torch.ones(1, e, dtype=torch.long), past=past)
                parts.append(lg)
            assert (torch.cat(parts, dim=1) - full).abs().max() <= FP32_ATOL, chunk


def test_left_padded_batch_equals_one_by_one():
    model = random_model(CFG, seed=4)
    prompts = [tokens(40, seed=5)[0].tolist(), tokens(27, seed=6)[0].tolist()]
    ids, mask = left_pad(prompts)
    batch, _ = model(ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone, _ = model(torch.tensor([p]))
        assert (batch[i, -len(p):] - alone[0]).abs().max() <= FP32_ATOL


# ---- a plain implementation, one (query, key) pair at a time ---------------------------------------------------
def plain_rotate(x: np.ndarray, pos: int, inv_freq: np.ndarray, scale: float) -> np.ndarray:
    """RoPE of one head vector at one position: pair dim d with d + hd/2 (the NEOX / rotate_half layout)."""
    half = x.shape[0] // 2
    out = np.empty_like(x)
    for d in range(half):
        ang = pos * inv_freq[d]
        c, s = math.cos(ang) * scale, math.sin(ang) * scale
        out[d] = x[d] * c - x[d + half] * s
        out[d + half] = x[d + half] * c + x[d] * s
    return out


def plain_dca(q, k, v, chunk_size, local_size, inv_freq, scale):
    """q (Hq, T, hd), k/v (Hkv, T, hd) unrotated, positions 0..T-1 -> (Hq, T, hd), straight from the formulas."""
    s = chunk_size - local_size
    hq, T, hd = q.shape
    groups = hq // k.shape[0]
    out = np.zeros_like(q)
    for h in range(hq):
        kh, vh = k[h // groups], v[h // groups]
        for i in range(T):
            scores = []
            for j in range(i + 1):
                if j // s == i // s:
                    qp = i % s  # intra-chunk
                elif j // s == i // s - 1:
                    qp = min(i % s + s, chunk_size)  # successive chunk
                else:
                    qp = min(2 * s - 1, chunk_size)  # inter-chunk
                qi = plain_rotate(q[h, i], qp, inv_freq, scale)
                kj = plain_rotate(kh[j], j % s, inv_freq, scale)
                scores.append(float(qi @ kj) / math.sqrt(hd))
            w = np.exp(np.array(scores) - max(scores))
            w /= w.sum()
            out[h, i] = (w[:, None] * vh[: i + 1]).sum(0)
    return out


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(rope_scaling=RopeScaling("yarn", 4.0, 32))], ids=["dca", "dca+yarn"])
def test_attention_matches_plain_formulas(cfg):
    model = random_model(cfg, seed=7)
    attn = model.model.layers[0].self_attn
    T = 5 * S + 3  # spans 6 chunks
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, T, cfg.hidden_size, generator=g)
    pos = torch.arange(T)[None]
    mask = torch.ones(1, T, dtype=torch.long)
    inv_freq, rscale = inv_freq_and_scale(cfg)
    ctx = _Context(cfg, inv_freq, rscale, pos, mask, 0)
    empty = (torch.zeros(1, cfg.num_key_value_heads, 0, cfg.head_dim),) * 2
    with torch.no_grad():
        ours, _ = attn(x, ctx, empty)
        q = attn.q_proj(x).view(T, cfg.num_attention_heads, cfg.head_dim).transpose(0, 1).double().numpy()
        k = attn.k_proj(x).view(T, cfg.num_key_value_heads, cfg.head_dim).transpose(0, 1).double().numpy()
        v = attn.v_proj(x).view(T, cfg.num_key_value_heads, cfg.head_dim).transpose(0, 1).double().numpy()
        dca = cfg.dual_chunk_attention_config
        o = plain_dca(q, k, v, dca.chunk_size, dca.local_size, inv_freq.double().numpy(), rscale)
        ref = attn.o_proj(torch.from_numpy(o).float().transpose(0, 1).reshape(1, T, -1))
    assert (ours - ref).abs().max() <= FP32_ATOL
