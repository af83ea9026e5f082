"""Small helpers for editing onnx_ir graphs, shared by the tracer and every lowering pass."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops


def node(domain: str, op: str, inputs, attrs: dict | None = None, name: str | None = None,
         num_outputs: int = 1) -> ir.Node:
    return ir.Node(domain, op, inputs, ir.convenience.convert_attributes(attrs or {}), name=name,
                   num_outputs=num_outputs)


def initializer(name: str, dtype: ir.DataType, shape) -> ir.Value:
    """An initializer whose data is attached later (weights.py); evaluating it before then is a bug."""

    def unset():
        raise RuntimeError(f"initializer {name} has no data attached")

    t = ir.LazyTensor(unset, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    return ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype), const_value=t)


def replace(g: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` where `old` was: same output name, shape and type (graph outputs included)."""
    g.insert_before(old, new)
    before, after = old.outputs[0], new.outputs[0]
    name, shape, typ = before.name, before.shape, before.type
    before.replace_all_uses_with(after, replace_graph_outputs=True)
    before.name = f"{name}.__replaced"
    after.name, after.shape, after.type = name, shape, typ
    g.remove(old, safe=True)


def const_array(v: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or of a `Constant` node's output; None if it is computed."""
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


def produced_by(v: ir.Value, op: str) -> ir.Node | None:
    """The producer of v if it is the standard-domain `op`."""
    p = v.producer()
    return p if p is not None and p.op_type == op and p.domain == "" else None


def drop_dead(g: ir.Graph) -> None:
    """Drop nodes whose outputs nobody uses (what a rewrite left behind)."""
    changed = True
    while changed:
        changed = False
        for n in list(g):
            if all(not o.uses() and not o.is_graph_output() for o in n.outputs):
                g.remove(n, safe=True)
                changed = True


def ops_histogram(model: ir.Model) -> dict[str, int]:
    c = collections.Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in model.graph)
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))
