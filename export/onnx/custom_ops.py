"""Our ONNX domain `qwen2`: the MoE and DualChunkAttention ops, each with a function body of standard ops.

Any runtime that inlines ONNX functions (ONNX Runtime does) runs them as they are; a fused lowering may replace
them with a runtime's own kernels. Semantics and I/O are documented in docs/ops.md. The reference's torch custom
ops (`qwen2::moe_experts`, `qwen2::dual_chunk_attention`) map to these nodes at export.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset21 as op

DOMAIN = "qwen2"
VERSION = 1


def _register_schemas() -> None:
    """Schemas make the ops known to onnx (checker, shape inference) and to the exporter's node builder."""
    from onnx.defs import OpSchema, has, register_schema

    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    T = ("T", ["tensor(float)", "tensor(float16)"], "activations and weights")
    if not has("MoE", DOMAIN):
        register_schema(OpSchema(
            "MoE", DOMAIN, VERSION, doc="Qwen2-MoE routed experts; see docs/ops.md",
            inputs=[P("X", "T"), P("router_logits", "T"), P("gate_proj", "T"), P("up_proj", "T"), P("down_proj", "T")],
            outputs=[P("Y", "T")], type_constraints=[T],
            attributes=[A("top_k", OpSchema.AttrType.INT, "experts per token"),
                        A("normalize", OpSchema.AttrType.INT, "renormalize the top-k weights (0/1)")]))
    if not has("DualChunkAttention", DOMAIN):
        register_schema(OpSchema(
            "DualChunkAttention", DOMAIN, VERSION, doc="Dual Chunk Attention over a KV cache; see docs/ops.md",
            inputs=[P("q_intra", "T"), P("q_succ", "T"), P("q_inter", "T"), P("K", "T"), P("V", "T"),
                    P("q_pos", "I"), P("k_pos", "I"), P("allowed", "B")],
            outputs=[P("Y", "T")],
            type_constraints=[T, ("I", ["tensor(int64)"], "positions"), ("B", ["tensor(bool)"], "mask")],
            attributes=[A("chunk_len", OpSchema.AttrType.INT, "chunk_size - local_size"),
                        A("scale", OpSchema.AttrType.FLOAT, "score scale"),
                        A("key_block", OpSchema.AttrType.INT, "keys per block of the online softmax")]))


_register_schemas()
qwen2 = onnxscript.values.Opset(DOMAIN, VERSION)


@onnxscript.script(qwen2, default_opset=op)
def MoE(X, router_logits, gate_proj, up_proj, down_proj, top_k: int, normalize: int):
    """Routed experts of a Qwen2-MoE block (see docs/ops.md). X (N, H); router_logits (N, E);
    gate_proj / up_proj (E, I, H); down_proj (E, H, I) -> (N, H). Only experts some token chose are computed."""
    probs = op.Softmax(op.Cast(router_logits, to=1), axis=-1)
    k = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    topv, topi = op.TopK(probs, k, axis=-1)
    norm = op.Cast(op.Constant(value_int=normalize), to=9)
    topv = op.Where(norm, op.Div(topv, op.ReduceSum(topv, op.Constant(value_ints=[-1]), keepdims=1)), topv)
    w = op.CastLike(topv, X)
    zero = op.CastLike(op.Constant(value_float=0.0), X)
    out = op.Mul(op.Cast(X, to=1), op.Constant(value_float=0.0))  # accumulate in fp32 (and ORT's CPU ScatterND
    # has no fp16 'add')
    n_exp = op.Squeeze(op.Shape(gate_proj, start=0, end=1))
    for e in range(n_exp):
        sel = op.Equal(topi, e)  # (N, k): where token n chose expert e
        rows = op.Reshape(op.NonZero(op.ReduceMax(op.Cast(sel, to=7), op.Constant(value_ints=[-1]), keepdims=0)),
                          op.Constant(value_ints=[-1]))
        if op.Greater(op.Size(rows), op.Constant(value_int=0)):
            xs = op.Gather(X, rows, axis=0)
            we = op.Gather(op.ReduceSum(op.Where(sel, w, zero), op.Constant(value_ints=[-1]), keepdims=1), rows,
                           axis=0)
            g = op.MatMul(xs, op.Transpose(op.Gather(gate_proj, e, axis=0), perm=[1, 0]))
            u = op.MatMul(xs, op.Transpose(op.Gather(up_proj, e, axis=0), perm=[1, 0]))
            h = op.Mul(op.Mul(g, op.Sigmoid(g)), u)
            y = op.MatMul(h, op.Transpose(op.Gather(down_proj, e, axis=0), perm=[1, 0]))
            updated = op.ScatterND(out, op.Unsqueeze(rows, op.Constant(value_ints=[1])),
                                   op.Cast(op.Mul(y, we), to=1), reduction="add")
        else:
            updated = op.Identity(out)
        out = op.Identity(updated)
    return op.CastLike(out, X)


