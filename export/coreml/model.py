"""The Core ML program's math as a torch module over the reference's weights: the readable fp32 statement of what
program.py writes op for op with the MIL builder (the package is no longer traced from it). The tests check it
against the reference in fp32, and run it with a package's own dequantized weights as the tight check of the
package (verify.dequantized_wrapper).

What differs from `qwen2_ref.model` (the math does not):
- the KV cache is two registered buffers, `keyCache` / `valueCache` (layers, 1, kv_heads, context, head_dim), that
  the converter turns into Core ML states; each step writes its new keys/values into them in place (slice update);
- positions come from the shapes, as swift-transformers does: `causalMask` is (1, 1, T, end) with end = past + T,
  so the new tokens occupy cache slots past .. end-1;
- RoPE cos/sin are constant tables (context, head_dim): no in-graph `1 / x` (MIL `inverse` has epsilon 1e-4);
- attention is one fused `scaled_dot_product_attention` with the additive mask the caller passes (finite values);
- RMSNorm is computed as LayerNorm over [x, -x] (mean 0, so the variance is mean(x²)): the fused op keeps the
  squares out of fp16, where Qwen2's large residual activations would overflow;
- the LM head is split into slices no wider than the Neural Engine allows, concatenated into one `logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2_ref import rope
from qwen2_ref.model import Qwen2ForCausalLM


def padded(n: int, multiple: int | None) -> int:
    m = multiple or 1
    return -(-n // m) * m


def head_slices(vocab: int, max_width: int | None) -> list[tuple[int, int]]:
    """Equal-width (start, stop) slices of the vocabulary, each at most `max_width` wide."""
    if not max_width or vocab <= max_width:
        return [(0, vocab)]
    n = -(-vocab // max_width)
    bounds = [round(i * vocab / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class StatefulQwen2(nn.Module):
    def __init__(self, ref: Qwen2ForCausalLM, context: int, state_multiple: int | None = None,
                 head_width: int | None = None):
        super().__init__()
        cfg = ref.config
        if cfg.is_moe or cfg.dual_chunk_attention_config is not None:
            raise ValueError("the Core ML export covers dense Qwen2 without Dual Chunk Attention")
        self.cfg, self.ref = cfg, ref
        self.context = padded(context, state_multiple)
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, self.context, cfg.head_dim)
        self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float16))
        cos, sin = rope.rope_tables(cfg, self.context)  # (context, hd)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # The head's slices as parameters of their own (copies): the package's head reads row slices of its one
        # table; verify.dequantized_wrapper fills these from it.
        w = ref.lm_head.weight.detach()
        self.lm_head = nn.ParameterList(nn.Parameter(w[a:b].clone(), requires_grad=False)
                                        for a, b in head_slices(cfg.vocab_size, head_width))

    def forward(self, inputIds: torch.Tensor, causalMask: torch.Tensor) -> torch.Tensor:  # noqa: N803 (I/O names)
        """inputIds (1, T) int32; causalMask (1, 1, T, end) additive, end = past + T. Returns logits (1, T, vocab)."""
        T, end = inputIds.shape[-1], causalMask.shape[-1]
        past = end - T
        cos = self.rope_cos[past:end][None, None]  # (1, 1, T, hd)
        sin = self.rope_sin[past:end][None, None]
        x = self.ref.model.embed_tokens(inputIds)  # (1, T, H)
        for i, layer in enumerate(self.ref.model.layers):
            x = x + self._attention(i, layer.self_attn, _rms(layer.input_layernorm, x), cos, sin, causalMask,
                                    past, end)
            x = x + layer.mlp(_rms(layer.post_attention_layernorm, x))
        x = _rms(self.ref.model.norm, x)
        return torch.cat([F.linear(x, w) for w in self.lm_head], dim=-1)  # (1, T, vocab)

    def _attention(self, i, attn, x, cos, sin, mask, past, end):
        B, T, _ = x.shape
        hq, hkv, hd = attn.n_heads, attn.n_kv, attn.head_dim
        q = attn.q_proj(x).view(B, T, hq, hd).transpose(1, 2)  # (1, Hq, T, hd)
        k = attn.k_proj(x).view(B, T, hkv, hd).transpose(1, 2)  # (1, Hkv, T, hd)
        v = attn.v_proj(x).view(B, T, hkv, hd).transpose(1, 2)
        q = q * cos + rope.rotate_half(q) * sin
        k = k * cos + rope.rotate_half(k) * sin
        self.keyCache[i, :, :, past:end, :] = k.to(self.keyCache.dtype)  # in place: slots past..end-1 of layer i
        self.valueCache[i, :, :, past:end, :] = v.to(self.valueCache.dtype)
        keys = self.keyCache[i, :, :, :end].to(q.dtype)  # (1, Hkv, end, hd)
        values = self.valueCache[i, :, :, :end].to(q.dtype)
        groups = hq // hkv
        keys = keys[:, :, None].expand(B, hkv, groups, end, hd).reshape(B, hq, end, hd)  # (1, Hq, end, hd)
        values = values[:, :, None].expand(B, hkv, groups, end, hd).reshape(B, hq, end, hd)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype))  # (1, Hq, T, hd)
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, hq * hd))  # (1, T, Hq*hd)


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm as LayerNorm of [x, -x]: identical in exact arithmetic, fused (no fp16 squares) in Core ML."""
    H = x.shape[-1]
    y = F.layer_norm(torch.cat([x, -x], dim=-1), (2 * H,), eps=norm.eps)
    return norm.weight * y[..., :H]


def causal_mask(past: int, T: int, dtype=torch.float32, masked: float = -1e4) -> torch.Tensor:
    """(1, 1, T, past + T): 0 where query t may attend slot s (s <= past + t), `masked` elsewhere (finite)."""
    s = torch.arange(past + T)[None, :]
    t = torch.arange(T)[:, None] + past
    return torch.where(s <= t, 0.0, masked).to(dtype)[None, None]
