"""Trace the reference into an ONNX graph with no weights, then lower it for ONNX Runtime.

The model is built on the meta device, so tracing costs the same for 0.5B and 72B. Initializers keep the
reference's (Hugging Face) names; their data is attached later by `weights.py`, one tensor at a time.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from qwen2_ref.config import ModelArgs
from qwen2_ref.model import Qwen2ForCausalLM

from ..quant import QuantSpec
from . import custom_ops

OPSET = 21
MS_DOMAIN = "com.microsoft"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int4": torch.float32}


def io_names(cfg: ModelArgs) -> tuple[list[str], list[str]]:
    """optimum / onnxruntime-genai conventions."""
    kv = [f"{i}.{t}" for i in range(cfg.num_hidden_layers) for t in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
            ["logits"] + [f"present.{n}" for n in kv])


class _Step(torch.nn.Module):
    """Flat inputs/outputs around the reference: one graph serves prefill and decode."""

    def __init__(self, model: Qwen2ForCausalLM):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pk = tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2))
        logits, present = self.m(input_ids, position_ids=position_ids, attention_mask=attention_mask, past=pk)
        return (logits.to(torch.float32), *[t for kv in present for t in kv])


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's notes that are not for our users (torchvision ops it skips, a pytree deprecation)."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            yield
    finally:
        log.setLevel(level)


def trace(cfg: ModelArgs, dtype: str, fused_attention: bool = False) -> ir.Model:
    """The reference as an ONNX graph (opset 21) with dynamic batch / sequence / past; initializers have no data.

    `fused_attention`: attention becomes ORT's GroupQueryAttention (fused.py) instead of standard ops."""
    tdtype = TORCH_DTYPES[dtype]
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg).to(tdtype).eval()
    model.tie_weights()
    table = custom_ops.translation_table()
    if fused_attention:
        from . import fused

        fused.use_fused_attention(model)
        table |= fused.translation_table()
    L, B, T, P = cfg.num_hidden_layers, 2, 3, 5  # sizes >= 2: size-1 example dims get specialized
    with torch.device("meta"):
        args = (torch.zeros(B, T, dtype=torch.long), torch.ones(B, P + T, dtype=torch.long),
                torch.zeros(B, T, dtype=torch.long),
                *[torch.zeros(B, cfg.num_key_value_heads, P, cfg.head_dim, dtype=tdtype) for _ in range(2 * L)])
    ins, outs = io_names(cfg)
    D = torch.export.Dim.DYNAMIC
    shapes = ({0: D, 1: D}, {0: D, 1: D}, {0: D, 1: D}, ({0: D, 2: D},) * (2 * L))
    with _quiet_exporter():
        prog = torch.onnx.export(_Step(model).eval(), args, dynamo=True, optimize=False, opset_version=OPSET,
                                 input_names=ins, output_names=outs, dynamic_shapes=shapes, verbose=False,
                                 custom_translation_table=table)
    m = prog.model
    custom_ops.attach_functions(m)
    _strip_prefix(m.graph, "m.")
    if cfg.tie_word_embeddings:
        m.graph.initializers["lm_head.weight"].name = "model.embed_tokens.weight"
    _name_dims(m.graph, cfg)
    return m


LOGITS_TO_KEEP = "logits_to_keep"


