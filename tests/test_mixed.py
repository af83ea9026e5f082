"""`--quantizer mixed`: per group of weights, 4-bit or its wide form (a GGUF's blocks as reblock writes them, a
float checkpoint's 8-bit), chosen by measured KL within --max-kl. The choice recorded in the report is the one written (read back from
the export), the budget holds on the measurement the choice is made on, and the sensitivity shortcut (a forward from
a group's own layer) measures what a whole forward does."""

from __future__ import annotations

import pytest
import torch

from export.calibrate import MIN_TOKENS
from export.mixed import _compare_heads, _groups, _Probe, _split
from export.onnx import dequantized_reference, export_onnx, reference_model
from export.plan import make_plan
from export.tolerances import TINY_INT4_DEQUANTIZED
from qwen2_ref.checkpoint import open_checkpoint
from qwen2_ref.config import from_name
from qwen2_ref.errors import Qwen2Error

from .conftest import onnx_parity, random_checkpoint
from .damaged import write_tiny_gguf

# attention and gate as 8-bit codes (candidates), up already 4-bit (no choice), down 8-bit
TYPES = {"attn_q.weight": "Q5_0", "attn_k.weight": "Q5_0", "attn_v.weight": "Q8_0", "attn_output.weight": "Q5_0",
         "ffn_gate.weight": "Q8_0", "ffn_up.weight": "Q4_0", "ffn_down.weight": "Q8_0"}
PROMPTS = [[5, 9, 200, 31, 77, 12], [8, 1, 3]]


@pytest.fixture(scope="module")
def gguf_ckpt(tmp_path_factory):
    # rows of 64 and 96: none re-blocked (128 divides neither), so every wide form is the file's own values and the
    # head recipe's streamed measurement can be held to the whole model's (re-blocking: tests/test_quant.py)
    cfg = from_name("tiny").replace(tie_word_embeddings=False, intermediate_size=96)
    return open_checkpoint(write_tiny_gguf(tmp_path_factory.mktemp("mixed") / "tiny.gguf", cfg, TYPES))


@pytest.fixture(scope="module")
def mixed(gguf_ckpt, tmp_path_factory):
    """max_kl -> (folder, report), each exported once."""
    root, done = tmp_path_factory.mktemp("mixed-out"), {}

    def get(max_kl: float):
        if max_kl not in done:
            out = root / f"kl-{max_kl}"
            plan = make_plan("onnx", gguf_ckpt, dtype="int4", quantizer="mixed", max_kl=max_kl, out=out,
                             verify=False)
            done[max_kl] = out, export_onnx(gguf_ckpt, plan)
        return done[max_kl]
    return get


def _choices(report) -> dict[str, str]:
    """tensor -> "4-bit" | "wide", from the report's per-group account."""
    out = {}
    for name, g in report["calibration"]["groups"].items():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        kind = name.rsplit(".", 1)[-1]
        parts = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_in": ("gate_proj", "up_proj"),
                 "down": ("down_proj",), "head": ("lm_head",)}[kind]
        for t in report["quantized"]:
            if any(f".{p}." in f".{t}" for p in parts) and (layer is None or f"layers.{layer}." in t):
                out[t] = g["choice"]
    return out


def test_no_budget_keeps_every_exact_block(mixed):
    _, report = mixed(0.0)
    assert all(g["choice"] == "wide" and g["kl"] > 0 for g in report["calibration"]["groups"].values())
    froms = {n: q["from"] for n, q in report["quantized"].items()}
    assert all(f in ("Q5_0", "Q8_0", "Q4_0") for f in froms.values()), froms


