"""The calibrated 4-bit quantizer (GPTQ) and its calibration text: a quantizer that can fail — its output error on a
layer whose inputs have outlier channels must beat plain round-to-nearest's — and one-line errors for a bad text."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from export.calibrate import (CalibrationError, MIN_TOKENS, SourceRows, StreamedReference, calibrate, calibration_ids,
                              gptq_group)
from export.plan import make_plan
from export.quant import (QuantSpec, _inverse_factor, gptq, output_error, quantize_gptq, quantize_rtn,
                          quantize_weighted)
from qwen2_ref.config import from_name
from qwen2_ref.errors import Qwen2Error

from .conftest import random_checkpoint

SPEC = QuantSpec(4, 32)


def outlier_layer(seed: int = 0, n: int = 96, k: int = 256, tokens: int = 2048):
    """A linear layer (n, k) and inputs whose channels differ in scale by 100x, a few far out (as LLM
    activations do), correlated through a low-rank mix."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    scale = torch.exp(torch.randn(k, generator=g))
    scale[torch.randperm(k, generator=g)[:4]] *= 30.0  # outlier channels
    mix = torch.eye(k) + 0.3 * torch.randn(k, 8, generator=g) @ torch.randn(8, k, generator=g) / 8
    x = (torch.randn(tokens, k, generator=g) @ mix) * scale
    return w, x


def test_gptq_output_error_below_round_to_nearest():
    w, x = outlier_layer()
    h = x.T @ x / x.shape[0]
    rtn = output_error(w, quantize_rtn(w, SPEC), h)
    weighted = output_error(w, quantize_weighted(w, SPEC, torch.diagonal(h)), h)
    gptq = output_error(w, quantize_gptq(w, SPEC, h), h)
    print(f"\nrelative output error: rtn {rtn:.2e}, weighted clip {weighted:.2e}, gptq {gptq:.2e}")
    assert weighted <= rtn
    assert gptq < 0.5 * rtn  # measured: ~0.3x
    # the error is measured, not assumed: on fresh inputs from the same distribution too
    _, x2 = outlier_layer(seed=0, tokens=4096)
    ys = [x2 @ torch.from_numpy(q.dequantize()).T for q in (quantize_rtn(w, SPEC), quantize_gptq(w, SPEC, h))]
    ref = x2 @ w.T
    assert (ys[1] - ref).square().mean() < (ys[0] - ref).square().mean()


def test_gptq_codes_are_valid_blocks():
    w, x = outlier_layer(seed=1, n=40, k=64)
    q = quantize_gptq(w, SPEC, x.T @ x / x.shape[0])
    assert q.codes.dtype == np.uint8 and q.codes.max() <= 15 and q.codes.shape == (40, 64)
    assert q.scales.shape == q.zero_points.shape == (40, 2) and (q.scales > 0).all()
    packed = q.pack()
    assert packed["B"].shape == (40, 2, 16)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_accounts_its_own_output_error(act_order):
    """The error GPTQ reports from its sweep (ΔW = E U, so ΔW (H + λI) ΔWᵀ = E Eᵀ, less the damping's share) is the
    output error measured directly from the dequantized weights, a dead input column included."""
    w, x = outlier_layer(seed=2, n=48, k=320)  # three panels: the error carried across panels is counted too
    x[:, 5] = 0.0
    h = x.T @ x / x.shape[0]
    q, err, power = gptq(w, SPEC, h, act_order)
    torch.testing.assert_close(power, ((w @ h) * w).sum(1), rtol=1e-5, atol=0)
    np.testing.assert_allclose(float(err.sum()) / float(power.sum()), output_error(w, q, h), rtol=1e-4)


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse():
    _, x = outlier_layer(seed=3, k=64)
    h = (x.T @ x / x.shape[0]).double()
    u = _inverse_factor(h)
    assert torch.equal(u, u.triu()) and (torch.diagonal(u) > 0).all()
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h), rtol=1e-8, atol=1e-10)