def add_logits_to_keep(model: ir.Model) -> bool:
    """An optional scalar input `logits_to_keep` (int64; an overridable initializer, default 0 = every position):
    when k > 0 the LM head runs on the last k positions only. Runners feed 1 in prefill; optimum and
    onnxruntime-genai never see it (it is not a required input)."""
    g = model.graph
    logits = next(v for v in g.outputs if v.name == "logits")
    node = logits.producer()
    while node is not None and node.op_type in ("Cast", "Reshape"):
        node = node.inputs[0].producer()
    head = node
    if head is None or head.op_type not in ("MatMul", "Gemm", "MatMulNBits"):
        return False
    if head.op_type == "Gemm":  # vocab-wide head: Reshape(x, (-1, H)) -> Gemm -> Reshape(lead + V)
        head = head.inputs[0].producer()
        if head is None or head.op_type != "Reshape":
            return False
    x = head.inputs[0]
    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array(0, dtype=np.int64), name=LOGITS_TO_KEEP))
    g.inputs.append(keep)
    g.register_initializer(keep)
    c = {n: ir.Value(name=f"{LOGITS_TO_KEEP}.{n}", const_value=ir.tensor(np.array(v, dtype=np.int64)))
         for n, v in (("one", [1]), ("zero", [0]), ("end", [np.iinfo(np.int64).max]))}
    for v in c.values():
        g.register_initializer(v)
    nodes = [
        seq := _node("", "Shape", [x], {"start": 1, "end": 2}, name="logits_to_keep/seq"),
        k := _node("", "Reshape", [keep, c["one"]], name="logits_to_keep/k"),
        pos := _node("", "Greater", [k.outputs[0], c["zero"]], name="logits_to_keep/given"),
        lo := _node("", "Min", [k.outputs[0], seq.outputs[0]], name="logits_to_keep/min"),
        n := _node("", "Where", [pos.outputs[0], lo.outputs[0], seq.outputs[0]], name="logits_to_keep/n"),
        start := _node("", "Neg", [n.outputs[0]], name="logits_to_keep/start"),
        sl := _node("", "Slice", [x, start.outputs[0], c["end"], c["one"]], name="logits_to_keep/slice"),
    ]
    for nd in nodes:
        g.insert_before(head, nd)
    sl.outputs[0].name, sl.outputs[0].type = "logits_to_keep.hidden", x.type
    for user, idx in list(x.uses()):  # the final norm's output feeds only the head (and its shape for Gemm)
        if user not in nodes:
            user.replace_input_with(idx, sl.outputs[0])
    logits.shape = ir.Shape(["batch_size", "logits_sequence_length", logits.shape[2]])
    return True


def _strip_prefix(graph: ir.Graph, prefix: str) -> None:
    for name in list(graph.initializers):
        if name.startswith(prefix):
            graph.initializers[name].name = name[len(prefix):]


def _name_dims(graph: ir.Graph, cfg: ModelArgs) -> None:
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    for v in graph.inputs:
        if v.name == "attention_mask":
            v.shape = ir.Shape(["batch_size", "total_sequence_length"])
        elif v.name.startswith("past_key_values"):
            v.shape = ir.Shape(["batch_size", kv, "past_sequence_length", hd])
        else:
            v.shape = ir.Shape(["batch_size", "sequence_length"])
    for v in graph.outputs:
        if v.name == "logits":
            v.shape = ir.Shape(["batch_size", "sequence_length", cfg.vocab_size])
        else:
            v.shape = ir.Shape(["batch_size", kv, "total_sequence_length", hd])


# ---- lowering --------------------------------------------------------------------------------------------------
@dataclass
class WeightUse:
    """How one checkpoint tensor is stored: as-is, transposed for MatMul, or block-quantized for MatMulNBits."""

    source: str  # reference parameter name (stacked experts included)
    kind: str  # "plain" | "transposed" | "quantized"
    outputs: list[ir.Value] = field(default_factory=list)
    spec: QuantSpec | None = None
    keys: tuple[str, ...] = ("B", "scales", "zero_points")  # which packed arrays `outputs` hold, in order