def test_unbounded_budget_takes_every_candidate_to_4bit_and_the_export_computes_it(mixed, gguf_ckpt):
    out, report = mixed(1e9)
    q = report["quantized"]
    assert all(g["choice"] == "4-bit" for g in report["calibration"]["groups"].values())
    for n, info in q.items():
        if "up_proj" in n or "embed_tokens" in n:  # already 4-bit / a gather: not candidates
            assert info["from"] == TYPES["ffn_up.weight"] if "up_proj" in n else info["from"] != "mixed"
        else:
            assert info["from"] == "mixed" and info["bits"] == 4, (n, info)
    d = onnx_parity(out, dequantized_reference(gguf_ckpt, report, out), PROMPTS, 4, TINY_INT4_DEQUANTIZED)
    assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d


def test_a_partial_budget_holds_and_the_report_says_what_was_written(mixed, gguf_ckpt):
    _, full = mixed(1e9)
    kls = sorted(g["kl"] for g in full["calibration"]["groups"].values())
    budget = round(sum(kls) / 2, 6)
    out, report = mixed(budget)
    cal = report["calibration"]
    chosen = [g for g in cal["groups"].values() if g["choice"] == "4-bit"]
    assert 0 < len(chosen) < len(cal["groups"])
    assert cal["kl"] <= budget and cal["max_kl"] == budget
    assert sum(g["kl"] for g in chosen) <= budget + 1e-9
    for t, choice in _choices(report).items():
        f = report["quantized"][t]["from"]
        assert (f == "mixed") == (choice == "4-bit") or f == "Q4_0", (t, choice, f)
    assert cal["held_aside_tokens"] > 0 and cal["held_aside_perplexity_increase"] is not None
    d = onnx_parity(out, dequantized_reference(gguf_ckpt, report, out), PROMPTS, 4, TINY_INT4_DEQUANTIZED)
    assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d


def test_sensitivity_from_a_layer_equals_a_whole_forward(gguf_ckpt):
    """The shortcut each group's measurement takes (a forward from its layer's cached input) gives what a forward
    from the embeddings gives with the same change, and nothing changed measures 0."""
    model = reference_model(gguf_ckpt)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probe = _Probe(model, ids)
        probe.reference()
        assert probe.kl(0) == pytest.approx(0.0, abs=1e-7)
        w = model.model.layers[1].mlp.down_proj.weight
        w.mul_(-3.0)
        from_layer, whole = probe.kl(1), probe.kl(0)
    assert from_layer > 1e-5 and from_layer == pytest.approx(whole, rel=1e-4)


def test_a_tied_head_is_measured_from_the_embedding():
    """A tied table is also the export's embedding: the head's group is measured by a forward from the embedding
    (a change to the table shows in the embedding too), which equals an uncached forward of the whole model."""
    ckpt = random_checkpoint("tiny")
    model = reference_model(ckpt)
    assert model.config.tie_word_embeddings
    head = [g for g in _groups(model.config, {"lm_head.weight"}, ckpt.source) if g.name == "head"]
    assert [g.layer for g in head] == [-1]
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        probe = _Probe(model, ids)
        probe.reference()
        w = model.lm_head.weight
        w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
        logits, _ = model(ids)
        ref = probe.ref
        whole = float((ref.exp() * (ref - torch.log_softmax(logits[0].float(), -1))).sum(-1).mean())
        from_embedding, from_head = probe.kl(-1), probe.kl(model.config.num_hidden_layers)
    assert whole > 1e-4 and from_embedding == pytest.approx(whole, rel=1e-4)
    assert abs(from_head - whole) > 1e-3 * whole  # the cached path would miss the embedding's change


def test_kl_is_measured_on_tokens_gptq_did_not_fit():
    """GPTQ fits on the first calibration tokens, the groups' KL is measured on the next ones and the choice checked
    on the ones after; a text too short for that measures on the last fitted tokens (and the report says so)."""
    ids = list(range(2000))
    assert _split(ids) == (ids[:1024], ids[1024:1280], ids[1280:1792])
    fit, sens, aside = _split(ids[:600])
    assert (len(fit), sens, aside) == (344, ids[344:600], [])
    fit, sens, aside = _split(ids[:1100])  # GPTQ runs whole 512-token sequences: the rest goes to the others
    assert (len(fit), sens, aside) == (512, ids[512:768], ids[768:1100])
    fit, sens, aside = _split(ids[:400])
    assert (len(fit), sens, aside) == (MIN_TOKENS, ids[:MIN_TOKENS], [])


