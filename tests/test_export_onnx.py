"""ONNX export of tiny random models: ONNX Runtime (CPU) against the PyTorch reference, per dtype, in both
lowerings (`function`: standard ops + our domain; `fused`: ONNX Runtime's kernels, the default).

Each case exports through the real pipeline (trace on meta, streamed weights, parity gate; conftest.tiny_export
shares each export across modules), then the test runs its own comparison on a left-padded batch of 2 over
prefill + 4 decode steps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from export.onnx import ParityError, dequantized_reference, export_onnx, reference_model
from export.onnx.verify import empty_past, ort_step, session
from export.plan import make_plan
from export.quant import QuantSpec, quantize_rtn
from export.tolerances import TINY, TINY_DEQUANTIZED_ACTIVATIONS, TINY_INT4_DEQUANTIZED
from qwen2_ref.checkpoint import open_checkpoint, resolve_checkpoint
from qwen2_ref.errors import Qwen2Error
from qwen2_ref.generate import left_pad
from qwen2_ref.model import default_position_ids

from .conftest import onnx_parity

PROMPTS = [[5, 9, 200, 31, 77, 12, 400, 3, 3, 8, 51], [8, 1, 3, 99, 7]]


def plan(ckpt, out, dtype="fp32", **kw):
    return make_plan("onnx", ckpt, dtype=dtype, out=out, **kw)


@pytest.mark.parametrize("name", ["tiny", "tiny-untied", "tiny-yarn"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int4"])
def test_export_matches_reference(tiny_export, name, dtype):
    ckpt, out, report = tiny_export(name, dtype, "function")
    sess = session(out)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    tol = TINY[dtype]
    p = onnx_parity(out, reference_model(ckpt), PROMPTS, 4, tol)
    assert p.max_abs_logits <= tol.max_abs_logits, p
    assert p.top1_agreement >= tol.min_top1_agreement, p
    assert len(p.per_step_max_abs) == 5
    assert report["parity"]["passed"] and report["parity"]["max_abs_logits"] <= tol.max_abs_logits
    if dtype == "fp32":
        assert p.greedy_agreement == 1.0
    if dtype == "int4":
        d = onnx_parity(out, dequantized_reference(ckpt, report, out), PROMPTS, 4, TINY_INT4_DEQUANTIZED)
        assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d
        assert d.top1_agreement >= TINY_INT4_DEQUANTIZED.min_top1_agreement, d


def test_output_folder_contents(tiny_export):
    ckpt, out, report = tiny_export("tiny", "int4", "function")
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "generation_config.json", "genai_config.json",
            "export_report.json"} <= names
    rep = json.loads((out / "export_report.json").read_text())
    assert rep["dtype"] == "int4" and rep["opset"] == 21 and rep["parity"]["passed"]
    assert "com.microsoft::MatMulNBits" in rep["custom_ops"] and "com.microsoft::GatherBlockQuantized" in rep["custom_ops"]
    assert rep["wall_s"] > 0 and rep["peak_rss_mib"] > 0
    assert rep["plan"] == {"format": "onnx", "dtype": "int4", "activations": "fp32", "recipe": "gguf-exact",
                           "lowering": "function", "attention": None, "context": 4096, "calibration": None,
                           "device_profile": None, "gate": "on", "overrides": []}
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "temporary folders left behind"


def test_graph_io_names_and_dynamic_axes(tiny_export):
    _, out, _ = tiny_export("tiny-untied", "fp32", "function")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert ins["input_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert ins["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    # logits_to_keep may shorten it, but the name stays the input's: optimum's IO binding sizes outputs by dim names
    assert outs["logits"] == ["batch_size", "sequence_length", 512]
    assert outs["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
    # weights live in external data under the reference's names; no Transpose left on a weight
    inits = {i.name for i in m.graph.initializer}
    assert "model.layers.0.self_attn.q_proj.weight" in inits and "model.layers.0.self_attn.q_proj.bias" in inits
    assert not any(n.op_type == "Transpose" and n.input[0] in inits for n in m.graph.node)


def test_tied_int4_stores_head_once(tiny_export):
    _, out, _ = tiny_export("tiny", "int4", "function")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = [i.name for i in m.graph.initializer]
    assert "model.embed_tokens.weight" not in names  # no float table
    assert names.count("model.embed_tokens.weight.q4") == 1
    big = [i for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert sum("embed_tokens" in i.name for i in big) == 3  # blocks, scales, zero points: one set


def test_parity_failure_leaves_nothing(tmp_path):
    ckpt = resolve_checkpoint("tiny", random_weights=True)
    out = tmp_path / "never"
    from export.tolerances import Tolerance

    with pytest.raises(ParityError, match="parity gate failed"):
        export_onnx(ckpt, plan(ckpt, out, "int4", tolerance=Tolerance(1e-9, 1.0)))
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_killed_export_leaves_nothing(tmp_path, sig):
    """A job scheduler's kill while weights are being written: the half-written folder goes, the exit status says
    which signal, and an existing output stays as it was."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "export_report.json").write_text("mine")  # an earlier export: --overwrite may replace it
    code = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from export.output import staged_folder\n"
        f"with staged_folder(Path({str(out)!r}), overwrite=True) as tmp:\n"
        "    (tmp / 'model.onnx.data').write_bytes(b'0' * 4096)\n"
        f"    os.kill(os.getpid(), signal.{sig})\n"
        "    time.sleep(30)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + getattr(signal, sig), r.stderr
    assert "partial output is removed" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "export_report.json").read_text() == "mine"


