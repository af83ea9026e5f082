"""Fused lowerings: rewrite traced subgraphs into ONNX Runtime's own kernels (`--lowering fused`, the default).

- RMSNorm (Cast -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Reciprocal -> Mul -> Cast -> Mul weight)
  -> `SimplifiedLayerNormalization` (ORT kernel in the default domain; computes in fp32, stash_type 1).
- residual `Add` feeding such a norm -> `SkipSimplifiedLayerNormalization` (com.microsoft), whose 4th output is
  the sum the rest of the graph keeps using.
"""

from __future__ import annotations

import onnx_ir as ir

from .irutil import MS_DOMAIN, const_array, drop_dead, initializer, node, produced_by, replace
from .linears import WeightKind, WeightUse


def fuse_rms_norm(model: ir.Model) -> int:
    """Returns how many RMSNorms became SimplifiedLayerNormalization."""
    g = model.graph
    count = 0
    for sqrt in [n for n in g if n.op_type == "Sqrt" and n.domain == ""]:
        add = produced_by(sqrt.inputs[0], "Add")
        if add is None:
            continue
        mean = produced_by(add.inputs[0], "ReduceMean")
        eps = const_array(add.inputs[1])
        if mean is None or eps is None or eps.size != 1:
            continue
        pow_ = produced_by(mean.inputs[0], "Pow")
        if pow_ is None or const_array(pow_.inputs[1]) is None or float(const_array(pow_.inputs[1])) != 2.0:
            continue
        x32 = pow_.inputs[0]
        recip = [u for u, _ in sqrt.outputs[0].uses() if u.op_type == "Reciprocal"]
        if len(recip) != 1:
            continue
        muls = [u for u, _ in recip[0].outputs[0].uses() if u.op_type == "Mul"]
        if len(muls) != 1 or x32 not in muls[0].inputs:
            continue
        tail = muls[0].outputs[0]
        cast = [u for u, _ in tail.uses() if u.op_type == "Cast"]
        if len(cast) == 1:
            tail = cast[0].outputs[0]
        scale = [u for u, _ in tail.uses() if u.op_type == "Mul"]
        if len(scale) != 1:
            continue
        weight = next((i for i in scale[0].inputs if i is not tail), None)
        if weight is None or not weight.is_initializer():
            continue
        cast_in = produced_by(x32, "Cast")
        x = cast_in.inputs[0] if cast_in is not None else x32
        fused = node("", "SimplifiedLayerNormalization", [x, weight],
                      {"axis": -1, "epsilon": float(eps.reshape(-1)[0]), "stash_type": 1},
                      name=f"{weight.name}/SimplifiedLayerNormalization")
        replace(g, scale[0], fused)
        count += 1
    drop_dead(g)
    return count


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """Add(a, b) -> SimplifiedLayerNormalization  =>  SkipSimplifiedLayerNormalization(a, b) (+ its sum output)."""
    g = model.graph
    count = 0
    for norm in [n for n in g if n.op_type == "SimplifiedLayerNormalization" and n.domain == ""]:
        add = produced_by(norm.inputs[0], "Add")
        if add is None or any(i is None or i.is_initializer() or i.const_value is not None for i in add.inputs):
            continue
        a, b = add.inputs
        if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
            continue  # a broadcast Add is not a residual
        eps = norm.attributes["epsilon"].as_float()
        fused = node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]], {"epsilon": eps},
                     name=f"{norm.name}/Skip", num_outputs=4)
        g.insert_before(add, fused)
        total = fused.outputs[3]
        add.outputs[0].replace_all_uses_with(total, replace_graph_outputs=True)
        total.name, total.shape, total.type = add.outputs[0].name + ".sum", add.outputs[0].shape, add.outputs[0].type
        y = fused.outputs[0]
        y.shape, y.type = norm.outputs[0].shape, norm.outputs[0].type
        norm.outputs[0].replace_all_uses_with(y, replace_graph_outputs=True)
        fused.outputs[0].name = norm.outputs[0].name + ".skip"
        g.remove(norm, safe=True)
        g.remove(add, safe=True)
        count += 1
    if count:
        model.opset_imports[MS_DOMAIN] = 1
    return count


