"""Core ML export: the saved .mlpackage executed (the MIL executor on Linux, Core ML itself on macOS) against the
PyTorch reference, per dtype, over prefill + 4 decode steps; the graph's shape; the folder; the CLI; the real 0.5B.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("coremltools")

import devices  # noqa: E402
from export.coreml import PACKAGE, SIDECAR, ParityError, export_coreml, verify  # noqa: E402
from export.coreml.convert import NeuralEngineOptions, wrap  # noqa: E402
from export.coreml.mil_exec import MILModel  # noqa: E402
from export.evaluate import greedy  # noqa: E402
from export.gate import check_parity, reference_step  # noqa: E402
from export.plan import make_plan  # noqa: E402
from export.tolerances import COREML_GATE, COREML_TINY, COREML_TINY_DEQUANTIZED  # noqa: E402
from qwen2_ref.checkpoint import resolve_checkpoint  # noqa: E402

from .golden import LLAMA_CPP_GREEDY, PROMPT_IDS  # noqa: E402

PROMPT = [5, 9, 200, 31, 77, 12, 400, 3, 3, 8, 51]
DTYPES = ["fp16", "int8", "int4", "palettize4"]
# The phone profile with a head width below the tiny vocabulary (512), so the split head is exercised, and a
# context that is not a multiple of 32, so the state padding is.
TINY_PROFILE = dataclasses.replace(devices.get("iphone-15-pro"), ane_max_width=200)
TINY_CONTEXT = 40
ON_MAC = sys.platform == "darwin"


@pytest.fixture
def exports(tiny_export):
    """(name, dtype) -> (checkpoint, folder, report): the session's shared Core ML exports (full pipeline)."""
    def get(name, dtype):
        return tiny_export(name, dtype, target="coreml", context=TINY_CONTEXT, device=TINY_PROFILE)

    return get


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_package_matches_reference(exports, dtype):
    ckpt, out, report = exports("tiny", dtype)
    model, backend = verify.open_package(out / PACKAGE)
    assert backend.startswith("coreml" if ON_MAC else "MIL executor")
    tol = COREML_TINY[dtype]
    p = check_parity(verify.package_step(model), reference_step(ckpt.load_model(progress=False)), [PROMPT], 4,
                     tol, backend)
    assert len(p.per_step_max_abs) == 5 and p.passed, p
    assert report["parity"]["passed"] and report["parity"]["max_abs_logits"] <= tol.max_abs_logits
    if dtype == "fp16":
        assert p.greedy_agreement == 1.0
    else:  # tight: the wrapper running the package's own dequantized weights leaves fp16 activation rounding only
        executor = MILModel(out / PACKAGE)
        wrapper = wrap(copy.deepcopy(ckpt.load_model(progress=False)), TINY_CONTEXT,
                       NeuralEngineOptions(32, TINY_PROFILE.ane_max_width)).float()
        deq = verify.dequantized_wrapper(wrapper, executor)
        d = check_parity(verify.package_step(executor), verify.wrapper_step(deq), [PROMPT], 4,
                         COREML_TINY_DEQUANTIZED, "MIL executor")
        assert d.passed and d.greedy_agreement == 1.0, d


@pytest.mark.parametrize("name", ["tiny-untied", "tiny-yarn"])
def test_untied_and_yarn_fp16(exports, name):
    ckpt, out, _ = exports(name, "fp16")
    model, backend = verify.open_package(out / PACKAGE)
    p = check_parity(verify.package_step(model), reference_step(ckpt.load_model(progress=False)), [PROMPT], 4,
                     COREML_TINY["fp16"], backend)
    assert p.passed and p.greedy_agreement == 1.0, p


def test_wrapper_is_the_reference_in_fp32():
    """The conversion-friendly rewrite (cache buffers, RoPE tables, LayerNorm-form RMSNorm, split head) computes
    what the reference computes, chunked prefill included."""
    ref = resolve_checkpoint("tiny-yarn", random_weights=True).load_model(progress=False)
    wrapper = wrap(copy.deepcopy(ref), TINY_CONTEXT, NeuralEngineOptions(32, 200)).float()
    assert wrapper.context == 64 and [p.shape[0] for p in wrapper.lm_head] == [171, 170, 171]
    got, want = verify.wrapper_step(wrapper), reference_step(ref)
    past = 0
    for chunk in (PROMPT[:6], PROMPT[6:], [17], [300]):
        ids, end = np.array([chunk]), past + len(chunk)
        mask, pos = np.ones((1, end), dtype=np.int64), np.arange(past, end)[None]
        np.testing.assert_allclose(got(ids, mask, pos), want(ids, mask, pos), atol=2e-5, rtol=0)
        past = end


