"""Fused lowerings onto ONNX Runtime's contrib kernels (`--lowering fused`).

- Attention -> `com.microsoft.GroupQueryAttention` with rotary fused (`do_rotary=1`, cos/sin tables as
  initializers, explicit `position_ids`). Two layouts of a padded batch: "bias" (optimum's left padding: the
  padding mask as `attention_bias`, and `query_seqlens` so a batch of multi-token chunks with a cache runs on CPU)
  and "seqlens" (per-row lengths from the mask, no bias: what ORT's fast CUDA attention paths take). Done at
  trace time: the decoder's attention modules are swapped for `FusedAttention`, which calls one torch custom op
  that the exporter translates to the GQA node. Layers with Dual Chunk Attention keep our `qwen2.DualChunkAttention` op.
- Routed experts `qwen2.MoE` -> `com.microsoft.MoE` (SwiGLU with gate/up rows interleaved in fc1,
  `swiglu_fusion=1`; `normalize_routing_weights` = `norm_topk_prob`; softmax and top-k inside the kernel). A graph
  pass; the interleaved fc1 tensor is streamed from the checkpoint's gate and up tensors expert by expert.
- RMSNorm -> `SimplifiedLayerNormalization`, and residual Add + RMSNorm -> `SkipSimplifiedLayerNormalization`
  (graph passes in fuse.py).

The function-body form (standard ops + our `qwen2` domain) stays the portable default for other runtimes; both
forms pass the same parity tests.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset21 as op

from qwen2_ref import rope
from qwen2_ref.model import Attention, Qwen2ForCausalLM
from qwen2_ref.ops import masked_softmax_av

from ..quant import QuantSpec
from . import custom_ops
from .irutil import MS_DOMAIN, initializer, node, replace
from .linears import ACCURACY_LEVEL, WeightKind, WeightUse

COS_CACHE, SIN_CACHE = "rope_cos_cache", "rope_sin_cache"


# ---- attention: a torch op that exports as GroupQueryAttention --------------------------------------------------
@torch.library.custom_op("qwen2_fused::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                          past_v: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                          cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int, kv_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ORT's GroupQueryAttention computes here, in torch (for checking the swap in eager).

    q (B, T, Hq·d), k / v (B, T, Hkv·d) unrotated; past (B, Hkv, P, d) rotated; position_ids (B, T);
    attention_mask (B, P + T) 1/0; cos/sin caches (max_pos, d/2) with the RoPE scale folded in.
    Returns out (B, T, Hq·d) and present key/value (B, Hkv, P + T, d).
    """
    B, T, _ = q.shape
    d = past_k.shape[-1]
    cos = cos_cache[position_ids].repeat(1, 1, 2)  # (B, T, d)
    sin = sin_cache[position_ids].repeat(1, 1, 2)
    q = rope.apply_rope(q.view(B, T, num_heads, d).transpose(1, 2), cos, sin)
    k = rope.apply_rope(k.view(B, T, kv_heads, d).transpose(1, 2), cos, sin)
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v.view(B, T, kv_heads, d).transpose(1, 2)], dim=2)
    S, P = k.shape[2], past_k.shape[2]
    causal = torch.arange(S)[None, :] <= (torch.arange(T) + P)[:, None]
    allowed = causal[None, None] & attention_mask.to(torch.bool)[:, None, None, :]
    groups = num_heads // kv_heads
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scale
    out = masked_softmax_av(scores, allowed, v.repeat_interleave(groups, 1))
    return out.transpose(1, 2).reshape(B, T, num_heads * d), k, v


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, position_ids, attention_mask, cos_cache, sin_cache, num_heads, kv_heads, scale):
    B, T, _ = q.shape
    S = past_k.shape[2] + T
    shape = (B, kv_heads, S, past_k.shape[-1])
    return q.new_empty(q.shape), past_k.new_empty(shape), past_v.new_empty(shape)


class FusedAttention(Attention):
    """Projections as in the reference; rotary + cache update + attention in one GroupQueryAttention node."""

    def forward(self, x, ctx, past):
        root = self._root[0]
        out, k, v = group_query_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), past[0], past[1],
                                          ctx.position_ids, ctx.attention_mask, root.rope_cos_cache,
                                          root.rope_sin_cache, self.n_heads, self.n_kv, self.scale)
        return self.o_proj(out), (k, v)


