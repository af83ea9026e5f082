"""The export plan and the precisions: defaults (the library's are the CLI's), profile overrides said out loud,
refusals as one line, and precision formats that agree with the lowering's tensor shapes. No export runs here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export import plan as plans, precision
from export.plan import make_plan
from export.quant import QuantSpec
from export.tolerances import COREML_GATE, GATE, GATE_ACTIVATIONS
from qwen2_ref.errors import Qwen2Error

from .conftest import random_checkpoint

TINY = random_checkpoint("tiny")
SMALL = random_checkpoint("0.5b")  # no weights are read: a plan only looks at the config


def test_onnx_defaults_without_a_profile():
    p = make_plan("onnx", TINY)
    assert (p.precision.name, p.lowering, p.recipe, p.profile) == ("fp32", "fused", None, None)
    assert p.context == TINY.config.max_position_embeddings and p.out == Path("exports/qwen2-tiny-fp32")
    assert p.gate.enabled and p.tolerance == GATE["fp32"] and p.overrides == ()


def test_profile_defaults_and_overrides_are_reported():
    p = make_plan("onnx", SMALL, device="x86-2core")
    assert (p.precision.name, p.context, p.lowering, p.recipe) == ("int4", 8192, "fused", "gguf-exact")
    assert p.overrides == () and p.out == Path("exports/qwen2-0.5b-int4")
    q = make_plan("onnx", SMALL, device="x86-2core", dtype="fp16", context=1024, lowering="function")
    assert q.overrides == ("--max-context 1024 overrides device profile x86-2core's 8192",
                           "--lowering function overrides device profile x86-2core's fused",
                           "--dtype fp16 overrides device profile x86-2core's int4")
    assert q.describe()["overrides"] == list(q.overrides)
    assert make_plan("onnx", SMALL, device="x86-2core", requantize=True).recipe == "requantize"


def test_coreml_recipes():
    """Core ML int4 keeps a GGUF's blocks unless --requantize; int8 and palettize4 are made from floats."""
    assert make_plan("coreml", TINY).recipe == "gguf-exact"
    assert make_plan("coreml", TINY, requantize=True).recipe == "requantize"
    assert make_plan("coreml", TINY, quantizer="calibrated").recipe == "calibrated"
    assert make_plan("coreml", TINY, dtype="int8").recipe == "requantize"
    assert make_plan("coreml", TINY, dtype="palettize4").recipe == "palettize"
    assert make_plan("coreml", TINY, dtype="fp16").recipe is None
    with pytest.raises(Qwen2Error, match="--requantize applies to Core ML int4"):
        make_plan("coreml", TINY, dtype="int8", requantize=True)


def test_coreml_defaults_to_the_phone_profile():
    p = make_plan("coreml", TINY)
    assert (p.profile.name, p.precision.name, p.context, p.lowering) == ("iphone-15-pro", "int4", 4096, None)
    assert p.tolerance == COREML_GATE["int4"] and p.out == Path("exports/qwen2-tiny-coreml-int4")