def test_gptq_row_slices_equal_the_whole(monkeypatch):
    """GPTQ sweeps GPTQ_ROWS rows at a time, reading them from a checkpoint a slice at a time (the LM head is never
    whole in fp32): what one sweep over the whole matrix gives."""
    import export.quant as quant

    w, x = outlier_layer(seed=4, n=100, k=320)
    h = x.T @ x / x.shape[0]
    whole = quantize_gptq(w, SPEC, h)

    class Rows:
        shape = tuple(w.shape)

        def __getitem__(self, rows):
            return w[rows].clone()

    monkeypatch.setattr(quant, "GPTQ_ROWS", 32)
    sliced = quantize_gptq(Rows(), SPEC, h)
    # the same up to the summation order of the matmul that carries errors across panels (its row count differs)
    assert (sliced.codes != whole.codes).mean() <= 1e-3
    np.testing.assert_allclose(sliced.scales, whole.scales, rtol=1e-5)


def test_streamed_reference_calibrates_as_the_model_in_memory():
    """calibrate over a StreamedReference (one fp32 layer at a time, the embedding and the head read in row slices
    from the checkpoint) sees the inputs the model in memory sees: the same H for every group, the head's too."""
    for name in ("tiny", "tiny-untied", "tiny-moe", "tiny-yarn", "tiny-dca"):  # "tiny": the head is the table
        ckpt = random_checkpoint(name)
        model = ckpt.load_model(progress=False)
        names = {n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n} | {"lm_head.weight"}
        ids = torch.randint(0, ckpt.config.vocab_size, (300,), generator=torch.Generator().manual_seed(5)).tolist()

        def record(members, h):
            return {n: (h, w[:]) for n, w in members}

        resident = calibrate(model, ids, record, names)
        streamed = calibrate(StreamedReference(ckpt.config, ckpt.source), ids, record, names)
        assert set(streamed) == set(resident) and "lm_head.weight" in streamed
        assert isinstance(StreamedReference(ckpt.config, ckpt.source).head(), SourceRows)
        for n, (h, w) in resident.items():
            torch.testing.assert_close(streamed[n][0], h, rtol=1e-5, atol=1e-6, msg=n)
            torch.testing.assert_close(streamed[n][1], w.detach(), rtol=0, atol=0, msg=n)


def test_gptq_rows_are_independent_so_groups_split_exactly():
    """q/k/v are quantized as one stacked matrix: each part must equal its own separate GPTQ."""
    w, x = outlier_layer(seed=2, n=48, k=64)
    h = x.T @ x / x.shape[0]
    res = gptq_group(SPEC)([("a", w[:32]), ("b", w[32:])], h)
    for name, part in (("a", w[:32]), ("b", w[32:])):
        alone = quantize_gptq(part, SPEC, h)
        np.testing.assert_array_equal(res[name].quantized.codes, alone.codes)
        np.testing.assert_allclose(res[name].quantized.scales, alone.scales, rtol=1e-6)


def test_calibrate_groups_linears_by_input():
    """One forward; q/k/v share one H, gate/up another; every linear weight gets a result."""
    ckpt = random_checkpoint("tiny")
    model = ckpt.load_model(progress=False)
    names = {n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n}
    groups = []

    def record(members, h):
        groups.append([n for n, _ in members])
        assert h.shape == (members[0][1].shape[1],) * 2
        return {n: None for n, _ in members}

    out = calibrate(model, list(range(300)), record, names)
    assert set(out) == names
    assert ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight"] in groups
    assert ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"] in groups


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "the file is empty"),
    ("   \n", "the file is empty"),
    ("short text", "too short"),
])
def test_bad_calibration_file_is_one_clear_line(tmp_path, real_tokenizer, content, message):
    path = tmp_path / "cal.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError) as e:
        calibration_ids(real_tokenizer, path)
    text = str(e.value)
    assert "\n" not in text and str(path) in text and message in text