def test_existing_output_refused_without_overwrite(tmp_path):
    ckpt = resolve_checkpoint("tiny", random_weights=True)
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Qwen2Error, match="exists; pass --overwrite"):
        export_onnx(ckpt, plan(ckpt, out, tolerance=TINY["fp32"]))
    with pytest.raises(Qwen2Error, match="not an earlier export"):  # --overwrite replaces only our own exports
        export_onnx(ckpt, plan(ckpt, out, tolerance=TINY["fp32"], overwrite=True))
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    (out / "export_report.json").write_text("{}")
    export_onnx(ckpt, plan(ckpt, out, tolerance=TINY["fp32"], overwrite=True))
    assert (out / "model.onnx").exists() and json.loads((out / "export_report.json").read_text())["format"] == "onnx"


def test_hf_checkpoint_export_matches_transformers_weights(make_hf_checkpoint, tmp_path):
    folder, hf = make_hf_checkpoint("tiny-untied", max_shard_size="100KB", dtype=torch.bfloat16)
    ckpt = open_checkpoint(folder)
    out = tmp_path / "hf-export"
    report = export_onnx(ckpt, plan(ckpt, out, tolerance=TINY["fp32"]))
    assert report["parity"]["max_abs_logits"] <= TINY["fp32"].max_abs_logits
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    sess = session(out)
    got, _ = ort_step(sess, ids, np.ones_like(ids), np.arange(8)[None], empty_past(sess, 1))
    want = hf.to(torch.bfloat16).float()(torch.from_numpy(ids)).logits.detach().numpy()
    # these transformers weights are larger (N(0, 0.08)) than RandomSource's, so logits reach ~10: compare relative
    assert np.abs(got - want).max() <= TINY["fp32"].max_abs_logits * max(1.0, float(np.abs(want).max()))