def test_graph_states_attention_and_io(exports):
    _, out, report = exports("tiny", "int4")
    prog = MILModel(out / PACKAGE).func
    ops = report["ops"]
    layers = 2
    assert ops["scaled_dot_product_attention"] == layers
    assert ops["read_state"] == 2 and ops["coreml_update_state"] == 2 * layers and ops["slice_update"] == 2 * layers
    assert "inverse" not in ops and "band_part" not in ops  # RoPE tables are constants; the mask is an input
    assert ops["constexpr_blockwise_shift_scale"] > 0
    compressed = [op for op in prog.operations if op.op_type.startswith("constexpr_")]
    assert {c.op_type for op in compressed for c in op.outputs[0].child_ops} <= {"linear", "gather",
                                                                                  "slice_by_index", "shape"}
    # the tied table is stored once: the embedding's gather and the head's three row slices read one constexpr
    table = next(op for op in compressed if op.outputs[0].name == "ref_model_embed_tokens_weight")
    uses = [c.op_type for c in table.outputs[0].child_ops]
    assert uses.count("gather") == 1 and uses.count("slice_by_index") == 3
    assert not any(len(op.outputs[0].shape) == 2 for op in prog.operations
                   if op.op_type.startswith("const") and "lm_head" in op.name)
    assert {n: tuple(v.shape) for n, v in prog.inputs.items() if n.endswith("Cache")} == {
        "keyCache": (layers, 1, 2, 64, 16), "valueCache": (layers, 1, 2, 64, 16)}  # context 40 padded to 64
    assert set(prog.inputs) == {"inputIds", "causalMask", "keyCache", "valueCache"}
    assert [v.name for v in prog.outputs] == ["logits"]
    assert report["lm_head_slices"] == [[171, 64], [170, 64], [171, 64]]


def test_calibrated_int4(tiny_export):
    """--quantizer calibrated: every linear weight GPTQ 4-bit against the reference's activations (the embedding,
    a gather, clip-searched); the package computes what its dequantized weights say."""
    ckpt, out, report = tiny_export("tiny", "int4", target="coreml", context=TINY_CONTEXT, device=TINY_PROFILE,
                                    quantizer="calibrated")
    formats = {n: w["format"] for n, w in report["weights"].items() if w["format"] != "fp16"}
    assert formats.pop("model.embed_tokens.weight").startswith("4-bit per 32, clip-searched")
    assert formats and all(f == "GPTQ 4-bit per 32 (calibrated)" for f in formats.values())
    assert report["plan"]["recipe"] == "calibrated" and report["calibration"]["method"] == "gptq"
    executor = MILModel(out / PACKAGE)
    wrapper = wrap(copy.deepcopy(ckpt.load_model(progress=False)), TINY_CONTEXT,
                   NeuralEngineOptions(32, TINY_PROFILE.ane_max_width)).float()
    d = check_parity(verify.package_step(executor), verify.wrapper_step(verify.dequantized_wrapper(wrapper, executor)),
                     [PROMPT], 4, COREML_TINY_DEQUANTIZED, "MIL executor")
    assert d.passed, d


# one GGML type per tensor kind; K = 256 everywhere (K-quants' super-blocks)
BLOCK_TYPES = {"token_embd.weight": "Q6_K", "attn_q.weight": "Q4_K", "attn_k.weight": "Q4_0",
               "attn_v.weight": "Q5_0", "attn_output.weight": "Q8_0", "ffn_gate.weight": "Q4_1",
               "ffn_up.weight": "Q4_K", "ffn_down.weight": "Q6_K"}


