"""Trace the reference into an ONNX graph with no weights (lowerings are in linears.py, fused.py and fuse.py).

The model is built on the meta device, so tracing costs the same for 0.5B and 72B. Initializers keep the
reference's (Hugging Face) names; their data is attached later by `weights.py`, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import onnx_ir as ir
import torch

from qwen2_ref.config import ModelArgs
from qwen2_ref.model import Qwen2ForCausalLM

from . import custom_ops, fused
from .irutil import node

OPSET = 21


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


_TRACED: dict = {}  # (config, dtype, fused, layout) -> (the traced graph as a ModelProto, its weights' placeholders)


def trace(cfg: ModelArgs, tdtype: torch.dtype, fused_attention: bool = False, attention: str = "bias"
          ) -> ir.Model:
    """The reference in `tdtype` as an ONNX graph (opset 21) with dynamic batch / sequence / past; initializers
    have no data.

    `fused_attention`: attention becomes ORT's GroupQueryAttention (fused.py) instead of standard ops, in the
    `attention` layout ("bias" or "seqlens", fused.ATTENTION_LAYOUTS).

    Each graph is traced once per process (torch.export: ~12 s for the 24-layer 0.5B) and every call gets its own
    copy, which the export's passes then rewrite: a process that exports several precisions of one model (the
    tests; fp32 and int4 trace alike) traces it once."""
    key = (cfg, tdtype, fused_attention, attention, custom_ops.DCA_KEY_BLOCK)  # everything the trace reads
    if key not in _TRACED:
        _TRACED[key] = _without_weights(_trace(cfg, tdtype, fused_attention, attention))
    proto, weights = _TRACED[key]
    model = ir.serde.deserialize_model(proto)
    for name, v in model.graph.initializers.items():
        t = weights[name]  # a fresh wrapper of the same data-less tensor: passes rename theirs
        v.const_value = type(t)(t.raw, name=name)
    return model


def _without_weights(model: ir.Model) -> tuple:
    """The graph serialized with placeholders for its (data-less, meta-device) initializers, and those."""
    weights = {}
    for name, v in model.graph.initializers.items():
        weights[name] = v.const_value
        v.const_value = ir.ExternalTensor("weights-not-attached", 0, 0, v.const_value.dtype, shape=v.const_value.shape,
                                          name=name)
    return ir.serde.serialize_model(model), weights


def _trace(cfg: ModelArgs, tdtype: torch.dtype, fused_attention: bool, attention: str) -> ir.Model:
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg).to(tdtype).eval()
    model.tie_weights()
    table = custom_ops.translation_table()
    if fused_attention:
        fused.use_fused_attention(model)
        table |= fused.translation_table(attention)
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
    onnxruntime-genai never see it (it is not a required input).

    ONNX Runtime logs one warning per session for it ("Initializer logits_to_keep appears in graph inputs and will
    not be treated as constant value/weight"): Graph::Graph warns for every initializer that is also a graph input
    (IR >= 4), with no condition and no model-side switch. Nothing else gives an input a default: a plain input is
    required, and optimum feeds every input `get_inputs()` lists (it fails with "Input logits_to_keep is required
    by model but not provided"); SessionOptions.add_initializer replaces an initializer only after constant
    folding has used the file's value (it has no effect at ORT_ENABLE_ALL); a second, last-position logits output
    would make optimum (which fetches every output) run the vocab-wide head twice in every decode step. So the
    note stays (only log settings hide it, the user's choice); it is harmless: the value must not be folded."""
    g = model.graph
    logits = next(v for v in g.outputs if v.name == "logits")
    head = logits.producer()
    while head is not None and head.op_type in ("Cast", "Reshape"):
        head = head.inputs[0].producer()
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
        seq := node("", "Shape", [x], {"start": 1, "end": 2}, name="logits_to_keep/seq"),
        k := node("", "Reshape", [keep, c["one"]], name="logits_to_keep/k"),
        pos := node("", "Greater", [k.outputs[0], c["zero"]], name="logits_to_keep/given"),
        lo := node("", "Min", [k.outputs[0], seq.outputs[0]], name="logits_to_keep/min"),
        n := node("", "Where", [pos.outputs[0], lo.outputs[0], seq.outputs[0]], name="logits_to_keep/n"),
        start := node("", "Neg", [n.outputs[0]], name="logits_to_keep/start"),
        sl := node("", "Slice", [x, start.outputs[0], c["end"], c["one"]], name="logits_to_keep/slice"),
    ]
    for nd in nodes:
        g.insert_before(head, nd)
    sl.outputs[0].name, sl.outputs[0].type = "logits_to_keep.hidden", x.type
    for user, idx in list(x.uses()):  # the final norm's output feeds only the head (and its shape for Gemm)
        if user not in nodes:
            user.replace_input_with(idx, sl.outputs[0])
    # Still "sequence_length": what the graph returns to anyone who does not feed `logits_to_keep`. optimum with IO
    # binding (its default on CUDA) sizes each output buffer by evaluating the output's dim names over the inputs'
    # ones; a name no input has ("logits_sequence_length") makes it fail with a NameError.
    logits.shape = ir.Shape(["batch_size", "sequence_length", logits.shape[2]])
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