@onnxscript.script(qwen2, default_opset=op)
def DualChunkAttention(q_intra, q_succ, q_inter, K, V, q_pos, k_pos, allowed, chunk_len: int, scale: float,
                       key_block: int):
    """Dual Chunk Attention over a KV cache (see docs/ops.md). q_* (B, Hq, T, d); K, V (B, Hkv, S, d) with keys
    rotated at position mod chunk_len; q_pos (B, T), k_pos (B, S) int64; allowed (B, 1, T, S) bool -> (B, Hq, T, d).

    Evaluated over blocks of `key_block` keys with an online softmax (running max, denominator and weighted sum
    in fp32), so working memory is O(T · key_block) whatever the context length S."""
    kshape = op.Shape(K)
    b = op.Slice(kshape, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    hkv = op.Slice(kshape, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    d = op.Slice(kshape, op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
    s_len = op.Slice(kshape, op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
    qshape = op.Shape(q_intra)
    hq = op.Slice(qshape, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    t_len = op.Slice(qshape, op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
    groups = op.Div(hq, hkv)
    blk = op.Reshape(op.Constant(value_int=key_block), op.Constant(value_ints=[1]))
    n_blocks = op.Squeeze(op.Div(op.Sub(op.Add(s_len, blk), op.Constant(value_ints=[1])), blk))
    s = op.Constant(value_int=chunk_len)
    q_chunk = op.Unsqueeze(op.Div(q_pos, s), op.Constant(value_ints=[1, 3]))  # (B, 1, T, 1)
    neg = op.Constant(value_float=-3.4028234663852886e38)
    row = op.Concat(b, hq, t_len, op.Constant(value_ints=[1]), axis=0)
    m = op.Expand(neg, row)  # running max (B, Hq, T, 1), fp32
    den = op.Expand(op.Constant(value_float=0.0), row)
    acc = op.Expand(op.Constant(value_float=0.0), op.Concat(b, hq, t_len, d, axis=0))
    for i in range(n_blocks):
        lo = op.Mul(op.Reshape(i, op.Constant(value_ints=[1])), blk)
        hi = op.Min(op.Add(lo, blk), s_len)
        kb = op.Slice(K, lo, hi, op.Constant(value_ints=[2]))  # (B, Hkv, n, d)
        vb = op.Slice(V, lo, hi, op.Constant(value_ints=[2]))
        n = op.Sub(hi, lo)
        expanded = op.Concat(b, hkv, groups, n, d, axis=0)
        flat = op.Concat(b, hq, n, d, axis=0)
        kt = op.Transpose(op.Reshape(op.Expand(op.Unsqueeze(kb, op.Constant(value_ints=[2])), expanded), flat),
                          perm=[0, 1, 3, 2])  # (B, Hq, d, n)
        vr = op.Reshape(op.Expand(op.Unsqueeze(vb, op.Constant(value_ints=[2])), expanded), flat)
        k_chunk = op.Unsqueeze(op.Div(op.Slice(k_pos, lo, hi, op.Constant(value_ints=[1])), s),
                               op.Constant(value_ints=[1, 2]))  # (B, 1, 1, n)
        rel = op.Sub(q_chunk, k_chunk)  # (B, 1, T, n)
        scores = op.Where(op.Equal(rel, op.Constant(value_int=0)), op.MatMul(q_intra, kt),
                          op.Where(op.Equal(rel, op.Constant(value_int=1)), op.MatMul(q_succ, kt),
                                   op.MatMul(q_inter, kt)))
        scores = op.Mul(op.Cast(scores, to=1), op.Constant(value_float=scale))
        ok = op.Slice(allowed, lo, hi, op.Constant(value_ints=[3]))
        masked = op.Where(ok, scores, neg)
        m_new = op.Max(m, op.ReduceMax(masked, op.Constant(value_ints=[-1]), keepdims=1))
        p = op.Exp(op.Sub(masked, m_new))
        corr = op.Exp(op.Sub(m, m_new))
        den = op.Add(op.Mul(den, corr), op.ReduceSum(p, op.Constant(value_ints=[-1]), keepdims=1))
        acc = op.Add(op.Mul(acc, corr), op.MatMul(p, op.Cast(vr, to=1)))
        m = op.Identity(m_new)
    return op.CastLike(op.Div(acc, den), V)


_emit = onnxscript.values.Opset(DOMAIN, VERSION)


def _moe(x, router_logits, gate_proj, up_proj, down_proj, top_k: int, norm_topk_prob: bool):
    return _emit.MoE(x, router_logits, gate_proj, up_proj, down_proj, top_k=top_k, normalize=int(norm_topk_prob))


DCA_KEY_BLOCK = 2048  # keys per block of DualChunkAttention's online softmax: bounds its working memory


def _dca(q_intra, q_succ, q_inter, k, v, q_pos, k_pos, allowed, chunk_len: int, scale: float):
    return _emit.DualChunkAttention(q_intra, q_succ, q_inter, k, v, q_pos, k_pos, allowed, chunk_len=chunk_len,
                                    scale=float(scale), key_block=DCA_KEY_BLOCK)


def translation_table() -> dict:
    return {torch.ops.qwen2.moe_experts.default: _moe, torch.ops.qwen2.dual_chunk_attention.default: _dca}


FUNCTIONS = {"MoE": MoE, "DualChunkAttention": DualChunkAttention}


def attach_functions(model: ir.Model) -> list[str]:
    """Add the function bodies of the qwen2-domain ops the graph uses; returns their names."""
    used = sorted({n.op_type for n in model.graph if n.domain == DOMAIN})
    for name in used:
        fn = ir.serde.deserialize_function(FUNCTIONS[name].to_function_proto())
        model.functions[fn.identifier()] = fn
    if used:
        model.opset_imports[DOMAIN] = VERSION
    return used