def fold_matmulnbits_bias(model: ir.Model) -> int:
    """MatMulNBits(x) -> Add(bias) => MatMulNBits(x, ..., bias): the Q/K/V biases ride in the kernel (its optional
    6th input), three nodes fewer per layer. Returns how many were folded."""
    g = model.graph
    count = 0
    for mm in [n for n in g if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN and len(n.inputs) <= 4]:
        uses = list(mm.outputs[0].uses())
        if len(uses) != 1 or mm.outputs[0].is_graph_output():
            continue
        add = uses[0][0]
        if add.op_type != "Add" or add.domain != "":
            continue
        bias = add.inputs[1 - uses[0][1]]
        n_out = mm.attributes["N"].as_int()
        if bias is None or not bias.is_initializer() or bias.shape is None or list(bias.shape) != [n_out]:
            continue
        ins = list(mm.inputs) + [None] * (4 - len(mm.inputs)) + [None, bias]
        replace(g, add, ir.Node(MS_DOMAIN, "MatMulNBits", ins, list(mm.attributes.values()), name=mm.name))
        g.remove(mm, safe=True)
        count += 1
    return count


# GroupQueryAttention inputs computed from the attention mask and the step's shapes alone: the same in every layer
_GQA_SHARED = {5: "seqlens_k", 6: "total_sequence_length", 10: "attention_bias", 16: "query_seqlens"}


