"""Fused lowerings: rewrite traced subgraphs into ONNX Runtime's own kernels (`--lowering fused`, the default).

- RMSNorm (Cast -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Reciprocal -> Mul -> Cast -> Mul weight)
  -> `SimplifiedLayerNormalization` (ORT kernel in the default domain; computes in fp32, stash_type 1).
- residual `Add` feeding such a norm -> `SkipSimplifiedLayerNormalization` (com.microsoft), whose 4th output is
  the sum the rest of the graph keeps using.
"""

from __future__ import annotations

import onnx_ir as ir

from .irutil import MS_DOMAIN, const_array, drop_dead, node, produced_by, replace


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