def lower_linears(model: ir.Model, quant: dict[str, QuantSpec] | None, accuracy_level: int = 4
                  ) -> dict[str, WeightUse]:
    """Replace `MatMul(x, Transpose(W))` by `MatMul(x, Wᵀ stored)` or `MatMulNBits(x, W quantized)`.

    `quant` maps weight names to a QuantSpec (None: keep floats). A weight also gathered as the embedding (tied
    head) stays in its (vocab, hidden) layout and the head becomes `Gemm(transB=1)`, so it is stored once.
    Returns the storage plan of every initializer.
    """
    g = model.graph
    uses: dict[str, WeightUse] = {n: WeightUse(n, "plain", [v]) for n, v in g.initializers.items()}
    for node in list(g):
        if node.op_type != "Transpose" or node.domain != "":
            continue
        w = node.inputs[0]
        if w is None or not w.is_initializer() or len(w.shape or ()) != 2:
            continue
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        consumers = [u for u, _ in node.outputs[0].uses()]
        if not consumers or any(c.op_type != "MatMul" for c in consumers):
            continue
        gathered = any(u.op_type == "Gather" for u, _ in w.uses())
        n_out, k_in = w.shape[0], w.shape[1]
        spec = quant.get(w.name) if quant else None
        if spec is not None and _offsets_apply(spec, k_in, consumers) and not gathered:
            uses[w.name] = _matmul_nbits_with_offsets(g, w, consumers, spec, n_out, k_in)
        elif spec is not None:
            uses[w.name] = _matmul_nbits(g, w, consumers, spec, n_out, k_in, accuracy_level)
            if gathered:  # tied: the embedding gathers from the head's quantized blocks (stored once)
                if not _gather_quantized(g, w, spec, tuple(uses[w.name].outputs)):
                    uses[w.name].outputs.insert(0, w)  # float zero points: GatherBlockQuantized can't; keep floats
                    uses[w.name].kind = "quantized+plain"
        elif gathered or w.shape[0] > 65536:
            # Tied head: share the embedding table. Any vocab-wide head: keep (V, H) rows so the exporter can
            # stream it in row blocks instead of transposing a multi-GB matrix in memory.
            for mm in consumers:
                _matmul_to_gemm(g, mm, w)
        else:
            orig = w.name
            w.name = f"{orig}.__orig"
            wt = _initializer(orig, w.dtype, (k_in, n_out))
            g.register_initializer(wt)
            for mm in consumers:
                mm.replace_input_with(1, wt)
            uses[wt.name] = WeightUse(wt.name, "transposed", [wt])
        g.remove(node, safe=True)
    if quant:
        _quantize_gemms(g, quant, uses, accuracy_level)
    emb = g.initializers.get("model.embed_tokens.weight")
    spec = quant.get("model.embed_tokens.weight") if quant else None
    if emb is not None and spec is not None and uses["model.embed_tokens.weight"].kind == "plain" \
            and not spec.float_zp:
        v, h = emb.shape[0], emb.shape[1]
        shapes = spec.shapes(v, h)
        nb = shapes["B"][1]
        outs = (_initializer(f"{emb.name}.q{spec.bits}", ir.DataType.UINT8, (v, nb * shapes["B"][2])),
                _initializer(f"{emb.name}.scales", emb.dtype, (v, nb)),
                _initializer(f"{emb.name}.zero_points", ir.DataType.UINT8, (v, shapes["zero_points"][0] // v)))
        for o in outs:
            g.register_initializer(o)
        _gather_quantized(g, emb, spec, outs, reshape=False)
        uses[emb.name] = WeightUse(emb.name, "quantized", list(outs), spec)
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
            views.append(_node("", "Reshape", [x, shp], name=f"{x.name}/as_table"))
        data, scales, zps = (n.outputs[0] for n in views)
    else:
        views = []
    for gather in [u for u, _ in table.uses() if u.op_type == "Gather"]:
        for n in views:
            if n.graph is None:
                g.insert_before(gather, n)
        new = _node(MS_DOMAIN, "GatherBlockQuantized", [data, gather.inputs[1], scales, zps],
                    {"gather_axis": 0, "quantize_axis": 1, "block_size": spec.block, "bits": spec.bits},
                    name=f"{table.name}/GatherBlockQuantized")
        _replace(g, gather, new)
    return True


def _offsets_apply(spec: QuantSpec, k_in: int, consumers: list[ir.Node]) -> bool:
    """Float zero points lowered as symmetric blocks + offsets (below): 4-bit, whole blocks, known input ranks."""
    ranks = {len(c.inputs[0].shape) if c.inputs[0].shape is not None else None for c in consumers}
    return spec.float_zp and spec.bits == 4 and k_in % spec.block == 0 and len(ranks) == 1 and ranks <= {2, 3}


def _quantize_gemms(g: ir.Graph, quant: dict[str, QuantSpec], uses: dict[str, WeightUse], accuracy_level: int
                    ) -> None:
    """Linears traced as `Gemm(x2d, W, transB=1)` (the MoE block's shared expert works on flattened tokens) become
    MatMulNBits like the MatMul ones; without this a 57B-A14B int4 export kept 23 GB of fp32 shared experts."""
    for node in [n for n in g if n.op_type == "Gemm" and n.domain == ""]:
        w = node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        spec = quant.get(w.name) if w is not None else None
        if spec is None or not w.is_initializer() or len(w.shape or ()) != 2 or uses[w.name].kind != "plain":
            continue
        a = {k: v.value for k, v in node.attributes.items()}
        if a.get("transA", 0) != 0 or a.get("transB", 0) != 1 or a.get("alpha", 1.0) != 1.0 \
                or (c is not None and a.get("beta", 1.0) != 1.0):
            continue
        if any(u.op_type != "Gemm" for u, _ in w.uses()):
            continue  # also gathered (a tied table): stays float
        consumers = [u for u, _ in w.uses()]
        n_out, k_in = w.shape[0], w.shape[1]
        if c is None and _offsets_apply(spec, k_in, consumers):
            uses[w.name] = _matmul_nbits_with_offsets(g, w, consumers, spec, n_out, k_in)
        else:
            uses[w.name] = _matmul_nbits(g, w, consumers, spec, n_out, k_in, accuracy_level)


def _matmul_nbits(g: ir.Graph, w: ir.Value, consumers: list[ir.Node], spec: QuantSpec, n_out: int, k_in: int,
                  accuracy_level: int) -> WeightUse:
    """Each consumer (`MatMul(x, Wᵀ)` or `Gemm(x, W, transB=1[, bias])`) -> `MatMulNBits(x, W quantized[, bias])`."""
    shapes = spec.shapes(n_out, k_in)
    zdt = ir.DataType.FLOAT if spec.float_zp else ir.DataType.UINT8
    b = _initializer(f"{w.name}.q{spec.bits}", ir.DataType.UINT8, shapes["B"])
    sc = _initializer(f"{w.name}.scales", ir.DataType.FLOAT, shapes["scales"])
    zp = _initializer(f"{w.name}.zero_points", zdt, shapes["zero_points"])
    for v in (b, sc, zp):
        g.register_initializer(v)
    for node in consumers:
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        ins = [node.inputs[0], b, sc, zp] + ([None, bias] if bias is not None else [])
        _replace(g, node, _node(MS_DOMAIN, "MatMulNBits", ins,
                                {"K": k_in, "N": n_out, "bits": spec.bits, "block_size": spec.block,
                                 "accuracy_level": accuracy_level}, name=f"{w.name}/MatMulNBits"))
    return WeightUse(w.name, "quantized", [b, sc, zp], spec)


def _matmul_nbits_with_offsets(g: ir.Graph, w: ir.Value, consumers: list[ir.Node], spec: QuantSpec, n_out: int,
                               k_in: int) -> WeightUse:
    """Blocks with float zero points (GGUF Q4_K, Q4_1: w = s·q − m) without ORT's slow float-zero-point kernel:
    `MatMulNBits(x, q, s)` (symmetric: zero point 8, the fast path) + `blocksum(x) @ offsets`, offsets (K/32, N)
    = s·(8 − zp) = 8·s − m. Exact in real arithmetic; the extra weight is one float per block per output.

    These nodes compute in fp32 (accuracy_level 1), not with int8-quantized activations: on the real 0.5B (12 Q4_K
    `down_proj`) int8 activations cost +1.8% perplexity (9.34 vs 9.17) for 1 tok/s of decode (30.2 vs 29.2)."""
    nb = k_in // spec.block
    shapes = spec.shapes(n_out, k_in)
    b = _initializer(f"{w.name}.q4", ir.DataType.UINT8, shapes["B"])
    sc = _initializer(f"{w.name}.scales", ir.DataType.FLOAT, shapes["scales"])
    off = _initializer(f"{w.name}.offsets", ir.DataType.FLOAT, (nb, n_out))
    rank = len(consumers[0].inputs[0].shape)
    blocks = ir.Value(name=f"{w.name}/blocks_shape",
                      const_value=ir.tensor(np.array([0] * (rank - 1) + [nb, spec.block], dtype=np.int64)))
    axes = ir.Value(name=f"{w.name}/blocks_axes", const_value=ir.tensor(np.array([-1], dtype=np.int64)))
    for v in (b, sc, off, blocks, axes):
        g.register_initializer(v)
    for i, mm in enumerate(consumers):
        x, tag = mm.inputs[0], f"{w.name}/{i}"
        nodes = [
            nbits := _node(MS_DOMAIN, "MatMulNBits", [x, b, sc],
                           {"K": k_in, "N": n_out, "bits": spec.bits, "block_size": spec.block,
                            "accuracy_level": 1}, name=f"{tag}/MatMulNBits"),
            xb := _node("", "Reshape", [x, blocks], name=f"{tag}/x_blocks"),
            xs := _node("", "ReduceSum", [xb.outputs[0], axes], {"keepdims": 0}, name=f"{tag}/x_block_sums"),
            corr := _node("", "MatMul", [xs.outputs[0], off], name=f"{tag}/offsets"),
        ]
        for n in nodes:
            g.insert_before(mm, n)
        _replace(g, mm, _node("", "Add", [nbits.outputs[0], corr.outputs[0]], name=f"{tag}/plus_offsets"))
    return WeightUse(w.name, "quantized", [b, sc, off], spec, keys=("B", "scales", "offsets"))


def _node(domain: str, op: str, inputs, attrs: dict | None = None, name: str | None = None) -> ir.Node:
    return ir.Node(domain, op, inputs, ir.convenience.convert_attributes(attrs or {}), name=name)


def _initializer(name: str, dtype: ir.DataType, shape) -> ir.Value:
    """An initializer whose data is attached later (weights.py); evaluating it before then is a bug."""

    def unset():
        raise RuntimeError(f"initializer {name} has no data attached")

    t = ir.LazyTensor(unset, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    return ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype), const_value=t)


def _replace(g: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` where `old` was: same output name, shape and type (graph outputs included)."""
    g.insert_before(old, new)
    before, after = old.outputs[0], new.outputs[0]
    name, shape, typ = before.name, before.shape, before.type
    before.replace_all_uses_with(after, replace_graph_outputs=True)
    before.name = f"{name}.__replaced"
    after.name, after.shape, after.type = name, shape, typ
    g.remove(old, safe=True)


def _matmul_to_gemm(g: ir.Graph, mm: ir.Node, w: ir.Value) -> None:
    """x (…, H) @ Wᵀ with W (V, H) kept as stored: Reshape(-1, H) -> Gemm(transB=1) -> Reshape(…, V)."""
    x = mm.inputs[0]
    name = f"{w.name}/head"
    hidden = ir.Value(name=f"{name}.flat_shape", const_value=ir.tensor([-1, w.shape[1]], dtype=ir.DataType.INT64))
    vocab = ir.Value(name=f"{name}.vocab", const_value=ir.tensor([w.shape[0]], dtype=ir.DataType.INT64))
    for c in (hidden, vocab):
        g.register_initializer(c)
    lead = _node("", "Shape", [x], {"start": 0, "end": -1}, name=f"{name}/lead")
    shape = _node("", "Concat", [lead.outputs[0], vocab], {"axis": 0}, name=f"{name}/shape")
    flat = _node("", "Reshape", [x, hidden], name=f"{name}/flatten")
    gemm = _node("", "Gemm", [flat.outputs[0], w], {"transB": 1}, name=f"{name}/Gemm")
    back = _node("", "Reshape", [gemm.outputs[0], shape.outputs[0]], name=f"{name}/unflatten")
    for n in (lead, shape, flat, gemm):
        g.insert_before(mm, n)
    _replace(g, mm, back)


def ops_histogram(model: ir.Model) -> dict[str, int]:
    c = collections.Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in model.graph)
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))