def test_default_calibration_text_is_shipped_and_held_out(real_tokenizer):
    from export.evaluate import fixed_text

    ids = calibration_ids(real_tokenizer)
    assert len(ids) >= MIN_TOKENS
    cal = real_tokenizer.decode(ids)
    held_out = fixed_text()
    # no shared line of any length (beyond trivial ones) between the calibration text and the evaluation text
    common = {ln.strip() for ln in cal.splitlines() if len(ln.strip()) > 30} & \
        {ln.strip() for ln in held_out.splitlines() if len(ln.strip()) > 30}
    assert not common, sorted(common)[:3]


def test_plan_quantizer_choices():
    ckpt = random_checkpoint("tiny")
    assert make_plan("onnx", ckpt, dtype="int4").recipe == "gguf-exact"  # floats: round-to-nearest 4-bit
    assert make_plan("onnx", ckpt, dtype="int4", quantizer="calibrated").recipe == "calibrated"
    assert make_plan("onnx", ckpt, dtype="int4", quantizer="rtn").recipe == "requantize"
    assert make_plan("onnx", ckpt, dtype="int4", requantize=True).recipe == "requantize"
    for kw, msg in (({"dtype": "fp32", "quantizer": "rtn"}, "--quantizer applies to ONNX int4 and Core ML int4"),
                    ({"dtype": "int4", "quantizer": "exact", "calibration": "x.txt"}, "--calibration applies"),
                    ({"dtype": "int4", "quantizer": "gptq"}, "is not one of"),
                    ({"dtype": "int4", "quantizer": "exact", "requantize": True}, "contradicts")):
        with pytest.raises(Qwen2Error, match=msg):
            make_plan("onnx", ckpt, **kw)


@pytest.mark.parametrize("model", ["tiny", "tiny-untied"])
def test_calibrated_export_matches_its_dequantized_reference(tiny_export, model):
    """`--quantizer calibrated` end to end on a tiny model (no tokenizer: seeded token ids): every linear weight
    is GPTQ's (a tied table as the head: the embedding gathers from its blocks; an untied embedding is not a linear
    weight), and the export computes what the reference does with the written weights."""
    from export.onnx import dequantized_reference, reference_model
    from export.tolerances import TINY, TINY_INT4_DEQUANTIZED

    from .conftest import onnx_parity

    ckpt, out, report = tiny_export(model, "int4", quantizer="calibrated")
    assert report["plan"]["recipe"] == "calibrated" and report["calibration"]["method"] == "gptq"
    gptq = {n for n, q in report["quantized"].items() if q["from"] == "gptq"}
    tied = ckpt.config.tie_word_embeddings
    assert ("model.embed_tokens.weight" in gptq) == tied, gptq
    assert all(q["from"] == "gptq" for n, q in report["quantized"].items() if tied or "embed_tokens" not in n)
    prompts = [[5, 9, 200, 31, 77, 12], [8, 1, 3]]
    p = onnx_parity(out, reference_model(ckpt), prompts, 4, TINY["int4"])
    assert p.max_abs_logits <= TINY["int4"].max_abs_logits, p
    d = onnx_parity(out, dequantized_reference(ckpt, report, out), prompts, 4, TINY_INT4_DEQUANTIZED)
    assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d
    assert d.top1_agreement >= TINY_INT4_DEQUANTIZED.min_top1_agreement, d