def _offsets_graph(packed: dict, zero_points: np.ndarray | None, accuracy_level: int):
    """MatMulNBits(x, B, scales[, zero points]) + blocksum(x) @ offsets, as the exporter lowers float zero points."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, nb = packed["B"].shape[:2]
    ins = ["x", "B", "scales"] + (["zp"] if zero_points is not None else [])
    nodes = [helper.make_node("MatMulNBits", ins, ["y0"], domain="com.microsoft", K=nb * 32, N=n, bits=4,
                              block_size=32, accuracy_level=accuracy_level),
             helper.make_node("Reshape", ["x", "shape"], ["xb"]),
             helper.make_node("ReduceSum", ["xb", "axes"], ["xs"], keepdims=0),
             helper.make_node("MatMul", ["xs", "offsets"], ["y1"]),
             helper.make_node("Add", ["y0", "y1"], ["y"])]
    inits = [numpy_helper.from_array(packed["B"], "B"), numpy_helper.from_array(packed["scales"], "scales"),
             numpy_helper.from_array(np.ascontiguousarray(packed["offsets"].T), "offsets"),
             numpy_helper.from_array(np.array([0, 0, nb, 32], dtype=np.int64), "shape"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zp"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, nb * 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def test_float_zero_points_as_integer_zero_points_plus_offsets():
    """Q4_K-style blocks (w = s·(q − zf), zf a float) as the exporter lowers them: MatMulNBits with the nearest
    integer zero points + blocksum(x) @ offsets s·(z − zf), equal to x @ dequant(W)ᵀ in fp32 (accuracy level 0).
    With int8 activations (level 4, what exports use) its error stays that of a plain 4-bit weight, also for the
    blocks whose GGUF scale is 0 (a constant block, carried as scale 1, codes 0, zero point = the constant: the real
    0.5B has 7 in one layer). The first form of this lowering (zero point 8 for every block, offsets s·(8 − zf))
    made those blocks' MatMulNBits weights −8 where the true ones are ~1e-3, so their int8 activation error came out
    8000x larger: on inputs with outlier channels (as a down_proj sees) tens of percent of the output here, and +1.8%
    perplexity on the real 0.5B."""
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    w = torch.randn(40, 128, generator=g) * 0.01  # blocks with their own offsets: zero points spread around 8
    w += (torch.randn(40, 4, 1, generator=g) * 0.006).expand(40, 4, 32).reshape(40, 128)
    q = quantize_rtn(w, QuantSpec(4, 32))
    q.zero_points = q.zero_points.astype(np.float32) + rng.uniform(-0.5, 0.5, q.zero_points.shape).astype(np.float32)
    const = [(3, 1), (17, 2), (30, 0)]  # constant blocks, as `quant._float_zp` carries a zero-scale GGUF block
    for r, b in const:
        q.codes[r, 32 * b:32 * b + 32], q.scales[r, b], q.zero_points[r, b] = 0, 1.0, 0.002
    q.spec = QuantSpec(4, 32, True)
    packed = q.pack()
    assert packed["offsets"].shape == (40, 4)
    assert all(np.abs(packed["offsets"][r]).max() <= 0.5 * q.scales[r].max() + 1e-6 for r in range(40))
    x = (rng.standard_normal((2, 8, 128)) * 0.05).astype(np.float32)
    x[..., [17, 40, 90]] *= 300.0  # outlier channels
    want = x @ q.dequantize().T
    exact = _offsets_graph(packed, packed["zero_points_int"], 0).run(None, {"x": x})[0]
    assert np.abs(exact - want).max() <= 1e-5 * np.abs(want).max(), np.abs(exact - want).max()
    rel = lambda got: float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))  # noqa: E731
    int8 = rel(_offsets_graph(packed, packed["zero_points_int"], 4).run(None, {"x": x})[0])
    old = dict(packed, offsets=(q.scales * (8.0 - q.zero_points)).astype(np.float32))  # zero point 8
    assert rel(_offsets_graph(old, None, 0).run(None, {"x": x})[0]) <= 1e-4  # also exact in fp32 (up to rounding)
    int8_old = rel(_offsets_graph(old, None, 4).run(None, {"x": x})[0])
    assert int8 < 0.03 and int8_old > 10 * int8, (int8, int8_old)


def _float_zp_blocks(n: int, k: int, seed: int):
    """4-bit blocks of 32 with float zero points (as GGUF Q4_K / Q4_1 carry over), three of them constant blocks
    (a zero GGUF scale: scale 1, codes 0, zero point = the constant, as `quant._float_zp` carries them)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    w = torch.randn(n, k, generator=g) * 0.01
    w += (torch.randn(n, k // 32, 1, generator=g) * 0.006).expand(n, k // 32, 32).reshape(n, k)
    q = quantize_rtn(w, QuantSpec(4, 32))
    q.zero_points = q.zero_points.astype(np.float32) + rng.uniform(-0.5, 0.5, q.zero_points.shape).astype(np.float32)
    q.zero_points[5, 2] = 17.3  # a block below zero throughout: its zero point clips to 15, a remainder of 2.3 steps
    for r, b in [(3, 1), (17, 2), (30, 0)]:
        q.codes[r, 32 * b:32 * b + 32], q.scales[r, b], q.zero_points[r, b] = 0, 1.0, 0.002
    return q


def _lowered_linear(spec: QuantSpec, weight: np.ndarray, level: int, gemm_bias: np.ndarray | None = None,
                    dtype=None):
    """One linear as the exporter's own lowering pass leaves it: `MatMul(x (2, 8, K), Transpose(W))`, or with
    `gemm_bias` `Gemm(x (16, K), W, bias, transB=1)` (the traced form of a MoE block's shared expert); `dtype` an
    onnx_ir DataType (default FLOAT). Returns (the lowered ir.Model, its WeightUse for W)."""
    import onnx_ir as ir

    from export.onnx.linears import lower_linears

    dtype = dtype or ir.DataType.FLOAT
    n, k = weight.shape
    w = ir.Value(name="w", shape=ir.Shape([n, k]), type=ir.TensorType(dtype),
                 const_value=ir.tensor(weight.astype(dtype.numpy())))
    inits = [w]
    if gemm_bias is None:
        x = ir.Value(name="x", shape=ir.Shape([None, None, k]), type=ir.TensorType(dtype))
        t = ir.Node("", "Transpose", [w], [ir.Attr("perm", ir.AttributeType.INTS, [1, 0])])
        nodes = [t, ir.Node("", "MatMul", [x, t.outputs[0]])]
    else:
        x = ir.Value(name="x", shape=ir.Shape([None, k]), type=ir.TensorType(dtype))
        c = ir.Value(name="c", shape=ir.Shape([n]), type=ir.TensorType(dtype),
                     const_value=ir.tensor(gemm_bias.astype(dtype.numpy())))
        inits.append(c)
        nodes = [ir.Node("", "Gemm", [x, w, c], [ir.Attr("transB", ir.AttributeType.INT, 1)])]
    nodes[-1].outputs[0].name = "y"
    graph = ir.Graph([x], [nodes[-1].outputs[0]], nodes=nodes, initializers=inits,
                     opset_imports={"": 21, "com.microsoft": 1})
    model = ir.Model(graph, ir_version=10)
    return model, lower_linears(model, {"w": spec}, accuracy_level=level)["w"]


@pytest.mark.parametrize("k,form", [(128, "matmul"), (1280, "matmul"), (2048, "matmul"), (1280, "gemm")])
def test_folded_float_zero_points_compute_their_weights(k, form):
    """The default (`reblock`) lowering of float zero points, built by the exporter's own lowering pass: one
    MatMulNBits over [x, block sums of x, block sums of x] (the remainders s·(z − zf) as 8-bit codes split into two
    4-bit digits, one group of 32 blocks per scale; 128 and 1280 columns: one and two groups, the last padded; 2048:
    two whole groups, no padding), as a MatMul's rank-3 input or a Gemm's rank-2 one with a bias.
    - the stored weights (read back as the gate's dequantized reference reads them) are `Quantized.dequantize()`'s,
      each within half an 8-bit step of its group's remainder range of the float-zero-point weight;
    - fp32 (accuracy level 0): x @ those weightsᵀ (+ bias) up to rounding, so the graph and the packing agree;
    - int8 activations (level 4, what exports run): as close to the float-zero-point weights as the exact form
      (`blocksum(x) @ offsets` in fp32, `--quantizer exact`), on inputs with outlier channels."""
    import dataclasses

    import onnx_ir as ir
    import onnxruntime as ort

    from export.onnx.verify import _dequantize_nbits

    q = _float_zp_blocks(40, k, 2)
    q.spec = QuantSpec(4, 32, True)
    exact = q.dequantize()
    folded = dataclasses.replace(q, spec=QuantSpec(4, 32, True, folded=True))
    got_w = folded.dequantize()
    z = np.clip(np.round(q.zero_points), 0, 15)
    rest = (q.scales * (z - q.zero_points)).reshape(40, -1)  # each block's remainder
    groups = -(-rest.shape[1] // 32)
    pad = np.zeros((40, groups * 32), np.float32)
    pad[:, :rest.shape[1]] = rest
    span = (np.maximum(pad.reshape(40, groups, 32).max(-1), 0) - np.minimum(pad.reshape(40, groups, 32).min(-1), 0))
    bound = np.repeat(np.repeat(span / 510, 32, axis=1)[:, :rest.shape[1]], 32, axis=1) * (1 + 1e-4) + 1e-7
    err = np.abs(got_w - exact)
    assert (err <= bound).all() and err.max() > 0, float((err / bound).max())
    packed = folded.pack()
    np.testing.assert_allclose(_dequantize_nbits({"q4": packed["B"], "scales": packed["scales"],
                                                  "zero_points": packed["zero_points"]}, 4, 32, folded=True),
                               got_w, rtol=0, atol=1e-6)
    rng = np.random.default_rng(3)
    bias = (rng.standard_normal(40) * 0.1).astype(np.float32) if form == "gemm" else None
    x = (rng.standard_normal((16, k) if bias is not None else (2, 8, k)) * 0.05).astype(np.float32)
    x[..., [17, 40, 90]] *= 300.0  # outlier channels

    def run(level: int) -> np.ndarray:
        model, use = _lowered_linear(folded.spec, exact, level, bias)
        ops = [n.op_type for n in model.graph]
        assert ops == ["Reshape", "ReduceSum"] + ["Pad"] * (k % 1024 != 0) + ["Concat", "MatMulNBits"], ops
        for key, v in zip(use.keys, use.outputs):
            v.const_value = ir.tensor(packed[key].reshape(tuple(v.shape.numpy())))
        sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    plus = 0 if bias is None else bias
    fp32 = run(0)
    assert np.abs(fp32 - (x @ got_w.T + plus)).max() <= 1e-5 * np.abs(x @ got_w.T + plus).max()
    want = x @ exact.T + plus
    rel = lambda got: float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))  # noqa: E731
    packed_exact = q.pack()
    x3 = x if x.ndim == 3 else x[None]
    offsets = _offsets_graph(packed_exact, packed_exact["zero_points_int"], 4).run(None, {"x": x3})[0]
    offsets = rel(offsets.reshape(want.shape) + plus)
    assert rel(run(4)) <= 1.05 * offsets + 1e-4, (rel(run(4)), offsets)


def test_folding_keeps_to_fp32_activations():
    """With fp16 activations (the GPU layouts) a folded spec falls back to the offsets form: the remainders' scale
    (~1/255 of a block's) would be an fp16 subnormal."""
    import onnx_ir as ir

    q = _float_zp_blocks(40, 128, 2)
    q.spec = QuantSpec(4, 32, True)
    model, use = _lowered_linear(QuantSpec(4, 32, True, folded=True), q.dequantize(), 4, dtype=ir.DataType.FLOAT16)
    assert not use.spec.folded and "offsets" in use.keys
    assert [n.op_type for n in model.graph] == ["MatMulNBits", "Reshape", "ReduceSum", "MatMul", "Add"]


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, 32), QuantSpec(8, 16), QuantSpec(4, 32, True)])
def test_matmulnbits_packing_matches_dequantized_weights(spec):
    """Our packing, run by ORT's MatMulNBits kernel, equals x @ dequant(W)ᵀ computed in numpy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g)
    q = quantize_rtn(w, QuantSpec(spec.bits, spec.block))
    if spec.float_zp:
        q.zero_points = q.zero_points.astype(np.float32) + 0.25
        q.spec = spec
    packed = q.pack()
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft", K=96, N=48,
                            bits=spec.bits, block_size=spec.block, accuracy_level=0)
    inits = [numpy_helper.from_array(packed["B"], "B"), numpy_helper.from_array(packed["scales"], "scales"),
             numpy_helper.from_array(packed["zero_points"], "zp")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 96, generator=g).numpy()
    y = sess.run(None, {"x": x})[0]
    assert np.abs(y - x @ q.dequantize().T).max() <= 1e-4
    # and the quantization itself is close to the float weights
    assert np.abs(q.dequantize() - w.numpy()).mean() <= (0.1 if spec.bits == 4 else 0.01) * w.abs().mean().item() * 3


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True)

    r = run("onnx", "--size", "9b")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "'9b' is not one of" in r.stderr
    r = run("onnx", "--checkpoint", str(tmp_path / "nope.gguf"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope.gguf'}: no such file or folder " \
                                                      "(expected a Hugging Face folder or a .gguf file)"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "export_report.json").write_text("{}")  # an earlier export (an empty folder is fine to use)
    r = run("onnx", "--size", "7b", "--random-weights", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr and "Traceback" not in r.stderr
    r = run("onnx", "--size", "0.5b", "--device", "iphone-15-pro")
    assert r.returncode == 2 and "runs Core ML, not ONNX" in r.stderr


def test_plan_prints_table():
    r = subprocess.run([sys.executable, "-m", "export", "plan", "--size", "7b", "--device", "jetson-orin"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "int4" in r.stdout and "32768" in r.stdout and "yes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "export", "plan", "--size", "72b", "--device", "h100"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = {ln.split("│")[2].strip(): ln for ln in r.stdout.splitlines() if ln.count("│") > 5}
    assert set(lines) == {"fp32", "fp16", "int4 (fp16 activations)"}  # every precision, the chosen one starred
    assert "NO" in lines["fp16"] and "yes" in lines["int4 (fp16 activations)"]
    assert lines["int4 (fp16 activations)"].split("│")[1].strip() == "*" and "*" not in lines["fp16"]


FUSED_CASES = [(name, "fp32") for name in ("tiny", "tiny-untied", "tiny-yarn", "tiny-moe")] + \
    [(name, dtype) for name in ("tiny", "tiny-moe") for dtype in ("fp16", "int4")]


@pytest.mark.parametrize("name,dtype", FUSED_CASES)
def test_fused_lowering_matches_reference(tiny_export, name, dtype):
    """--lowering fused: attention -> GroupQueryAttention (rotary fused), RMSNorm -> (Skip)SimplifiedLayerNorm,
    routed experts -> com.microsoft MoE; same parity bar as the function form, a left-padded batch of 2 included."""
    ckpt, out, report = tiny_export(name, dtype, "fused")
    cfg = ckpt.config
    ops = report["ops"]
    L = cfg.num_hidden_layers
    assert ops["com.microsoft::GroupQueryAttention"] == L
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * L
    assert ops["SimplifiedLayerNormalization"] == 1  # the first layer's input norm has no residual before it
    assert "Pow" not in ops and "Sin" not in ops
    # the one Softmax left per sparse layer is QMoE's forced renormalization undone (norm_topk_prob=False)
    undo = dtype == "int4" and cfg.is_moe and not cfg.norm_topk_prob
    assert ops.get("Softmax", 0) == (sum(cfg.is_sparse_layer(i) for i in range(L)) if undo else 0)
    if cfg.is_moe:  # int4: QMoE with 4-bit experts (its forced renormalization undone for norm_topk_prob=False)
        kernel = "com.microsoft::QMoE" if dtype == "int4" else "com.microsoft::MoE"
        assert ops[kernel] == sum(cfg.is_sparse_layer(i) for i in range(L))
    batch = [PROMPTS[0], PROMPTS[0][:5]]  # left padding in the fused kernels
    p = onnx_parity(out, reference_model(ckpt), batch, 4, TINY[dtype])
    assert p.max_abs_logits <= TINY[dtype].max_abs_logits and p.top1_agreement >= TINY[dtype].min_top1_agreement, p
    if dtype == "int4":
        d = onnx_parity(out, dequantized_reference(ckpt, report, out), batch, 4, TINY_INT4_DEQUANTIZED)
        assert d.max_abs_logits <= TINY_INT4_DEQUANTIZED.max_abs_logits, d


GPU_LAYOUT = {"activations": "fp16", "attention": "seqlens"}  # what the CUDA profiles' int4 export is


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_gpu_layout_on_the_cpu_twin(tiny_export, name):
    """The CUDA profiles' int4 (4-bit MatMulNBits / QMoE weights, fp16 activations, scales and KV cache; attention
    with per-row lengths and no padding bias or query_seqlens), run by ONNX Runtime's CPU provider against the
    reference: batch 1 and a left-padded batch of 2, prefill + 4 decode steps."""
    ckpt, out, report = tiny_export(name, "int4", "fused", **GPU_LAYOUT)
    assert report["activations"] == "fp16" and report["plan"]["attention"] == "seqlens"
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    f16 = onnx.TensorProto.FLOAT16
    assert {i.type.tensor_type.elem_type for i in m.graph.input if i.name.startswith("past_")} == {f16}
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == ckpt.config.num_hidden_layers and all(len(n.input) == 10 for n in gqa)  # ends at position_ids
    inits = {t.name: t for t in m.graph.initializer}
    at = {"MatMulNBits": (2,), "QMoE": (3, 6)}  # the scales inputs
    scales = [inits[n.input[i]] for n in m.graph.node for i in at.get(n.op_type, ())]
    assert scales and all(t.data_type == f16 for t in scales)
    for batch in ([PROMPTS[0]], [PROMPTS[0], PROMPTS[0][:5]]):
        p = onnx_parity(out, reference_model(ckpt), batch, 4, TINY["int4"])
        assert p.max_abs_logits <= TINY["int4"].max_abs_logits, p
        tol = TINY_DEQUANTIZED_ACTIVATIONS["fp16"]  # what remains: fp16 rounding
        d = onnx_parity(out, dequantized_reference(ckpt, report, out), batch, 4, tol)
        assert d.max_abs_logits <= tol.max_abs_logits and d.top1_agreement >= tol.min_top1_agreement, d


def test_bf16_activations_need_a_gpu_gate(tmp_path):
    """ONNX Runtime's CPU provider has no bf16 kernels for GroupQueryAttention, MatMulNBits or
    GatherBlockQuantized: a bf16 export says so in one line at the gate (the fp16 CPU twin above is its nearest
    form), and --no-verify writes the bf16 graph."""
    ckpt = resolve_checkpoint("tiny", None, True)
    with pytest.raises(Qwen2Error, match=r"the gate cannot run this export: ONNX Runtime's CPUExecutionProvider has "
                                         r"no \w+ kernel for bf16 activations;"):
        export_onnx(ckpt, plan(ckpt, tmp_path / "gated", "int4", activations="bf16"))
    assert not (tmp_path / "gated").exists()
    report = export_onnx(ckpt, plan(ckpt, tmp_path / "bf16", "int4", activations="bf16", verify=False))
    m = onnx.load(str(tmp_path / "bf16" / "model.onnx"), load_external_data=False)
    past = {i.type.tensor_type.elem_type for i in m.graph.input if i.name.startswith("past_")}
    assert past == {onnx.TensorProto.BFLOAT16} and report["activations"] == "bf16"


@pytest.mark.parametrize("lowering", ["function", "fused"])
def test_chunked_prefill_of_a_padded_batch(tiny_export, lowering):
    """Chunks of a left-padded batch with a cache (GroupQueryAttention needs query_seqlens for this on CPU)."""
    ckpt, out, _ = tiny_export("tiny", "fp32", lowering)
    sess = session(out)
    prompts = [PROMPTS[0] * 2, PROMPTS[0][:7]]
    ids, mask = left_pad(prompts, 0)
    pos = default_position_ids(mask, mask.shape[1])
    ref, _ = reference_model(ckpt)(ids, position_ids=pos, attention_mask=mask)
    past, got = empty_past(sess, 2), []
    for s in range(0, ids.shape[1], 5):
        e = min(ids.shape[1], s + 5)
        logits, past = ort_step(sess, ids[:, s:e].numpy(), mask[:, :e].numpy(), pos[:, s:e].numpy(), past)
        got.append(logits)
    got = np.concatenate(got, axis=1)
    valid = mask.bool().numpy()
    assert np.abs(got - ref.detach().numpy())[valid].max() <= TINY["fp32"].max_abs_logits


@pytest.mark.parametrize("lowering", ["function", "fused"])
def test_logits_to_keep(tiny_export, lowering):
    """The optional `logits_to_keep` input (default 0: all positions) runs the head on the last k positions."""
    dtype = "fp32" if lowering == "function" else "int4"  # head as Gemm on the tied table / as MatMulNBits
    _, out, _ = tiny_export("tiny", dtype, lowering)
    sess = session(out)
    assert "logits_to_keep" not in {i.name for i in sess.get_inputs()}  # optimum / genai never see it
    assert "logits_to_keep" in {i.name for i in sess.get_overridable_initializers()}
    ids = np.array([PROMPTS[0]])
    n = ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(n)[None]}
    feeds |= dict(zip([i.name for i in sess.get_inputs() if i.name.startswith("past")], empty_past(sess, 1)))
    full = sess.run(["logits"], feeds)[0]
    assert full.shape[1] == n
    for k in (1, 3, n, n + 4):
        part = sess.run(["logits"], feeds | {"logits_to_keep": np.array(k, dtype=np.int64)})[0]
        assert part.shape[1] == min(k, n)
        # one row may take another kernel path than n rows (MatMulNBits on AVX-512): equal to fp32 rounding
        np.testing.assert_allclose(part, full[:, n - min(k, n):], rtol=0, atol=1e-6)


def stored_bytes(folder) -> int:
    """Bytes of every initializer of an export, external data and the small ones kept inline in model.onnx."""
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            total += onnx.numpy_helper.to_array(t).nbytes
    return total


@pytest.mark.parametrize("name,dtype,lowering", [
    ("tiny", "int4", "function"), ("tiny", "int4", "fused"), ("tiny-untied", "int4", "function"),
    ("tiny-yarn", "int4", "function"), ("tiny-moe", "int4", "function"), ("tiny-moe", "int4", "fused"),
    ("tiny", "fp16", "fused"), ("tiny-untied", "fp32", "function"), ("tiny-moe", "fp32", "fused")])
def test_plan_sizes_match_exports(tiny_export, name, dtype, lowering):
    """`python -m export plan` sizes an export tensor by tensor with the exporters' storage rules: within 5% of
    what the export stores (the 1.5B and 7B int4 random-weights exports are compared in the README)."""
    from export import precision
    from export.sizing import weight_bytes

    ckpt, out, _ = tiny_export(name, dtype, lowering)
    planned, _ = weight_bytes(ckpt.config, precision.get("onnx", dtype), lowering)
    assert abs(planned / stored_bytes(out) - 1) <= 0.05, (planned, stored_bytes(out))