def test_gguf_blocks_come_out_of_the_package_as_llama_cpp_dequantizes_them(tmp_path):
    """int4 from a GGUF keeps each tensor's own blocks: the saved package's dequantized weights (read back through
    the executor) equal gguf-py's dequantization of the file's bytes (an independent implementation), rounded to
    fp16 — bit for bit where a block's scale is the file's fp16 and its offset an integer (Q4_0, Q5_0, Q8_0).
    Where llama.cpp composes a block's scale or offset from two numbers (Q4_K's d·sc and dmin·m, Q4_1's m/d, Q6_K's
    d·sc) the package stores their product as one fp16, whose rounding (2^-11 relative) moves a weight by at most
    2^-10 of the tensor's largest: under 1/60 of a 4-bit quantization step."""
    import gguf

    from export.coreml.program import const_name
    from qwen2_ref.checkpoint import open_checkpoint
    from qwen2_ref.config import from_name

    from .damaged import write_tiny_gguf

    cfg = from_name("tiny").replace(hidden_size=256, intermediate_size=256, num_attention_heads=4,
                                    num_key_value_heads=2, num_hidden_layers=1)
    path = write_tiny_gguf(tmp_path / "blocks.gguf", cfg, BLOCK_TYPES)
    ckpt = open_checkpoint(path)
    report = export_coreml(ckpt, make_plan("coreml", ckpt, dtype="int4", context=32, out=tmp_path / "out",
                                           verify=False))
    got = MILModel(tmp_path / "out" / PACKAGE).dequantized_weights()
    reader = gguf.GGUFReader(str(path))
    gg = {"model.embed_tokens.weight": "token_embd.weight"} | {
        f"model.layers.0.{hf}": f"blk.0.{g}" for hf, g in (
            ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"))}
    tensors = {t.name: t for t in reader.tensors}
    for param, name in gg.items():
        t = tensors[name]
        gtype = BLOCK_TYPES[name.removeprefix("blk.0.")]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(got[const_name(param)].shape)
        want16 = want.astype(np.float16).astype(np.float32)
        assert report["weights"][param]["format"].startswith(f"GGUF {gtype} blocks kept"), report["weights"][param]
        if gtype in ("Q4_0", "Q5_0", "Q8_0"):
            np.testing.assert_array_equal(got[const_name(param)], want16, err_msg=param)
        else:
            err = np.abs(got[const_name(param)] - want16).max()
            assert 0 < err <= np.abs(want).max() * 2.0**-10, (param, gtype, err)
    assert report["tied_embedding_stored"] == "once"


def test_folder_sidecar_and_metadata(exports):
    ckpt, out, report = exports("tiny", "fp16")
    assert sorted(p.name for p in out.iterdir()) == sorted([PACKAGE, SIDECAR, "config.json", "export_report.json"])
    side = json.loads((out / SIDECAR).read_text())
    assert side["states"]["keyCache"]["shape"] == [2, 1, 2, 64, 16] and side["context_length"] == 64
    assert side["eos_token_ids"] == [ckpt.config.eos_token_id]
    assert side["neural_engine"]["compute_units"] == "cpuAndNeuralEngine"
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    import coremltools as ct

    spec = ct.utils.load_spec(str(out / PACKAGE))
    desc = {i.name: i.shortDescription for i in spec.description.input}
    assert "end = tokens already in the cache + T" in desc["causalMask"]
    assert spec.description.metadata.license.startswith("Apache-2.0")
    assert spec.description.metadata.userDefined["co.huggingface.exporters.architecture"] == "Qwen2ForCausalLM"
    assert report["parity"]["backend"].startswith("MIL executor") and report["peak_rss_mib"] > 0


def test_parity_failure_leaves_nothing(tmp_path):
    from export.tolerances import Tolerance

    ckpt = resolve_checkpoint("tiny", random_weights=True)
    with pytest.raises(ParityError, match="nothing was written"):
        export_coreml(ckpt, make_plan("coreml", ckpt, dtype="int4", context=32, device=TINY_PROFILE,
                                      out=tmp_path / "out", tolerance=Tolerance(1e-9, 1.0)))
    assert list(tmp_path.iterdir()) == []


def test_executor_ops_coremltools_gets_wrong(tmp_path):
    """concat(interleave), exclusive cumsum and reduce over two axes: coremltools 9.0's value inference is wrong there
    (docs/coreml.md)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS18)
    def prog(x):
        return (mb.concat(values=[x, mb.mul(x=x, y=2.0)], axis=0, interleave=True, name="inter"),
                mb.cumsum(x=x, axis=1, exclusive=True, name="excl"),
                mb.reduce_sum(x=x, axes=[0, 1], keep_dims=False, name="total"))

    mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                         compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    mlmodel.save(str(tmp_path / "ops.mlpackage"))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = MILModel(tmp_path / "ops.mlpackage").predict({"x": x})
    np.testing.assert_array_equal(out["inter"], np.stack([x[0], 2 * x[0], x[1], 2 * x[1]]))
    np.testing.assert_array_equal(out["excl"], np.cumsum(x, 1) - x)
    np.testing.assert_array_equal(out["total"], x.sum())


def test_cli_export_and_errors(make_hf_checkpoint, tmp_path):
    folder, _ = make_hf_checkpoint("tiny")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "export", "coreml", *args], capture_output=True, text=True)

    out = tmp_path / "pkg"
    r = run("--checkpoint", str(folder), "--dtype", "fp16", "--context", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "export_report.json").read_text())
    assert report["dtype"] == "fp16" and report["device_profile"] == "iphone-15-pro" and report["parity"]["passed"]
    r = run("--checkpoint", str(folder), "--dtype", "fp16", "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"error: --out {out} exists; pass --overwrite to replace it, or choose another --out"
    r = run("--checkpoint", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "nope.gguf: no such file or folder" in r.stderr and "Traceback" not in r.stderr
    r = run("--size", "0.5b", "--device", "pixel-8", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "--device pixel-8 runs ONNX, not Core ML" in r.stderr
    r = run("--size", "7b", "--out", str(tmp_path / "z"))
    assert r.returncode == 2 and "'7b' is not one of" in r.stderr
    r = run("--checkpoint", str(folder), "--context", "999999", "--out", str(tmp_path / "w"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --context 999999 exceeds the model's max_position_embeddings 4096") and "Traceback" not in r.stderr


@pytest.mark.skipif(not ON_MAC, reason="Core ML's runtime (MLModel.predict) exists only on macOS; on Linux the "
                                       "MIL executor runs the saved package instead")
def test_coreml_runtime_agrees_with_the_executor(exports):
    """On a Mac: Core ML itself and the numpy executor run the same saved package to the same logits."""
    _, out, _ = exports("tiny", "int4")
    model, backend = verify.open_package(out / PACKAGE, backend="coreml")
    p = check_parity(verify.package_step(model), verify.package_step(MILModel(out / PACKAGE)), [PROMPT], 4,
                     COREML_TINY_DEQUANTIZED, backend)
    assert p.passed, p


# ---- the real Qwen2.5-Coder-0.5B-Instruct ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.real_model
def test_real_int4_package(real_checkpoint, real_tokenizer, tmp_path):
    out = tmp_path / "int4"
    report = export_coreml(real_checkpoint, make_plan("coreml", real_checkpoint, dtype="int4", out=out))
    tol = COREML_GATE["int4"]
    assert report["parity"]["passed"] and report["parity"]["max_abs_logits"] <= tol.max_abs_logits
    # measured 641 MiB: the GGUF's own blocks (its Q5_0/Q8_0/Q6_K tensors as 8-bit codes; token_embd and output
    # are two different tensors in this file), within 10% of the weights' stored bytes
    assert 0.9 < report["files_mib"][PACKAGE] / report["weights_mib"] < 1.1
    assert all(w["format"].startswith("GGUF ") for w in report["weights"].values() if w["format"] != "fp16")
    assert report["state_shape"] == [24, 1, 2, 4096, 64]
    assert len(report["lm_head_slices"]) == 10 and all(s[0] <= 16384 for s in report["lm_head_slices"])
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    side = json.loads((out / SIDECAR).read_text())
    assert 151645 in side["eos_token_ids"] and "<|im_start|>" in side["chat_template"]
    model, _ = verify.open_package(out / PACKAGE)
    text = real_tokenizer.decode(PROMPT_IDS + greedy(verify.package_step(model), PROMPT_IDS, 64))
    print(text)
    assert text.startswith(LLAMA_CPP_GREEDY)  # the GGUF's own blocks: llama.cpp's greedy text


@pytest.mark.slow
@pytest.mark.real_model
def test_real_fp16_package_greedy_matches_llama_cpp(real_checkpoint, real_tokenizer, tmp_path):
    """fp16 weights (the GGUF's dequantized values rounded to fp16) and fp16 activations: the saved package's
    64 greedy tokens are llama.cpp's."""
    report = export_coreml(real_checkpoint, make_plan("coreml", real_checkpoint, dtype="fp16",
                                                      device="iphone-15-pro", out=tmp_path / "fp16"))
    assert report["parity"]["max_abs_logits"] <= COREML_GATE["fp16"].max_abs_logits
    assert report["parity"]["top1_agreement"] == 1.0
    model, _ = verify.open_package(tmp_path / "fp16" / PACKAGE)
    text = real_tokenizer.decode(PROMPT_IDS + greedy(verify.package_step(model), PROMPT_IDS, 64))
    assert text.startswith(LLAMA_CPP_GREEDY)
