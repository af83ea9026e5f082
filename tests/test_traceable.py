"""The MoE and DCA computations are single opaque nodes under torch.export (what the ONNX exporter maps to custom
ONNX ops), and the traced program computes what eager does."""

from __future__ import annotations

import pytest
import torch

from qwen2_ref.checkpoint import random_model
from qwen2_ref.config import from_name


class Step(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, pos, mask, k0, v0, k1, v1):
        logits, present = self.model(ids, position_ids=pos, attention_mask=mask, past=((k0, v0), (k1, v1)))
        return logits, present


@pytest.mark.parametrize("name,op", [("tiny-moe", "qwen2.moe_experts"), ("tiny-dca", "qwen2.dual_chunk_attention"),
                                     ("tiny-yarn", None)])
def test_export_has_custom_op_and_matches_eager(name, op):
    cfg = from_name(name)
    if cfg.num_hidden_layers != 2:
        cfg = cfg.replace(num_hidden_layers=2, mlp_only_layers=())
    model = random_model(cfg, seed=2)
    args = make_inputs(cfg, 2, 5, 30)
    b = t = p = s = torch.export.Dim.DYNAMIC
    shapes = ({0: b, 1: t}, {0: b, 1: t}, {0: b, 1: s}, *({0: b, 2: p},) * 4)
    ep = torch.export.export(Step(model), args, dynamic_shapes=shapes)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    if op:
        assert sum(op in t for t in targets) == cfg.num_hidden_layers
    for B, T, P in ((2, 5, 30), (3, 2, 7), (2, 9, 0)):  # the traced shapes and others: batch/seq/past are dynamic
        args = make_inputs(cfg, B, T, P)
        want = Step(model)(*args)
        got = ep.module()(*args)
        assert (got[0] - want[0]).abs().max() <= 1e-5


def make_inputs(cfg, B, T, P):
    kv = [torch.randn(B, cfg.num_key_value_heads, P, cfg.head_dim) for _ in range(4)]
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    mask = torch.ones(B, P + T, dtype=torch.long)
    mask[1, :min(4, P + T - 1)] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -T:].clone()
    return (ids, pos, mask, *kv)