def share_attention_inputs(model: ir.Model) -> int:
    """Every layer's GroupQueryAttention gets the first layer's seqlens_k / total_sequence_length / attention_bias
    / query_seqlens (the trace computes them per layer; ORT's CSE cannot merge them because each hangs off its
    own layer's query shape). Returns how many inputs were redirected; the per-layer copies are dropped."""
    g = model.graph
    gqa = [n for n in g if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
    count = 0
    for layer in gqa[1:]:
        for i in _GQA_SHARED:
            if i < len(layer.inputs) and i < len(gqa[0].inputs):
                mine, first = layer.inputs[i], gqa[0].inputs[i]
                if mine is not None and first is not None and mine is not first:
                    layer.replace_input_with(i, first)
                    count += 1
    if count:
        drop_dead(g)
    return count


def pack_qkv(model: ir.Model, uses: dict) -> int:
    """GroupQueryAttention(q_proj(x), k_proj(x), v_proj(x)) => GroupQueryAttention(qkv_proj(x), -, -): one weight
    matmul per layer instead of three, feeding GQA's packed-QKV input (B, S, (heads + 2·kv)·head_dim). The three
    weights (and biases) are stored side by side along the output dimension; they must share their format
    (MatMulNBits bits and block; float MatMul). Returns how many layers were packed."""
    g = model.graph
    count = 0
    for gqa in [n for n in g if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]:
        projs = [_projection(v) for v in gqa.inputs[:3]]
        if any(p is None for p in projs):
            continue
        mms, biases = zip(*projs)
        x = mms[0].inputs[0]
        if any(m.inputs[0] is not x for m in mms) or len({_format(m) for m in mms}) != 1:
            continue
        if any(b is None for b in biases) and any(b is not None for b in biases):
            continue
        weights = [m.inputs[1] for m in mms]
        parts = [uses.get(w.name.removesuffix(f".q{m.attributes['bits'].as_int()}") if m.op_type == "MatMulNBits"
                          else w.name) for w, m in zip(weights, mms)]
        if any(u is None or u.kind not in (WeightKind.QUANTIZED, WeightKind.TRANSPOSED) for u in parts) \
                or len({u.keys for u in parts}) != 1:
            continue
        base = weights[0].name.split(".q_proj")[0] + ".qkv_proj"
        outs = []
        for i, v in enumerate(parts[0].outputs):
            shapes = [list(u.outputs[i].shape) for u in parts]
            axis = 1 if parts[0].kind is WeightKind.TRANSPOSED else 0  # (K, N) for MatMul; N first otherwise
            shape = list(shapes[0])
            shape[axis] = sum(sh[axis] for sh in shapes)
            suffix = v.name.removeprefix(parts[0].source)
            outs.append(initializer(base + ".weight" + suffix, v.dtype, shape))
        for v in outs:
            g.register_initializer(v)
        use = WeightUse(base + ".weight", WeightKind.PACKED, outs, parts[0].spec, parts[0].keys, tuple(parts))
        n_out = sum(int(u.outputs[0].shape[0 if u.kind is WeightKind.QUANTIZED else 1]) for u in parts)
        ins = [x, *outs]
        bias = None
        if biases[0] is not None:
            bias = initializer(base + ".bias", biases[0].dtype, [n_out])
            g.register_initializer(bias)
            uses[bias.name] = WeightUse(bias.name, WeightKind.PACKED, [bias],
                                        parts=tuple(uses[b.name] for b in biases))
        if mms[0].op_type == "MatMulNBits":
            attrs = {k: a.value for k, a in mms[0].attributes.items()} | {"N": n_out}
            packed = node(MS_DOMAIN, "MatMulNBits", ins + ([None, bias] if bias is not None else []), attrs,
                          name=f"{base}/MatMulNBits")
            g.insert_before(gqa, packed)
            qkv = packed.outputs[0]
        else:
            mm = node("", "MatMul", ins, name=f"{base}/MatMul")
            g.insert_before(gqa, mm)
            qkv = mm.outputs[0]
            if bias is not None:
                add = node("", "Add", [qkv, bias], name=f"{base}/bias")
                g.insert_before(gqa, add)
                qkv = add.outputs[0]
        qkv.name = f"{base}/output"
        for u, i in list(gqa.inputs[0].uses()):
            if _reads_batch_or_time(u, i):  # the shared attention inputs read (B, T) and the dtype off q
                u.replace_input_with(i, qkv)
        gqa.replace_input_with(0, qkv)
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        uses[use.source] = use
        count += 1
    if count:
        drop_dead(g)
        for name, v in list(g.initializers.items()):
            if not v.uses() and not v.is_graph_output():
                g.initializers.pop(name)
                uses.pop(name, None)
        live = set(g.initializers)
        for name in [n for n, u in uses.items() if not all(o.name in live for o in u.outputs)]:
            uses.pop(name)
    return count


def _projection(v: ir.Value | None):
    """(the MatMul / MatMulNBits node, its bias initializer or None) that produces v, or None."""
    if v is None or sum(not _reads_batch_or_time(u, i) for u, i in v.uses()) != 1:
        return None
    p = v.producer()
    if p is None:
        return None
    if p.op_type == "MatMulNBits" and p.domain == MS_DOMAIN:
        if len(p.inputs) > 4 and any(i is not None for i in p.inputs[4:5]):
            return None  # group indices: not ours
        return p, (p.inputs[5] if len(p.inputs) > 5 else None)
    bias = None
    if p.op_type == "Add" and p.domain == "":
        b = next((i for i in p.inputs if i is not None and i.is_initializer()), None)
        other = next((i for i in p.inputs if i is not b), None)
        if b is None or other is None or len(other.uses()) != 1:
            return None
        bias, p = b, other.producer()
    if p is not None and p.op_type == "MatMul" and p.domain == "" and p.inputs[1].is_initializer() \
            and len(p.inputs[1].uses()) == 1:
        return p, bias
    return None


def _reads_batch_or_time(n: ir.Node, index: int) -> bool:
    """A node that reads only what q and packed q/k/v share: dims 0-1 ((B, T), a Shape) or the dtype (CastLike's
    target)."""
    if n.domain != "":
        return False
    if n.op_type == "CastLike":
        return index == 1
    if n.op_type != "Shape":
        return False
    start, end = n.attributes.get("start"), n.attributes.get("end")
    return start is not None and end is not None and 0 <= start.as_int() and 0 < end.as_int() <= 2


def _format(mm: ir.Node) -> tuple:
    """What must match for two projections to share one packed weight."""
    if mm.op_type == "MatMul":
        return ("MatMul", mm.inputs[1].dtype, len(mm.inputs) - sum(i is None for i in mm.inputs))
    a = {k: a.value for k, a in mm.attributes.items() if k != "N"}
    return ("MatMulNBits", tuple(sorted(a.items())), sum(i is not None for i in mm.inputs[:4]),
            tuple(i.dtype for i in mm.inputs[1:4] if i is not None))