def use_fused_attention(model: Qwen2ForCausalLM) -> int:
    """Swap the attention of every non-DCA layer for FusedAttention; returns how many were swapped."""
    cfg = model.config
    if cfg.dual_chunk_attention_config is not None:
        return 0
    p = next(model.parameters())
    shape = (rope.max_positions(cfg), cfg.head_dim // 2)
    model.register_buffer(COS_CACHE, torch.zeros(shape, dtype=p.dtype, device=p.device), persistent=False)
    model.register_buffer(SIN_CACHE, torch.zeros(shape, dtype=p.dtype, device=p.device), persistent=False)
    if p.device.type != "meta":
        cos, sin = rope.rope_tables(cfg, shape[0], half=True)
        model.rope_cos_cache.copy_(cos)
        model.rope_sin_cache.copy_(sin)
    for layer in model.model.layers:
        layer.self_attn.__class__ = FusedAttention
        layer.self_attn._root = [model]  # a plain list: not a submodule
    return len(model.model.layers)


_ms = onnxscript.values.Opset(MS_DOMAIN, 1)
_FLOAT_MIN = {1: -3.4028234663852886e38, 10: -30000.0}  # fp16: finite and far below any score


def _gqa(q, k, v, past_k, past_v, position_ids, attention_mask, cos_cache, sin_cache, num_heads: int,
         kv_heads: int, scale: float):
    b = op.Shape(attention_mask, start=0, end=1)
    total = op.Shape(attention_mask, start=1, end=2)
    t = op.Shape(q, start=1, end=2)
    seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), b), to=6)  # (B,) int32
    total_len = op.Cast(op.Squeeze(total), to=6)
    query_seqlens = op.Cast(op.Expand(t, b), to=6)
    valid = op.Cast(op.Unsqueeze(attention_mask, op.Constant(value_ints=[1, 2])), to=9)  # (B, 1, 1, S)
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    neg = op.CastLike(op.Constant(value_float=_FLOAT_MIN[10 if q.dtype == ir.DataType.FLOAT16 else 1]), q)
    bias = op.Expand(op.Where(valid, zero, neg), op.Concat(b, op.Constant(value_ints=[1]), t, total, axis=0))
    return _ms.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                                   position_ids, bias, None, None, None, None, None, query_seqlens,
                                   num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, scale=float(scale),
                                   _outputs=3)


def _gqa_seqlens(q, k, v, past_k, past_v, position_ids, attention_mask, cos_cache, sin_cache, num_heads: int,
                 kv_heads: int, scale: float):
    """The "seqlens" attention layout (onnxruntime-genai's): each row's tokens start at position 0 and its length
    is its attention-mask row's sum, so GroupQueryAttention needs no padding bias (which would send CUDA to its
    unfused fallback) and no `query_seqlens` (an input onnxruntime-gpu 1.31 does not have). A row shorter than the
    batch's longest is right-padded; runners prefill a batch row by row (batch 1) and decode it together."""
    lens = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)  # (B,) int64
    seqlens_k = op.Cast(op.Sub(lens, op.Constant(value_ints=[1])), to=6)
    total_len = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=6)
    return _ms.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                                   position_ids, num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1,
                                   scale=float(scale), _outputs=3)


ATTENTION_LAYOUTS = {"bias": _gqa, "seqlens": _gqa_seqlens}


