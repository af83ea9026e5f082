"""numpy semantics of the MIL ops a Qwen2 package uses, for the executor in `mil_exec.py`.

Each implementation takes (op, x, model): `x(name)` gives an input's value, `model` the executing `MILModel` (its
states). Floats compute in float32; the executor rounds results to the declared dtype.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qwen2_ref.errors import Qwen2Error

_F32 = np.float32


def _f(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(_F32) if x.dtype in (np.float16, np.float64) else x


def _blocks(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast per-block parameters `a` up to `shape` (block size along each axis = shape / a.shape)."""
    for axis, (n, m) in enumerate(zip(shape, a.shape)):
        if n != m:
            a = np.repeat(a, n // m, axis=axis)
    return a


def _constexpr(op, const: Callable) -> np.ndarray:
    """Dequantize a compile-time op (iOS 16 and iOS 18 forms): float32, or the op's declared float dtype."""
    t = op.op_type
    if t == "constexpr_blockwise_shift_scale":
        # The result has the scale's dtype (fp16 here): the weight a Core ML backend multiplies with. Computed in
        # float32 a slab of rows at a time, per-block parameters broadcast over a blocked view, so no float32 copy
        # of a whole weight exists (the 151,936 x 896 embedding is 0.5 GB in float32).
        scale, offset = np.asarray(const(op, "scale")), const(op, "offset")
        offset = None if offset is None else np.asarray(offset).astype(_F32)
        data = np.asarray(const(op, "data"))
        out = np.empty(data.shape, dtype=scale.dtype)
        per_row = data.shape[0] // scale.shape[0]  # data rows per scale row
        step = per_row * max(1, 8192 // per_row)
        for a in range(0, data.shape[0], step):
            s = slice(a // per_row, (a + step) // per_row)
            chunk = data[a:a + step].astype(_F32)
            sc = scale[s]
            view = chunk.reshape([x for n, m in zip(chunk.shape, sc.shape) for x in (m, n // m)])
            per_block = [x for m in sc.shape for x in (m, 1)]
            if offset is not None:
                view -= offset[s].reshape(per_block)
            view *= sc.astype(_F32).reshape(per_block)
            out[a:a + step] = chunk
        return out
    if t == "constexpr_lut_to_dense":
        idx, lut = np.asarray(const(op, "indices")).astype(np.int64), _f(const(op, "lut"))
        vec = lut.shape[-1]
        if vec != 1:
            raise Qwen2Error(f"MIL executor: vector palettization (vector_size {vec}) is not supported")
        lut = lut[..., 0]  # (*groups, n_entries)
        groups = _blocks(np.arange(int(np.prod(lut.shape[:-1]))).reshape(lut.shape[:-1]), idx.shape)
        return lut.reshape(-1, lut.shape[-1])[groups, idx]
    if t == "constexpr_affine_dequantize":
        q = _f(const(op, "quantized_data")).astype(_F32)
        axis = int(op.axis.val)
        shape = [1] * q.ndim
        shape[axis] = -1
        zp = _f(const(op, "zero_point")).astype(_F32)
        sc = _f(const(op, "scale"))
        return (q - (zp.reshape(shape) if zp.ndim else zp)) * (sc.reshape(shape) if sc.ndim else sc)
    if t == "constexpr_cast":
        return _f(const(op, "source_val"))
    raise Qwen2Error(f"MIL executor: compile-time op {t} is not supported")


# ---- numpy implementations ------------------------------------------------------------------------------------
def _axes(a, rank: int) -> tuple[int, ...]:
    a = np.atleast_1d(np.asarray(a)).astype(int)
    return tuple(int(x) % rank for x in a)


def _binary(fn):
    return lambda op, x, m: fn(_f(x("x")), _f(x("y")))


def _slice_bounds(op, x, shape):
    """Python slices from MIL's begin/end/stride and masks."""
    rank = len(shape)
    begin = np.asarray(x("begin")).astype(int)
    end = np.asarray(x("end")).astype(int)
    stride = np.asarray(x("stride")).astype(int) if op.inputs.get("stride") is not None else np.ones(rank, int)
    bm = x("begin_mask") if op.inputs.get("begin_mask") is not None else [False] * rank
    em = x("end_mask") if op.inputs.get("end_mask") is not None else [False] * rank
    sm = x("squeeze_mask") if op.inputs.get("squeeze_mask") is not None else [False] * rank
    out = []
    for i in range(rank):
        if sm[i]:
            b = int(begin[i]) % shape[i]
            out.append(slice(b, b + 1, 1))
            continue
        s = int(stride[i])
        b = None if bm[i] else int(begin[i])
        e = None if em[i] else int(end[i])
        out.append(slice(b, e, s))
    return tuple(out), [i for i in range(rank) if sm[i]]


def _slice_by_index(op, x, m):
    data = np.asarray(x("x"))
    sl, squeeze = _slice_bounds(op, x, data.shape)
    r = data[sl]
    return r.squeeze(axis=tuple(squeeze)) if squeeze else r


def _slice_update(op, x, m):
    # In place when every other reader of `x` has already run (the cache between two state writes): saves copying
    # the whole cache twice per layer.
    data = np.asarray(x("x"))
    mine = m._order[id(op)]
    if op.x in op.enclosing_block.outputs or any(m._order.get(id(c), mine + 1) > mine
                                                 for c in op.x.child_ops if c is not op):
        data = data.copy()
    sl, squeeze = _slice_bounds(op, x, data.shape)
    upd = np.asarray(x("update"))
    target_shape = data[sl].shape
    data[sl] = upd.reshape(target_shape)
    return data


def _read_state(op, x, m):
    return m._state[op.inputs["input"].name]


def _update_state(op, x, m):
    value = np.asarray(x("value"))
    target = m._state[op.inputs["state"].name]
    if value is not target:
        target[...] = value
    return value


def _concat(op, x, m):
    vals = [np.asarray(v) for v in x("values")]
    axis = int(x("axis"))
    if op.inputs.get("interleave") is not None and bool(x("interleave")):
        stacked = np.stack(vals, axis=axis + 1 if axis >= 0 else axis)
        shape = list(vals[0].shape)
        shape[axis] *= len(vals)
        return stacked.reshape(shape)
    vals = [np.atleast_1d(v) for v in vals]
    return np.concatenate(vals, axis=axis)


def _gather(op, x, m):
    data, idx = np.asarray(x("x")), np.asarray(x("indices")).astype(np.int64)
    axis = int(x("axis")) if op.inputs.get("axis") is not None else 0
    if op.inputs.get("batch_dims") is not None and int(x("batch_dims")) != 0:
        raise Qwen2Error("MIL executor: gather with batch_dims is not supported")
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return np.take(data, idx, axis=axis)


def _linear(op, x, m):
    y = _f(x("x")) @ _f(x("weight")).T
    b = x("bias")
    return y + _f(b) if b is not None else y


def _matmul(op, x, m):
    a, b = _f(x("x")), _f(x("y"))
    if bool(x("transpose_x")):
        a = np.swapaxes(a, -1, -2)
    if bool(x("transpose_y")):
        b = np.swapaxes(b, -1, -2)
    return a @ b


def _layer_norm(op, x, m):
    v = _f(x("x"))
    axes = _axes(x("axes"), v.ndim) if op.inputs.get("axes") is not None else (v.ndim - 1,)
    mean = v.mean(axis=axes, keepdims=True)
    var = ((v - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (v - mean) / np.sqrt(var + float(x("epsilon")))
    g, b = x("gamma"), x("beta")
    return y * (_f(g) if g is not None else 1) + (_f(b) if b is not None else 0)


def _softmax(v: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sdpa(op, x, m):
    q, k, v = _f(x("query")), _f(x("key")), _f(x("value"))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    mask = x("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + _f(mask)
    return _softmax(scores, -1) @ v


def _reduce(fn):
    def run(op, x, m):
        v = _f(x("x"))
        axes = _axes(x("axes"), v.ndim) if op.inputs.get("axes") is not None else None
        keep = bool(x("keep_dims")) if op.inputs.get("keep_dims") is not None else False
        return fn(v, axis=axes, keepdims=keep)
    return run


def _cumsum(op, x, m):
    v = _f(x("x"))
    axis = int(x("axis"))
    rev = bool(x("reverse")) if op.inputs.get("reverse") is not None else False
    exclusive = bool(x("exclusive")) if op.inputs.get("exclusive") is not None else False
    if rev:
        v = np.flip(v, axis)
    c = np.cumsum(v, axis=axis)
    if exclusive:
        c = c - v
    return np.flip(c, axis) if rev else c


def _tile(op, x, m):
    return np.tile(np.asarray(x("x")), tuple(int(r) for r in np.asarray(x("reps"))))


def _reshape(op, x, m):
    data = np.asarray(x("x"))
    shape = [int(s) for s in np.asarray(x("shape"))]
    shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _cast(op, x, m):
    from coremltools.converters.mil.mil import types

    return np.asarray(x("x")).astype(types.nptype_from_builtin(types.string_to_builtin(x("dtype"))))


_IMPLS: dict[str, Callable] = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(np.divide), "maximum": _binary(np.maximum), "minimum": _binary(np.minimum),
    "pow": _binary(np.power), "equal": _binary(np.equal), "not_equal": _binary(np.not_equal),
    "less": _binary(np.less), "less_equal": _binary(np.less_equal), "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "floor_div": _binary(np.floor_divide), "mod": _binary(np.mod),
    "silu": lambda op, x, m: (lambda v: v / (1 + np.exp(-v)))(_f(x("x"))),
    "sigmoid": lambda op, x, m: 1 / (1 + np.exp(-_f(x("x")))),
    "exp": lambda op, x, m: np.exp(_f(x("x"))),
    "sqrt": lambda op, x, m: np.sqrt(_f(x("x"))),
    "rsqrt": lambda op, x, m: 1 / np.sqrt(_f(x("x")) + float(x("epsilon") or 0)),
    "inverse": lambda op, x, m: 1 / (_f(x("x")) + float(x("epsilon") or 0)),
    "cos": lambda op, x, m: np.cos(_f(x("x"))), "sin": lambda op, x, m: np.sin(_f(x("x"))),
    "softmax": lambda op, x, m: _softmax(_f(x("x")), int(x("axis"))),
    "select": lambda op, x, m: np.where(np.asarray(x("cond")), x("a"), x("b")),
    "shape": lambda op, x, m: np.array(np.asarray(x("x")).shape, dtype=np.int32),
    "cast": _cast,
    "gather": _gather,
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "read_state": _read_state,
    "coreml_update_state": _update_state,
    "expand_dims": lambda op, x, m: np.expand_dims(np.asarray(x("x")), _axes(x("axes"), np.ndim(x("x")) + len(np.atleast_1d(x("axes"))))),
    "squeeze": lambda op, x, m: (np.squeeze(np.asarray(x("x")), axis=_axes(x("axes"), np.ndim(x("x"))))
                                 if op.inputs.get("axes") is not None else np.squeeze(np.asarray(x("x")))),
    "reshape": _reshape,
    "transpose": lambda op, x, m: np.transpose(np.asarray(x("x")), [int(p) for p in np.asarray(x("perm"))]),
    "tile": _tile,
    "linear": _linear,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "scaled_dot_product_attention": _sdpa,
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "cumsum": _cumsum,
    "range_1d": lambda op, x, m: np.arange(x("start"), x("end"), x("step")),
    "identity": lambda op, x, m: np.asarray(x("x")),
}