def test_float_checkpoint_wide_form_is_8bit(tmp_path):
    ckpt = random_checkpoint("tiny")
    out = tmp_path / "out"
    report = export_onnx(ckpt, make_plan("onnx", ckpt, dtype="int4", quantizer="mixed", max_kl=0.0, out=out,
                                         verify=False))
    froms = {(q["from"], q["bits"]) for n, q in report["quantized"].items()}
    assert froms == {("rtn8", 8)}, froms  # the tied table too: the head's wide form, gathered at 8 bits
    d = onnx_parity(out, dequantized_reference(ckpt, report, out), PROMPTS, 4, TINY_INT4_DEQUANTIZED)
    assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d


def test_a_tied_table_is_a_candidate_and_the_export_computes_it(tmp_path):
    """A tied embedding/head table is the head's candidate: measured, chosen, written once in its 4-bit form (the
    embedding gathering from the same blocks), and the export computes what the report says it wrote."""
    ckpt = random_checkpoint("tiny")
    assert ckpt.config.tie_word_embeddings
    out = tmp_path / "out"
    report = export_onnx(ckpt, make_plan("onnx", ckpt, dtype="int4", quantizer="mixed", max_kl=1e9, out=out,
                                         verify=False))
    assert report["calibration"]["groups"]["head"]["choice"] == "4-bit"
    assert report["quantized"]["model.embed_tokens.weight"]["from"] == "mixed", report["quantized"]
    d = onnx_parity(out, dequantized_reference(ckpt, report, out), PROMPTS, 4, TINY_INT4_DEQUANTIZED)
    assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d


def test_plan_refusals():
    ckpt = random_checkpoint("tiny")
    assert make_plan("onnx", ckpt, dtype="int4", quantizer="mixed").recipe == "mixed"
    for target, kw, msg in (("onnx", {"quantizer": "exact", "max_kl": 0.01}, "--max-kl applies"),
                            ("onnx", {"quantizer": "mixed", "max_kl": -1.0}, "--max-kl -1.0"),
                            ("onnx", {"quantizer": "mixed", "max_kl": float("nan")}, "--max-kl nan"),
                            ("coreml", {"quantizer": "mixed"}, "--quantizer mixed applies to ONNX"),
                            ("coreml", {"quantizer": "head"}, "--quantizer head applies to ONNX")):
        with pytest.raises(Qwen2Error, match=msg):
            make_plan(target, ckpt, dtype="int4", **kw)


def _head_kl(ckpt, tmp_path, quantizer: str, max_kl: float) -> tuple[dict, object]:
    out = tmp_path / f"{quantizer}-{max_kl}"
    report = export_onnx(ckpt, make_plan("onnx", ckpt, dtype="int4", quantizer=quantizer, max_kl=max_kl, out=out,
                                         verify=False))
    return report, out


