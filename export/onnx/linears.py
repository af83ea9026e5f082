"""Linear layers lowered for ONNX Runtime: `MatMul` on pre-transposed weights, `MatMulNBits` for block-quantized
weights (float zero points as integer ones plus per-block offsets: folded into the same MatMulNBits as extra input
columns, or as a separate `MatMul` for the exact form), a vocab-wide or tied head as `Gemm` on the
stored table, and `GatherBlockQuantized` for a quantized embedding. Returns the storage plan of every initializer
(`WeightUse`), which weights.py follows when it streams the checkpoint in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx_ir as ir

from ..quant import QuantSpec, folded_blocks, gathered_spec
from .irutil import MS_DOMAIN, initializer, node, replace

# MatMulNBits with int8-quantized activations (ORT's fast CPU path), as onnxruntime-genai's CPU int4 uses.
ACCURACY_LEVEL = 4


class WeightKind(Enum):
    """How one stored tensor is produced from the checkpoint."""

    PLAIN = "plain"  # as stored (converted to the initializer's dtype)
    TRANSPOSED = "transposed"  # (in, out) for MatMul
    QUANTIZED = "quantized"  # MatMulNBits / GatherBlockQuantized blocks (codes, scales, zero points or offsets)
    QUANTIZED_AND_PLAIN = "quantized+plain"  # a tied table: float for the gather, blocks for the head
    INTERLEAVED = "interleaved"  # ORT MoE fc1: each expert's gate and up rows interleaved (E, 2I, H)
    QUANTIZED_EXPERTS = "quantized_experts"  # QMoE: stacked experts quantized expert by expert
    PACKED = "packed"  # several weights side by side along the output dimension (Q/K/V): `parts` in order


@dataclass
class WeightUse:
    """How one checkpoint tensor is stored: as-is, transposed for MatMul, or block-quantized for MatMulNBits."""

    source: str  # reference parameter name (stacked experts included)
    kind: WeightKind
    outputs: list[ir.Value] = field(default_factory=list)
    spec: QuantSpec | None = None
    keys: tuple[str, ...] = ("B", "scales", "zero_points")  # which packed arrays `outputs` hold, in order
    parts: tuple["WeightUse", ...] = ()  # PACKED: the uses whose tensors are concatenated along N, in order


def lower_linears(model: ir.Model, quant: dict[str, QuantSpec] | None, accuracy_level: int = 4
                  ) -> dict[str, WeightUse]:
    """Replace `MatMul(x, Transpose(W))` by `MatMul(x, Wᵀ stored)` or `MatMulNBits(x, W quantized)`.

    `quant` maps weight names to a QuantSpec (None: keep floats). A weight also gathered as the embedding (tied
    head) stays in its (vocab, hidden) layout and the head becomes `Gemm(transB=1)`, so it is stored once.
    Returns the storage plan of every initializer.
    """
    g = model.graph
    uses: dict[str, WeightUse] = {n: WeightUse(n, WeightKind.PLAIN, [v]) for n, v in g.initializers.items()}
    folded_inputs: dict[ir.Value, ir.Value] = {}
    for nd in list(g):
        if nd.op_type != "Transpose" or nd.domain != "":
            continue
        w = nd.inputs[0]
        if w is None or not w.is_initializer() or len(w.shape or ()) != 2:
            continue
        perm = nd.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        consumers = [u for u, _ in nd.outputs[0].uses()]
        if not consumers or any(c.op_type != "MatMul" for c in consumers):
            continue
        gathered = any(u.op_type == "Gather" for u, _ in w.uses())
        n_out, k_in = w.shape[0], w.shape[1]
        spec = quant.get(w.name) if quant else None
        if spec is not None and gathered:
            spec = gathered_spec(spec, k_in)  # one layout for the head and the gather
        if spec is not None:
            spec = _foldable(spec, w, k_in, consumers)
        if spec is not None and _offsets_apply(spec, k_in, consumers) and not gathered and not spec.folded:
            uses[w.name] = _matmul_nbits_with_offsets(g, w, consumers, spec, n_out, k_in, accuracy_level)
        elif spec is not None:
            uses[w.name] = _matmul_nbits(g, w, consumers, spec, n_out, k_in, accuracy_level, folded_inputs)
            if gathered:  # tied: the embedding gathers from the head's quantized blocks (stored once)
                if not _gather_quantized(g, w, spec, tuple(uses[w.name].outputs)):
                    uses[w.name].outputs.insert(0, w)  # float zero points: GatherBlockQuantized can't; keep floats
                    uses[w.name].kind = WeightKind.QUANTIZED_AND_PLAIN
        elif gathered or w.shape[0] > 65536:
            # Tied head: share the embedding table. Any vocab-wide head: keep (V, H) rows so the exporter can
            # stream it in row blocks instead of transposing a multi-GB matrix in memory.
            for mm in consumers:
                _matmul_to_gemm(g, mm, w)
        else:
            orig = w.name
            w.name = f"{orig}.__orig"
            wt = initializer(orig, w.dtype, (k_in, n_out))
            g.register_initializer(wt)
            for mm in consumers:
                mm.replace_input_with(1, wt)
            uses[wt.name] = WeightUse(wt.name, WeightKind.TRANSPOSED, [wt])
        g.remove(nd, safe=True)
    if quant:
        _quantize_gemms(g, quant, uses, accuracy_level, folded_inputs)
    if folded_inputs:
        g.sort()  # a shared folded input was built before the first consumer lowered, not the first in the graph
    emb = g.initializers.get("model.embed_tokens.weight")
    spec = quant.get("model.embed_tokens.weight") if quant else None
    if emb is not None and spec is not None:
        spec = gathered_spec(spec, emb.shape[1])
    if emb is not None and spec is not None and uses["model.embed_tokens.weight"].kind is WeightKind.PLAIN \
            and not spec.float_zp:
        v, h = emb.shape[0], emb.shape[1]
        shapes = spec.shapes(v, h)
        nb = shapes["B"][1]
        outs = (initializer(f"{emb.name}.q{spec.bits}", ir.DataType.UINT8, (v, nb * shapes["B"][2])),
                initializer(f"{emb.name}.scales", emb.dtype, (v, nb)),
                initializer(f"{emb.name}.zero_points", ir.DataType.UINT8, (v, shapes["zero_points"][0] // v)))
        for o in outs:
            g.register_initializer(o)
        _gather_quantized(g, emb, spec, outs, reshape=False)
        uses[emb.name] = WeightUse(emb.name, WeightKind.QUANTIZED, list(outs), spec)
    for name, v in list(g.initializers.items()):
        if not v.uses() and not v.is_graph_output():
            g.initializers.pop(name)
    live = set(g.initializers)
    return {n: u for n, u in uses.items() if all(o.name in live for o in u.outputs)}


def _gather_quantized(g: ir.Graph, table: ir.Value, spec: QuantSpec, packed: tuple[ir.Value, ...],
                      reshape: bool = True) -> bool:
    """Gather(table, ids) -> GatherBlockQuantized over block-quantized rows (4- or 8-bit, uint8 zero points).

    With `reshape`, `packed` are a MatMulNBits' (B, scales, zero_points) and are viewed as (V, ·) by Reshape
    nodes, so a tied embedding and head share one copy on disk."""
    if spec.float_zp:
        return False
    v, h = table.shape[0], table.shape[1]
    data, scales, zps = packed
    if reshape:
        nb = -(-h // spec.block)
        views = []
        for x, cols in ((data, nb * spec.block * spec.bits // 8), (scales, nb),
                        (zps, nb if spec.bits == 8 else -(-nb // 2))):
            shp = ir.Value(name=f"{x.name}.gather_shape", const_value=ir.tensor([v, cols], dtype=ir.DataType.INT64))
            g.register_initializer(shp)
            views.append(node("", "Reshape", [x, shp], name=f"{x.name}/as_table"))
        data, scales, zps = (n.outputs[0] for n in views)
    else:
        views = []
    for gather in [u for u, _ in table.uses() if u.op_type == "Gather"]:
        for n in views:
            if n.graph is None:
                g.insert_before(gather, n)
        new = node(MS_DOMAIN, "GatherBlockQuantized", [data, gather.inputs[1], scales, zps],
                    {"gather_axis": 0, "quantize_axis": 1, "block_size": spec.block, "bits": spec.bits},
                    name=f"{table.name}/GatherBlockQuantized")
        replace(g, gather, new)
    return True


def _offsets_apply(spec: QuantSpec, k_in: int, consumers: list[ir.Node]) -> bool:
    """Float zero points lowered as symmetric blocks + offsets (below): 4-bit, whole blocks, known input ranks."""
    ranks = {len(c.inputs[0].shape) if c.inputs[0].shape is not None else None for c in consumers}
    return spec.float_zp and spec.bits == 4 and k_in % spec.block == 0 and len(ranks) == 1 and ranks <= {2, 3}


def _foldable(spec: QuantSpec, w: ir.Value, k_in: int, consumers: list[ir.Node]) -> QuantSpec:
    """`spec`, unfolded unless folding (QuantSpec.folded) applies where it was measured: fp32 activations (in fp16
    the remainders' scale, ~1/255 of a block scale, falls among the subnormals) and the inputs the offsets form
    takes."""
    if spec.folded and not (w.dtype == ir.DataType.FLOAT and _offsets_apply(spec, k_in, consumers)):
        return dataclasses.replace(spec, folded=False)
    return spec


def _folded_input(g: ir.Graph, mm: ir.Node, block: int, cache: dict[ir.Value, ir.Value]) -> ir.Value:
    """x (…, K) -> [x, S, S] (…, K + 2·G·block), S the sums of x's blocks of `block` (K/block of them) padded with
    zeros to G·block: the input of a folded MatMulNBits (quant.Quantized._pack_folded: S once against the
    remainders' low digits, once against their high ones). Built once per x and shared by every folded weight that
    reads it (q/k/v, gate/up)."""
    x = mm.inputs[0]
    if x in cache:
        return cache[x]
    rank, k = len(x.shape), x.shape[-1]
    nb = k // block
    pad = -(-nb // block) * block - nb
    tag = f"{x.name}/folded"
    consts = {"blocks": np.array([0] * (rank - 1) + [nb, block], dtype=np.int64), "axes": np.array([-1], np.int64),
              "pads": np.array([0] * (2 * rank - 1) + [pad], dtype=np.int64)}
    vals = {n: ir.Value(name=f"{tag}.{n}", const_value=ir.tensor(a)) for n, a in consts.items() if n != "pads" or pad}
    for v in vals.values():
        g.register_initializer(v)
    nodes = [xb := node("", "Reshape", [x, vals["blocks"]], name=f"{tag}/blocks"),
             sums := node("", "ReduceSum", [xb.outputs[0], vals["axes"]], {"keepdims": 0}, name=f"{tag}/block_sums")]
    if pad:
        nodes.append(sums := node("", "Pad", [sums.outputs[0], vals["pads"]], name=f"{tag}/pad"))
    nodes.append(cat := node("", "Concat", [x, sums.outputs[0], sums.outputs[0]], {"axis": -1}, name=f"{tag}/concat"))
    for n in nodes:
        g.insert_before(mm, n)
    cat.outputs[0].name = f"{tag}/output"
    cache[x] = cat.outputs[0]
    return cat.outputs[0]


def _quantize_gemms(g: ir.Graph, quant: dict[str, QuantSpec], uses: dict[str, WeightUse], accuracy_level: int,
                    folded_inputs: dict[ir.Value, ir.Value]) -> None:
    """Linears traced as `Gemm(x2d, W, transB=1)` (the MoE block's shared expert works on flattened tokens) become
    MatMulNBits like the MatMul ones; without this a 57B-A14B int4 export kept 23 GB of fp32 shared experts."""
    for nd in [n for n in g if n.op_type == "Gemm" and n.domain == ""]:
        w = nd.inputs[1]
        c = nd.inputs[2] if len(nd.inputs) > 2 else None
        spec = quant.get(w.name) if w is not None else None
        if spec is None or not w.is_initializer() or len(w.shape or ()) != 2 or uses[w.name].kind is not WeightKind.PLAIN:
            continue
        a = {k: v.value for k, v in nd.attributes.items()}
        if a.get("transA", 0) != 0 or a.get("transB", 0) != 1 or a.get("alpha", 1.0) != 1.0 \
                or (c is not None and a.get("beta", 1.0) != 1.0):
            continue
        if any(u.op_type != "Gemm" for u, _ in w.uses()):
            continue  # also gathered (a tied table): stays float
        consumers = [u for u, _ in w.uses()]
        n_out, k_in = w.shape[0], w.shape[1]
        spec = _foldable(spec, w, k_in, consumers)
        if c is None and _offsets_apply(spec, k_in, consumers) and not spec.folded:
            uses[w.name] = _matmul_nbits_with_offsets(g, w, consumers, spec, n_out, k_in, accuracy_level)
        else:
            uses[w.name] = _matmul_nbits(g, w, consumers, spec, n_out, k_in, accuracy_level, folded_inputs)


def _matmul_nbits(g: ir.Graph, w: ir.Value, consumers: list[ir.Node], spec: QuantSpec, n_out: int, k_in: int,
                  accuracy_level: int, folded_inputs: dict[ir.Value, ir.Value] | None = None) -> WeightUse:
    """Each consumer (`MatMul(x, Wᵀ)` or `Gemm(x, W, transB=1[, bias])`) -> `MatMulNBits(x, W quantized[, bias])`;
    folded float zero points (`QuantSpec.folded`): `MatMulNBits([x, block sums of x], ·)` over the longer rows."""
    shapes = spec.shapes(n_out, k_in)
    zdt = w.dtype if spec.stores_float_zp else ir.DataType.UINT8
    k = folded_blocks(k_in // spec.block, spec.block) * spec.block if spec.folded else k_in
    b = initializer(f"{w.name}.q{spec.bits}", ir.DataType.UINT8, shapes["B"])
    sc = initializer(f"{w.name}.scales", w.dtype, shapes["scales"])
    zp = initializer(f"{w.name}.zero_points", zdt, shapes["zero_points"])
    for v in (b, sc, zp):
        g.register_initializer(v)
    for nd in consumers:
        bias = nd.inputs[2] if nd.op_type == "Gemm" and len(nd.inputs) > 2 else None
        x = _folded_input(g, nd, spec.block, folded_inputs) if spec.folded else nd.inputs[0]
        ins = [x, b, sc, zp] + ([None, bias] if bias is not None else [])
        replace(g, nd, node(MS_DOMAIN, "MatMulNBits", ins,
                                {"K": k, "N": n_out, "bits": spec.bits, "block_size": spec.block,
                                 "accuracy_level": accuracy_level}, name=f"{w.name}/MatMulNBits"))
    return WeightUse(w.name, WeightKind.QUANTIZED, [b, sc, zp], spec)


def _matmul_nbits_with_offsets(g: ir.Graph, w: ir.Value, consumers: list[ir.Node], spec: QuantSpec, n_out: int,
                               k_in: int, accuracy_level: int) -> WeightUse:
    """Blocks with float zero points (GGUF Q4_K, Q4_1: w = s·q − m, zf = m/s) without ORT's slow float-zero-point
    kernel: `MatMulNBits(x, q, s, z)` with z the nearest integer to zf (uint8 zero points: the fast kernel) +
    `blocksum(x) @ offsets`, offsets (K/32, N) = s·(z − zf). Exact in real arithmetic; the extra weight is one float
    per block per output.

    With z the nearest integer the MatMulNBits part is w up to half a step, so int8 activations (accuracy level 4)
    cost what they cost any 4-bit weight. The first form of this (zero point 8 for every block, offsets 8·s − m)
    made a constant block (GGUF scale 0, carried as scale 1 and codes 0) weigh −8 in the MatMulNBits part where w is
    ~1e-3, and its int8 activation error then swamped the output (the real 0.5B has 7 such blocks in one layer:
    +1.8% perplexity), so those nodes ran in fp32 (accuracy level 1), whose kernel costs 2.4x for two rows (a
    speculative verify step) where level 4's costs 1.2x. Now: +0.15% perplexity for level 4 against level 1, and
    8% faster decode (README).
    """
    nb = k_in // spec.block
    shapes = spec.shapes(n_out, k_in)
    b = initializer(f"{w.name}.q4", ir.DataType.UINT8, shapes["B"])
    sc = initializer(f"{w.name}.scales", w.dtype, shapes["scales"])
    zp = initializer(f"{w.name}.zero_points_int", ir.DataType.UINT8, (n_out * -(-nb // 2),))
    off = initializer(f"{w.name}.offsets", w.dtype, (nb, n_out))
    rank = len(consumers[0].inputs[0].shape)
    blocks = ir.Value(name=f"{w.name}/blocks_shape",
                      const_value=ir.tensor(np.array([0] * (rank - 1) + [nb, spec.block], dtype=np.int64)))
    axes = ir.Value(name=f"{w.name}/blocks_axes", const_value=ir.tensor(np.array([-1], dtype=np.int64)))
    for v in (b, sc, zp, off, blocks, axes):
        g.register_initializer(v)
    for i, mm in enumerate(consumers):
        x, tag = mm.inputs[0], f"{w.name}/{i}"
        nodes = [
            nbits := node(MS_DOMAIN, "MatMulNBits", [x, b, sc, zp],
                           {"K": k_in, "N": n_out, "bits": spec.bits, "block_size": spec.block,
                            "accuracy_level": accuracy_level}, name=f"{tag}/MatMulNBits"),
            xb := node("", "Reshape", [x, blocks], name=f"{tag}/x_blocks"),
            xs := node("", "ReduceSum", [xb.outputs[0], axes], {"keepdims": 0}, name=f"{tag}/x_block_sums"),
            corr := node("", "MatMul", [xs.outputs[0], off], name=f"{tag}/offsets"),
        ]
        for n in nodes:
            g.insert_before(mm, n)
        replace(g, mm, node("", "Add", [nbits.outputs[0], corr.outputs[0]], name=f"{tag}/plus_offsets"))
    return WeightUse(w.name, WeightKind.QUANTIZED, [b, sc, zp, off], spec,
                     keys=("B", "scales", "zero_points_int", "offsets"))


def _matmul_to_gemm(g: ir.Graph, mm: ir.Node, w: ir.Value) -> None:
    """x (…, H) @ Wᵀ with W (V, H) kept as stored: Reshape(-1, H) -> Gemm(transB=1) -> Reshape(…, V)."""
    x = mm.inputs[0]
    name = f"{w.name}/head"
    hidden = ir.Value(name=f"{name}.flat_shape", const_value=ir.tensor([-1, w.shape[1]], dtype=ir.DataType.INT64))
    vocab = ir.Value(name=f"{name}.vocab", const_value=ir.tensor([w.shape[0]], dtype=ir.DataType.INT64))
    for c in (hidden, vocab):
        g.register_initializer(c)
    lead = node("", "Shape", [x], {"start": 0, "end": -1}, name=f"{name}/lead")
    shape = node("", "Concat", [lead.outputs[0], vocab], {"axis": 0}, name=f"{name}/shape")
    flat = node("", "Reshape", [x, hidden], name=f"{name}/flatten")
    gemm = node("", "Gemm", [flat.outputs[0], w], {"transB": 1}, name=f"{name}/Gemm")
    back = node("", "Reshape", [gemm.outputs[0], shape.outputs[0]], name=f"{name}/unflatten")
    for n in (lead, shape, flat, gemm):
        g.insert_before(mm, n)
    replace(g, mm, back)