@pytest.mark.parametrize("target,kw,message", [
    ("onnx", {"device": "iphone-15-pro"}, "--device iphone-15-pro runs Core ML, not ONNX; use `python -m export "
                                          "coreml --device iphone-15-pro`"),
    ("coreml", {"device": "a10g"}, "--device a10g runs ONNX, not Core ML"),
    ("onnx", {"dtype": "int8"}, "--dtype 'int8' is not a onnx precision; valid: fp32, fp16, int4"),
    ("onnx", {"requantize": True}, "--requantize applies to quantized precisions, not fp32"),
    ("onnx", {"context": 10**6}, "--max-context 1000000 exceeds the model's max_position_embeddings 4096; "
                                 "configure YaRN or DCA"),
    ("coreml", {"context": 10**6}, "--context 1000000 exceeds the model's max_position_embeddings 4096"),
    ("coreml", {"lowering": "fused"}, "--lowering applies to ONNX exports only"),
    ("onnx", {"lowering": "fast"}, "--lowering 'fast' is not one of fused, function"),
])
def test_refusals_name_the_flag(target, kw, message):
    with pytest.raises(Qwen2Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(target, TINY, **kw)


def test_cli_choices_come_from_the_precisions():
    r = subprocess.run([sys.executable, "-m", "export", "coreml", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "[int4|int8|fp16|palettize4]" in r.stdout
    r = subprocess.run([sys.executable, "-m", "export", "plan", "--size", "7b", "--device", "jetson-orin",
                        "--dtype", "fp16"], capture_output=True, text=True)
    assert r.returncode == 0 and "note: --dtype fp16 overrides device profile jetson-orin's int4" in r.stderr


BIG = {size: random_checkpoint(size) for size in ("7b", "72b", "57b-a14b")}


@pytest.mark.parametrize("size,device,want", [
    ("72b", "h100", "int4 (fp16 activations)"),  # fp16 is 145 GiB: int4 is the best that fits 76 GiB
    ("72b", "a100-80g", "int4 (fp16 activations)"),
    ("57b-a14b", "h100", "int4 (fp16 activations)"),
    ("7b", "a10g", "fp16"),  # 16 GiB with 32K of KV cache fits 22 GiB
    ("7b", "a100-80g", "fp16"),
    ("0.5b", "l4", "fp16"),
])
def test_gpu_profiles_pick_the_best_precision_that_fits(size, device, want):
    """GPU profiles' default_dtype "auto": the first of fp16, int4 whose weights and KV cache at the profile's
    context fit; their int4 computes in fp16 with the seqlens attention (CUDA's fast kernels), said in the plan."""
    ckpt = BIG.get(size) or SMALL
    p = make_plan("onnx", ckpt, device=device)
    assert p.precision.label == want and p.overrides == ()
    assert p.attention == "seqlens" and p.describe()["attention"] == "seqlens"
    if p.precision.quantized:
        assert p.precision.activations == "fp16" and p.precision.weights.scale_bytes == 2
        assert p.out.name == f"qwen2-{size}-int4-fp16act" and p.recipe == "gguf-exact"
    rows, notes = plans.plan_for(size, device)
    chosen = [r for r in rows if r["chosen"]]
    assert [r["dtype"] for r in rows] == ["fp32", "fp16", "int4 (fp16 activations)"] and notes == []
    assert len(chosen) == 1 and chosen[0]["dtype"] == want and chosen[0]["fits"]
    assert all(not r["fits"] for r in rows[:rows.index(chosen[0])] if r["dtype"] == "fp16")


def test_nothing_fits_is_one_line_naming_the_smallest():
    with pytest.raises(Qwen2Error, match=r"nothing fits device profile a10g \(22 GiB\): the smallest, int4 \(fp16 "
                                         r"activations\), needs .* GiB .*--max-context"):
        make_plan("onnx", BIG["72b"], device="a10g")
    rows, notes = plans.plan_for("72b", "a10g")
    assert not any(r["chosen"] for r in rows) and "nothing fits" in notes[0]


def test_activations_and_attention_flags():
    p = make_plan("onnx", SMALL, dtype="int4", activations="fp16", attention="seqlens")
    assert (p.precision.activations, p.attention, p.profile) == ("fp16", "seqlens", None)
    assert p.tolerance == GATE_ACTIVATIONS["fp16"] and p.out.name == "qwen2-0.5b-int4-fp16act"
    q = make_plan("onnx", SMALL, device="h100", dtype="int4", activations="fp32", attention="bias")
    assert (q.precision.label, q.attention) == ("int4", "bias") and q.overrides == (
        "--attention bias overrides device profile h100's seqlens",
        "--activations fp32 overrides device profile h100's fp16")
    assert make_plan("onnx", SMALL, device="h100", dtype="fp32").precision.activations == "fp32"  # floats: own
    cpu = make_plan("onnx", SMALL, device="x86-2core")
    assert (cpu.precision.activations, cpu.attention) == ("fp32", "bias")  # CPU profiles: unchanged
    # a profile's seqlens is dropped where attention is not GroupQueryAttention everywhere; a flag is refused
    f = make_plan("onnx", SMALL, device="h100", lowering="function")
    assert f.attention == "bias" and "attention seqlens does not apply to --lowering function: bias" in f.overrides[-1]
    with pytest.raises(Qwen2Error, match="--attention seqlens needs GroupQueryAttention in every layer; --lowering "
                                         "function"):
        make_plan("onnx", SMALL, lowering="function", attention="seqlens")
    with pytest.raises(Qwen2Error, match="--activations fp16 applies to ONNX int4; ONNX fp32 computes in fp32"):
        make_plan("onnx", SMALL, dtype="fp32", activations="fp16")
    with pytest.raises(Qwen2Error, match="--attention applies to ONNX exports only"):
        make_plan("coreml", TINY, attention="seqlens")


@pytest.mark.parametrize("n,k", [(896, 896), (4864, 896), (151936, 896), (40, 100)])
def test_int4_format_bytes_equal_matmulnbits_tensors(n, k):
    """The bytes `plan` counts per int4 weight are the bytes of the three MatMulNBits tensors the lowering
    declares (codes, fp32 scales, packed 4-bit zero points)."""
    fmt = precision.get("onnx", "int4").weights
    shapes = QuantSpec(fmt.bits, fmt.block).shapes(n, k)
    declared = np.prod(shapes["B"]) + 4 * np.prod(shapes["scales"]) + np.prod(shapes["zero_points"])
    assert fmt.stored_bytes(n, k) == declared
