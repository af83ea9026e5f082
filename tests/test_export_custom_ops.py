"""MoE and Dual Chunk Attention through ONNX against the reference, in both lowerings: `function` (our `qwen2`
domain's function bodies) and `fused` (ONNX Runtime's MoE / GroupQueryAttention / SkipSimplifiedLayerNormalization
kernels; DCA layers keep our DualChunkAttention op there too). Same cases, same tolerances."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.onnx import dequantized_reference, export_onnx, reference_model
from export.onnx.verify import empty_past, ort_step, session
from export.plan import make_plan
from export.tolerances import TINY, TINY_INT4_DEQUANTIZED
from qwen2_ref.config import RopeScaling, from_name

from .conftest import onnx_parity, random_checkpoint

MOE = from_name("tiny-moe")
DCA = from_name("tiny-dca")  # chunk 16, local 4: s = 12
S = DCA.dual_chunk_attention_config.chunk_len


def tokens(n, seed, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def export(tiny_export):
    """(config, label, dtype, lowering) -> (checkpoint, folder, report), from the session's shared exports."""
    def get(cfg, label, dtype="fp32", lowering="function"):
        return tiny_export((label, cfg), dtype, lowering)

    return get


MOE_CASES = {
    "tiny-moe": MOE,
    "moe-norm": MOE.replace(norm_topk_prob=True),
    "moe-step2-mlp-only": MOE.replace(decoder_sparse_step=2, mlp_only_layers=(3,)),
}


LOWERINGS = ["function", "fused"]
MOE_DOMAIN = {"function": "qwen2", "fused": "com.microsoft"}


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("label", list(MOE_CASES))
def test_moe_fp32(export, label, lowering):
    ckpt, out, _ = export(MOE_CASES[label], label, lowering=lowering)
    assert session(out).get_providers() == ["CPUExecutionProvider"]
    p = onnx_parity(out, reference_model(ckpt), [tokens(13, 1), tokens(6, 2)], 4, TINY["fp32"])
    assert p.max_abs_logits <= TINY["fp32"].max_abs_logits and p.top1_agreement == 1.0, p
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    sparse = sum(MOE_CASES[label].is_sparse_layer(i) for i in range(MOE.num_hidden_layers))
    moe = [n for n in m.graph.node if n.op_type == "MoE"]
    assert len(moe) == sparse and {n.domain for n in moe} == {MOE_DOMAIN[lowering]}
    if lowering == "fused":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
        assert attrs["swiglu_fusion"] == 1 and attrs["k"] == MOE.num_experts_per_tok
        assert attrs["normalize_routing_weights"] == int(MOE_CASES[label].norm_topk_prob)
        assert not m.functions  # no qwen2 op left: nothing to inline


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("dtype", ["fp16", "int4"])
def test_moe_lower_precisions(export, dtype, lowering):
    ckpt, out, report = export(MOE, "tiny-moe", dtype, lowering)
    tol = TINY[dtype]
    prompts = [tokens(13, 1), tokens(6, 2)]
    p = onnx_parity(out, reference_model(ckpt), prompts, 4, tol)
    assert p.max_abs_logits <= tol.max_abs_logits and p.top1_agreement >= tol.min_top1_agreement, p
    if dtype == "int4":  # experts stay float in the function form; attention/MLP/head are int4
        # the shared expert (traced as Gemm on flattened tokens) is int4 too; only the two routers stay float
        m = onnx.load(str(out / "model.onnx"), load_external_data=False)
        floats = [i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                  and not i.name.startswith("rope_") and not i.name.endswith(".scales")]
        assert floats and all(n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) for n in floats), floats
        d = onnx_parity(out, dequantized_reference(ckpt, report, out), prompts, 4, TINY_INT4_DEQUANTIZED)
        assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d
        assert d.top1_agreement >= TINY_INT4_DEQUANTIZED.min_top1_agreement, d


DCA_CASES = {"tiny-dca": DCA, "dca-yarn": DCA.replace(rope_scaling=RopeScaling("yarn", 4.0, 32))}


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("label", list(DCA_CASES))
def test_dca_long_prompt_and_decode_past_chunk_boundaries(export, label, lowering):
    cfg = DCA_CASES[label]
    ckpt, out, _ = export(cfg, label, lowering=lowering)
    # 5 chunks + 10 tokens of prompt, then 8 decode steps that cross the boundary at 6s
    prompts = [tokens(5 * S + 10, 3), tokens(3 * S + 1, 4)]
    p = onnx_parity(out, reference_model(ckpt), prompts, 8, TINY["fp32"])
    assert p.max_abs_logits <= TINY["fp32"].max_abs_logits and p.top1_agreement == 1.0, p


def test_dca_key_blocks(tmp_path, monkeypatch):
    """DualChunkAttention's online softmax over key blocks: blocks of 7 keys (not aligned with s = 12 or the
    chunks) across a 5-chunk prompt and decode past chunk boundaries, a left-padded row included."""
    from export.onnx import custom_ops

    monkeypatch.setattr(custom_ops, "DCA_KEY_BLOCK", 7)
    ckpt = random_checkpoint(DCA, "dca-blocks")
    export_onnx(ckpt, make_plan("onnx", ckpt, out=tmp_path / "m", lowering="function", tolerance=TINY["fp32"],
                                gate_batch=2))
    m = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    node = next(n for n in m.graph.node if n.op_type == "DualChunkAttention")
    assert {a.name: a.i for a in node.attribute if a.name == "key_block"} == {"key_block": 7}
    prompts = [tokens(5 * S + 3, 11), tokens(2 * S + 5, 12)]
    p = onnx_parity(tmp_path / "m", reference_model(ckpt), prompts, 8, TINY["fp32"])
    assert p.max_abs_logits <= TINY["fp32"].max_abs_logits and p.top1_agreement == 1.0, p


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_dca_chunked_prefill_in_ort_matches_one_shot_reference(export, lowering):
    ckpt, out, _ = export(DCA, "tiny-dca", lowering=lowering)
    sess = session(out)
    ids = tokens(6 * S + 5, 7)
    ref, _ = reference_model(ckpt)(torch.tensor([ids]))
    past, got = empty_past(sess, 1), []
    for s in range(0, len(ids), 10):  # chunks of 10 do not align with s = 12
        chunk = np.array([ids[s:s + 10]])
        e = s + chunk.shape[1]
        logits, past = ort_step(sess, chunk, np.ones((1, e), dtype=np.int64), np.arange(s, e)[None], past)
        got.append(logits)
    got = np.concatenate(got, axis=1)
    assert np.abs(got - ref.detach().numpy()).max() <= TINY["fp32"].max_abs_logits


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_dca_fp16(export, lowering):
    ckpt, out, _ = export(DCA, "tiny-dca", "fp16", lowering)
    p = onnx_parity(out, reference_model(ckpt), [tokens(5 * S + 2, 5)], 4, TINY["fp16"])
    assert p.max_abs_logits <= TINY["fp16"].max_abs_logits, p


@pytest.mark.parametrize("label", ["moe", "dca"])
def test_checker_and_shape_inference_accept_our_domain(export, label):
    _, out, _ = export(MOE if label == "moe" else DCA, f"tiny-{label}")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    fns = {(f.domain, f.name) for f in m.functions}
    assert fns == {("qwen2", "MoE" if label == "moe" else "DualChunkAttention")}
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