@pytest.mark.parametrize("tied", [False, True])
def test_head_recipe_measures_what_the_whole_model_measures(tied, gguf_ckpt, mixed, tmp_path):
    """`--quantizer head` measures the head's KL from the streamed pass's final-norm outputs, no model in memory (a
    tied table: a second streamed pass from its 4-bit rows); that equals the KL `mixed` measures on the fp32 model
    with the same 4-bit form, and the export computes what the report says it wrote. (GGUF sources with no row that
    128 divides: every other weight's blocks are the file's, the reference's values, so both measure against the
    same model.)"""
    tiny = from_name("tiny").replace(intermediate_size=96)  # as gguf_ckpt: no row re-blocked
    ckpt = open_checkpoint(write_tiny_gguf(tmp_path / "tied.gguf", tiny)) if tied else gguf_ckpt
    whole = _head_kl(ckpt, tmp_path, "mixed", 1e9)[0] if tied else mixed(1e9)[1]
    report, out = _head_kl(ckpt, tmp_path, "head", 1e9)
    cal = report["calibration"]
    assert list(cal["groups"]) == ["head"] and cal["method"].startswith("head")
    kl = cal["groups"]["head"]["kl"]
    assert kl > 1e-5 and kl == pytest.approx(whole["calibration"]["groups"]["head"]["kl"], rel=1e-3)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert report["quantized"][head]["from"] == "mixed"
    others = {q["from"] for n, q in report["quantized"].items() if n != head}
    assert "mixed" not in others  # every other weight as --quantizer reblock
    assert cal["held_aside_tokens"] > 0 and cal["held_aside_perplexity_increase"] is not None
    ref = dequantized_reference(ckpt, report, out)
    d = onnx_parity(out, ref, PROMPTS, 4, TINY_INT4_DEQUANTIZED)
    assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d


def test_head_recipe_keeps_a_head_over_budget_wide(gguf_ckpt, tmp_path):
    report, _ = _head_kl(gguf_ckpt, tmp_path, "head", 0.0)
    head = report["calibration"]["groups"]["head"]
    assert head["choice"] == "wide" and head["kl"] > 0
    assert report["calibration"]["held_aside_perplexity_increase"] is None
    assert report["quantized"]["lm_head.weight"]["from"] == "Q8_0"  # the file's own blocks
    assert "mixed" not in {q["from"] for q in report["quantized"].values()}


def test_head_comparison_over_vocabulary_slices_equals_whole_softmax():
    """`_compare_heads` (running maxima over slices of head rows) gives the KL and NLLs of whole softmaxes."""
    g = torch.Generator().manual_seed(4)
    T, H, V = 9, 16, 53
    hw, hl = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    ww, wl = 3 * torch.randn(V, H, generator=g), 3 * torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[:3] = -1
    kl, nll_w, nll_l = _compare_heads(hw, hl, lambda a, b: ww[a:b], lambda a, b: wl[a:b], V, targets, rows=7)
    a, b = torch.log_softmax(hw @ ww.T, -1), torch.log_softmax(hl @ wl.T, -1)
    assert torch.allclose(kl, (a.exp() * (a - b)).sum(-1), rtol=1e-4, atol=1e-5)
    sel = targets >= 0
    assert torch.allclose(nll_w[sel], -a[sel, targets[sel]], rtol=1e-5)
    assert torch.allclose(nll_l[sel], -b[sel, targets[sel]], rtol=1e-5)


@pytest.mark.parametrize("max_kl", [0.0, 1e9])
def test_head_recipe_on_a_tied_float_checkpoint(max_kl, tmp_path):
    """A float checkpoint's head recipe: the tied table 4-bit (GPTQ) within the budget, else its 8-bit wide form
    (both sides of the KL measured from streamed passes through that table's own rows), every other weight
    round-to-nearest 4-bit as exact writes it; the export computes what its report says it wrote."""
    ckpt = random_checkpoint("tiny")
    report, out = _head_kl(ckpt, tmp_path, "head", max_kl)
    head = report["calibration"]["groups"]["head"]
    assert head["kl"] > 0 and head["choice"] == ("4-bit" if max_kl else "wide")
    q = report["quantized"]
    table = q["model.embed_tokens.weight"]
    assert (table["from"], table["bits"]) == (("mixed", 4) if max_kl else ("rtn8", 8))
    assert {(v["from"], v["bits"]) for n, v in q.items() if n != "model.embed_tokens.weight"} == {("rtn", 4)}
    d = onnx_parity(out, dequantized_reference(ckpt, report, out), PROMPTS, 4, TINY_INT4_DEQUANTIZED)
    assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d