def _register_gqa_schema() -> None:
    """ORT's contrib schemas are not in onnx.defs; the exporter's node builder needs the output count."""
    from onnx.defs import OpSchema, has, register_schema

    if has("GroupQueryAttention", MS_DOMAIN):
        return
    P, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    T = ("T", ["tensor(float)", "tensor(float16)"], "")
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
             "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale",
             "q_norm_weight", "k_norm_weight", "query_seqlens"]
    types = {"seqlens_k": "M", "total_sequence_length": "M", "query_seqlens": "M", "position_ids": "I"}
    required = {"query", "seqlens_k", "total_sequence_length"}
    register_schema(OpSchema(
        "GroupQueryAttention", MS_DOMAIN, 1, doc="ONNX Runtime contrib op (subset used by qwen2-export)",
        inputs=[P(n, types.get(n, "T"), "", param_option=OpSchema.FormalParameterOption.Single if n in required
                  else opt) for n in names],
        outputs=[P("output", "T", ""), P("present_key", "T", ""), P("present_value", "T", "")],
        type_constraints=[T, ("M", ["tensor(int32)"], ""), ("I", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(a, t, "") for a, t in (
            ("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
            ("do_rotary", OpSchema.AttrType.INT), ("scale", OpSchema.AttrType.FLOAT))]))


def translation_table(attention: str = "bias") -> dict:
    _register_gqa_schema()
    return {torch.ops.qwen2_fused.group_query_attention.default: ATTENTION_LAYOUTS[attention]}


# ---- MoE: qwen2.MoE -> com.microsoft.MoE / QMoE ------------------------------------------------------------------
def fuse_moe(model: ir.Model, uses: dict[str, WeightUse], quant: QuantSpec | None = None) -> int:
    """Replace every qwen2.MoE node by ORT's MoE kernel (float experts) or, with `quant` (quantized precisions),
    QMoE with experts in that block format. Adds the new expert tensors (gate/up interleaved into fc1) to `uses`.

    QMoE renormalizes the top-k routing weights whatever `normalize_routing_weights` says (measured on ORT 1.32:
    its output equals the renormalized reference to 2e-7 with the attribute 0 or 1). For norm_topk_prob=False
    the output is multiplied back by the top-k probability mass, computed beside it: exact, since each expert's
    contribution is linear in its weight.
    """
    g = model.graph
    count = 0
    for moe in [n for n in g if n.domain == custom_ops.DOMAIN and n.op_type == "MoE"]:
        x, logits, gate, up, down = moe.inputs
        e, inter, hidden = gate.shape[0], gate.shape[1], gate.shape[2]
        base = gate.name.rsplit(".", 1)[0]  # ...mlp.experts
        top_k, normalize = moe.attributes["top_k"].as_int(), moe.attributes["normalize"].as_int()
        attrs = {"k": top_k, "normalize_routing_weights": normalize, "activation_type": "swiglu",
                 "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
        if quant is None:
            fc1 = initializer(f"{base}.gate_up_proj", gate.dtype, (e, 2 * inter, hidden))
            g.register_initializer(fc1)
            new = node(MS_DOMAIN, "MoE", [x, logits, fc1, None, down], attrs, name=f"{base}/MoE")
            uses[fc1.name] = WeightUse(fc1.name, WeightKind.INTERLEAVED, [fc1])
            replace(g, moe, new)
        else:
            ins = []
            for src, n_out, k_in in ((f"{base}.gate_up_proj", 2 * inter, hidden), (down.name, hidden, inter)):
                shapes = quant.shapes(n_out, k_in)  # one expert's MatMulNBits layout
                nb, blob = shapes["B"][1], shapes["B"][2]
                outs = (initializer(f"{src}.q{quant.bits}", ir.DataType.UINT8, (e, n_out, nb * blob)),
                        initializer(f"{src}.scales", gate.dtype, (e, n_out, nb)),
                        initializer(f"{src}.zero_points", ir.DataType.UINT8,
                                    (e, n_out, shapes["zero_points"][0] // n_out)))
                for v in outs:
                    g.register_initializer(v)
                uses[f"{src}.q{quant.bits}"] = WeightUse(src, WeightKind.QUANTIZED_EXPERTS, list(outs), quant)
                ins.append(outs)
            (w1, s1, z1), (w2, s2, z2) = ins
            attrs |= {"expert_weight_bits": quant.bits, "block_size": quant.block, "weights_prepacked": 0,
                      "accuracy_level": ACCURACY_LEVEL}
            new = node(MS_DOMAIN, "QMoE", [x, logits, w1, s1, None, w2, s2, None, None, None, None, z1, z2],
                       attrs, name=f"{base}/QMoE")
            if normalize:
                replace(g, moe, new)
            else:
                replace(g, moe, _times_topk_mass(g, moe, new, logits, top_k, base))
        for w in (gate, up, down):
            if not w.uses():
                g.initializers.pop(w.name, None)
                uses.pop(w.name, None)
        count += 1
    if count and not any(n.domain == custom_ops.DOMAIN and n.op_type == "MoE" for n in g):
        model.functions.pop((custom_ops.DOMAIN, "MoE", ""), None)
        if not any(n.domain == custom_ops.DOMAIN for n in g):
            model.opset_imports.pop(custom_ops.DOMAIN, None)
    if count:
        model.opset_imports[MS_DOMAIN] = 1
    return count


def _times_topk_mass(g: ir.Graph, before: ir.Node, moe: ir.Node, logits: ir.Value, top_k: int, name: str) -> ir.Node:
    """moe output × Σ top-k softmax(logits) (fp32 softmax, as the reference): undoes QMoE's renormalization."""
    k = ir.Value(name=f"{name}/topk_k", const_value=ir.tensor(np.array([top_k], dtype=np.int64)))
    axes = ir.Value(name=f"{name}/topk_axes", const_value=ir.tensor(np.array([-1], dtype=np.int64)))
    for c in (k, axes):
        g.register_initializer(c)
    nodes = [
        f32 := node("", "Cast", [logits], {"to": ir.DataType.FLOAT}, name=f"{name}/router_fp32"),
        sm := node("", "Softmax", [f32.outputs[0]], {"axis": -1}, name=f"{name}/router_softmax"),
        tk := node("", "TopK", [sm.outputs[0], k], {"axis": -1}, name=f"{name}/router_topk", num_outputs=2),
        mass := node("", "ReduceSum", [tk.outputs[0], axes], {"keepdims": 1}, name=f"{name}/topk_mass"),
        cast := node("", "CastLike", [mass.outputs[0], logits], name=f"{name}/topk_mass_cast"),
    ]
    for n in nodes + [moe]:
        g.insert_before(before, n)
    return node("", "Mul", [moe.outputs[0], cast.outputs[0]], name=f"{name}/unnormalize")
