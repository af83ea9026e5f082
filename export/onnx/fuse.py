"""Fused lowerings: rewrite traced subgraphs into ONNX Runtime's own kernels (chosen by `--fused`).

- RMSNorm (Cast -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Reciprocal -> Mul -> Cast -> Mul weight)
  -> `SimplifiedLayerNormalization` (ORT kernel in the default domain; computes in fp32, stash_type 1).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .graph import _node, _replace


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant":
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in p.attributes:
                a = p.attributes[key].value
                return a.numpy() if hasattr(a, "numpy") else np.asarray(a)
    return None


def _only(v: ir.Value, op: str) -> ir.Node | None:
    """The producer of v if it is `op`."""
    p = v.producer()
    return p if p is not None and p.op_type == op and p.domain == "" else None


def fuse_rms_norm(model: ir.Model) -> int:
    """Returns how many RMSNorms became SimplifiedLayerNormalization."""
    g = model.graph
    count = 0
    for sqrt in [n for n in g if n.op_type == "Sqrt" and n.domain == ""]:
        add = _only(sqrt.inputs[0], "Add")
        if add is None:
            continue
        mean = _only(add.inputs[0], "ReduceMean")
        eps = _const(add.inputs[1])
        if mean is None or eps is None or eps.size != 1:
            continue
        pow_ = _only(mean.inputs[0], "Pow")
        if pow_ is None or _const(pow_.inputs[1]) is None or float(_const(pow_.inputs[1])) != 2.0:
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
        cast_in = _only(x32, "Cast")
        x = cast_in.inputs[0] if cast_in is not None else x32
        fused = _node("", "SimplifiedLayerNormalization", [x, weight],
                      {"axis": -1, "epsilon": float(eps.reshape(-1)[0]), "stash_type": 1},
                      name=f"{weight.name}/SimplifiedLayerNormalization")
        _replace(g, scale[0], fused)
        count += 1
    # the matched chains are now dead: drop nodes whose outputs nobody uses
    changed = True
    while changed:
        changed = False
        for n in list(g):
            if all(not o.uses() and not o.is_graph_output() for o in n.outputs):
                g.remove(n, safe=True)
                changed = True
    return count