def test_default_int4_recipe():
    """reblock for ONNX with fp32 activations (what its speed was measured on) from a GGUF, else exact; the real
    GGUF's default export is checked in tests/test_export_real.py."""
    from types import SimpleNamespace

    from export.plan import _default_quantizer
    from export.precision import PRECISIONS

    cpu, gpu = PRECISIONS["onnx"]["int4"], PRECISIONS["onnx"]["int4"].with_activations("fp16")
    gguf, hf = SimpleNamespace(kind="gguf"), SimpleNamespace(kind="hf")
    assert _default_quantizer("onnx", gguf, cpu) == "reblock"
    assert _default_quantizer("onnx", gguf, gpu) == "exact"
    assert _default_quantizer("onnx", hf, cpu) == "exact"
    assert _default_quantizer("coreml", gguf, PRECISIONS["coreml"]["int4"]) == "exact"
    ckpt = random_checkpoint("tiny")
    assert make_plan("onnx", ckpt, dtype="int4").recipe == "gguf-exact"
    assert make_plan("onnx", ckpt, dtype="int4", quantizer="reblock").recipe == "gguf-reblock"
    with pytest.raises(Qwen2Error, match="--quantizer reblock applies to ONNX int4"):
        make_plan("coreml", ckpt, dtype="int4", quantizer="reblock")


# ---- re-blocked GGUF 8-bit codes (--quantizer reblock, ONNX int4's default) ------------------------------------
@pytest.mark.parametrize("gtype,k", [("Q8_0", 256), ("Q5_0", 384), ("Q6_K", 512), ("Q4_K", 256), ("Q4_1", 256),
                                     ("Q4_0", 64), ("Q8_0", 96)])
def test_reblocked_gguf_codes_are_within_half_a_step_of_the_file(gtype, k):
    """8-bit codes (Q5_0, Q8_0, Q6_K) move to blocks of 128 where 128 divides the row, unclipped: every weight
    within half an 8-bit step (1/510 of its block's range) of gguf-py's dequantization of the file's bytes
    (llama.cpp's reader: an independent implementation); Q4_K keeps the file's codes with its float zero points
    folded (integer zero points + remainders on an 8-bit grid: within 1/510 of the remainders' range); Q4_0, and
    rows 128 does not divide, are carried exactly as before."""
    import gguf

    from export.quant import GGUF_EXACT, WIDE_BLOCK, carried_spec, quantize_from_gguf

    from .damaged import _random_k_blocks

    rng = np.random.default_rng(3)
    qt = gguf.GGMLQuantizationType[gtype]
    if gtype in ("Q4_K", "Q6_K"):
        raw = _random_k_blocks(rng, (12, k), gtype)
    else:
        w = rng.standard_normal((12, k)).astype(np.float32)
        w[:, 5] *= 30  # an outlier column: clipping would pay for it
        raw = gguf.quants.quantize(w, qt)
    want = gguf.quants.dequantize(raw, qt).reshape(12, k)
    spec = carried_spec(gtype, reblock=True, row=k)
    q = quantize_from_gguf(gtype, raw, want, spec)
    got = q.dequantize()
    if GGUF_EXACT[gtype][2].float_zp:  # Q4_K, Q4_1: the file's codes and scales, the zero points folded
        assert spec == dataclasses.replace(GGUF_EXACT[gtype][2], folded=True)
        exact = quantize_from_gguf(gtype, raw, want)  # checked there against the file's values
        np.testing.assert_array_equal(q.codes, exact.codes)
        rest = exact.scales * (np.clip(np.round(exact.zero_points), 0, 15) - exact.zero_points)
        span = np.maximum(rest.max(1), 0) - np.minimum(rest.min(1), 0)  # k <= 1024: one group of 32 blocks a row
        err = np.abs(got - want)
        assert (err <= span[:, None] / 510 * (1 + 1e-4) + 1e-7).all() and err.max() > 0
        return
    if GGUF_EXACT[gtype][2].bits == 4 or k % WIDE_BLOCK:
        assert spec == GGUF_EXACT[gtype][2]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
        return
    assert (spec.bits, spec.block, spec.source) == (8, WIDE_BLOCK, gtype)
    assert q.scales.shape == (12, -(-k // WIDE_BLOCK))
    nb = -(-k // WIDE_BLOCK)
    pad = np.zeros((12, nb * WIDE_BLOCK), np.float32)
    pad[:, :k] = want
    blocks = pad.reshape(12, nb, WIDE_BLOCK)
    span = np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)  # the fitted range always holds 0
    err = np.abs(got - want).reshape(12, -1)
    # half a step, plus fp32 rounding of (x/s + z) and (c - z)*s: up to ~255 * 2^-23 of a step, 6e-5 of the bound
    bound = np.repeat(span / 510, WIDE_BLOCK, axis=1)[:, :k] * (1 + 3e-4) + 1e-7
    assert (err <= bound).all(), float((err / bound).max())
    assert err.max() > 0  # a different grid: not the file's codes passed through


def test_folded_zero_points_export_computes_its_reference():
    """A GGUF whose linears are Q4_K and Q4_1 (float zero points): the default int4 ONNX export folds them (integer
    zero points and the remainders in one MatMulNBits over [x, block sums, block sums]; one folded input per
    distinct x, shared by the packed q/k/v and by gate/up; no offsets MatMul), `--quantizer exact` keeps a separate
    fp32 `blocksum(x) @ offsets` per weight. Prefill and decode, for both:
    - against the GGUF's floats within the int4 tolerance;
    - with fp32 activations (accuracy level 0), against the written weights dequantized, up to fp32 rounding: the
      graph computes exactly what it stores;
    - with int8 activations (what exports run), the folded form as close to its written weights as the exact form
      to its own (these random K-quant blocks are larger than real ones, so both sit above TINY_INT4_DEQUANTIZED)."""
    import tempfile
    from pathlib import Path

    import onnx

    from export.onnx import dequantized_reference, export_onnx, reference_model
    from export.tolerances import TINY, Tolerance
    from qwen2_ref.checkpoint import open_checkpoint

    from .conftest import onnx_parity
    from .damaged import write_tiny_gguf

    types = {"attn_q.weight": "Q4_K", "attn_k.weight": "Q4_K", "attn_v.weight": "Q4_K", "attn_output.weight": "Q4_K",
             "ffn_gate.weight": "Q4_K", "ffn_up.weight": "Q4_K", "ffn_down.weight": "Q4_1"}
    cfg = from_name("tiny").replace(hidden_size=256, intermediate_size=256)  # Q4_K's super-blocks of 256
    prompts = [[5, 9, 200, 31, 77, 12], [8, 1, 3]]
    L = cfg.num_hidden_layers
    with tempfile.TemporaryDirectory() as d:
        ckpt = open_checkpoint(write_tiny_gguf(Path(d) / "t.gguf", cfg, types))
        int8 = {}
        for quantizer in (None, "exact"):
            out = Path(d) / f"out-{quantizer}"
            kw = {} if quantizer is None else {"quantizer": quantizer}
            report = export_onnx(ckpt, make_plan("onnx", ckpt, dtype="int4", out=out, verify=False, **kw))
            linears = {n: v for n, v in report["quantized"].items() if ".layers." in n}
            assert len(linears) == 7 * L
            assert all((v["from"] in ("Q4_K", "Q4_1"), v["bits"], v["block"], v.get("folded", False))
                       == (True, 4, 32, quantizer is None) for v in linears.values()), linears
            model = onnx.load(str(out / "model.onnx"), load_external_data=False)
            ops = [n.op_type for n in model.graph.node]
            qkv = sum("qkv" in n.name and n.op_type == "MatMulNBits" for n in model.graph.node)
            folded = sum(n.op_type == "Concat" and n.name.endswith("/folded/concat") for n in model.graph.node)
            if quantizer is None:
                assert (qkv, folded, ops.count("MatMul")) == (L, 4 * L, 0), ops
            else:
                assert (qkv, folded, ops.count("MatMul")) == (0, 0, 7 * L), ops
            p = onnx_parity(out, reference_model(ckpt), prompts, 4, TINY["int4"])
            assert p.max_abs_logits <= TINY["int4"].max_abs_logits, p
            written = dequantized_reference(ckpt, report, out)
            int8[quantizer] = onnx_parity(out, written, prompts, 4, Tolerance(1.0, 0.0)).max_abs_logits
            for n in model.graph.node:  # the same graph with fp32 activations
                for a in n.attribute:
                    if a.name == "accuracy_level":
                        a.i = 0
            onnx.save(model, str(out / "model.onnx"))
            r = onnx_parity(out, written, prompts, 4, TINY["fp32"])
            assert r.max_abs_logits <= TINY["fp32"].max_abs_logits, r
        assert int8[None] <= 1.1 * int8["exact"] + 1e-3, int8


@pytest.mark.parametrize("tied", [True, False])
def test_float_zero_point_table_is_gathered_as_8bit_codes(tied):
    """A Q4_K embedding table (tied to the head or not; an untied Qwen2 Q4_K_M file from 7B up has one) under the
    default int4 recipe: GatherBlockQuantized takes integer zero points only, so the table travels as 8-bit codes on
    blocks of 128, each value within half a step (1/510 of its block's range) of gguf-py's dequantization of the
    file, gathered (and, tied, read by the head) from that one copy; the export computes exactly those weights with
    fp32 activations, prefill and decode. `exact` keeps the float table for the gather, and a tied head reads the
    file's blocks with their float zero points, which read back as the file's values."""
    import tempfile
    from pathlib import Path

    import gguf
    import onnx

    from export.onnx import dequantized_reference, export_onnx
    from export.onnx.verify import read_dequantized
    from export.tolerances import TINY, Tolerance
    from qwen2_ref.checkpoint import open_checkpoint

    from .conftest import onnx_parity
    from .damaged import write_tiny_gguf

    cfg = from_name("tiny").replace(hidden_size=256, intermediate_size=256, tie_word_embeddings=tied)
    with tempfile.TemporaryDirectory() as d:
        path = write_tiny_gguf(Path(d) / "t.gguf", cfg, {"token_embd.weight": "Q4_K", "output.weight": "Q6_K"})
        ckpt = open_checkpoint(path)
        out = Path(d) / "out"
        report = export_onnx(ckpt, make_plan("onnx", ckpt, dtype="int4", out=out, verify=False))
        table = report["quantized"]["model.embed_tokens.weight"]
        assert (table["from"], table["bits"], table["block"]) == ("Q4_K", 8, 128), table
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
        assert not any(t.name == "model.embed_tokens.weight" for t in model.graph.initializer)  # no float copy
        raw = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
        want = gguf.quants.dequantize(raw.data, raw.tensor_type).reshape(cfg.vocab_size, cfg.hidden_size)
        got = read_dequantized(out, report, cfg)["model.embed_tokens.weight"]
        blocks = want.reshape(cfg.vocab_size, -1, 128)
        span = np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)
        err = np.abs(got - want).reshape(cfg.vocab_size, -1, 128)
        assert (err <= span[..., None] / 510 * (1 + 3e-4) + 1e-7).all() and err.max() > 0
        for n in model.graph.node:  # with fp32 activations the export computes its written weights
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
        onnx.save(model, str(out / "model.onnx"))
        written = dequantized_reference(ckpt, report, out)
        prompts = [[5, 9, 200, 31, 77, 12], [8, 1, 3]]
        with torch.no_grad():  # fp32 rounding scales with the logits (large from these random K-quant blocks)
            scale = max(float(written(torch.tensor([ids]))[0].abs().max()) for ids in prompts)
        fp32 = Tolerance(TINY["fp32"].max_abs_logits * max(1.0, scale / 10), 1.0)
        r = onnx_parity(out, written, prompts, 4, fp32)
        assert r.max_abs_logits <= fp32.max_abs_logits, (r, scale)
        if tied:
            out = Path(d) / "exact"
            report = export_onnx(ckpt, make_plan("onnx", ckpt, dtype="int4", out=out, verify=False, quantizer="exact"))
            table = report["quantized"]["model.embed_tokens.weight"]
            assert (table["from"], table["bits"], table["block"]) == ("Q4_K", 4, 32), table
            got = read_dequantized(out, report, cfg)["model.embed_tokens.weight"]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("quantizer", [None, "head"])
def test_reblock_export_computes_its_reference(quantizer):
    """The default int4 ONNX export of a GGUF (tied table Q8_0: the head and the gathered embedding share 8-bit
    blocks of 128; q/k/v Q5_0/Q8_0/Q6_K, re-blocked alike, so packed into one matmul; Q4_0 and Q6_K elsewhere)
    writes the 8-bit tensors on blocks of 128, the 4-bit one as in the file, and computes what the reference does:
    against the GGUF's own floats within the int4 tolerance, against the written weights dequantized within the
    wide-block tolerance, prefill and decode. `head` (no budget: its 4-bit head) writes the rest the same way."""
    import tempfile
    from pathlib import Path

    import onnx

    from export.onnx import dequantized_reference, export_onnx, reference_model
    from export.tolerances import TINY, TINY_INT4_DEQUANTIZED_WIDE as WIDE
    from qwen2_ref.checkpoint import open_checkpoint

    from .conftest import onnx_parity
    from .damaged import write_tiny_gguf

    types = {"attn_q.weight": "Q5_0", "attn_k.weight": "Q8_0", "attn_v.weight": "Q6_K", "attn_output.weight": "Q4_0",
             "ffn_down.weight": "Q6_K"}
    cfg = from_name("tiny").replace(hidden_size=256, intermediate_size=256)  # Q6_K's super-blocks of 256
    with tempfile.TemporaryDirectory() as d:
        ckpt = open_checkpoint(write_tiny_gguf(Path(d) / "t.gguf", cfg, types))
        kw = {} if quantizer is None else {"quantizer": quantizer, "max_kl": 1e9}
        plan = make_plan("onnx", ckpt, dtype="int4", out=Path(d) / "out", verify=False, **kw)
        assert plan.recipe == {None: "gguf-reblock", "head": "head"}[quantizer]
        report = export_onnx(ckpt, plan)
        q = report["quantized"]

        def form(part: str) -> set:
            return {(v["from"], v["bits"], v["block"]) for n, v in q.items() if part in n}
        assert form("q_proj") == {("Q5_0", 8, 128)} and form("k_proj") == {("Q8_0", 8, 128)}
        assert form("v_proj") == {("Q6_K", 8, 128)} and form("down_proj") == {("Q6_K", 8, 128)}
        assert form("o_proj") == {("Q4_0", 4, 32)}
        table = q["model.embed_tokens.weight"]
        if quantizer is None:
            assert (table["from"], table["bits"], table["block"]) == ("Q8_0", 8, 128), table
        else:
            assert report["calibration"]["groups"]["head"]["choice"] == "4-bit" and table["bits"] == 4, table
        graph = onnx.load(str(Path(d) / "out" / "model.onnx"), load_external_data=False).graph
        assert sum("qkv" in n.name and n.op_type == "MatMulNBits" for n in graph.node) == cfg.num_hidden_layers
        prompts = [[5, 9, 200, 31, 77, 12], [8, 1, 3]]
        p = onnx_parity(Path(d) / "out", reference_model(ckpt), prompts, 4, TINY["int4"])
        assert p.max_abs_logits <= TINY["int4"].max_abs_logits, p
        r = onnx_parity(Path(d) / "out", dequantized_reference(ckpt, report, Path(d) / "out"), prompts, 4, WIDE)
        assert r.max_abs_logits <= WIDE.max_abs_logits and r.top1_agreement >= WIDE.min_top1_agreement, r
