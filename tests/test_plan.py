"""The export plan and the precisions: defaults (the library's are the CLI's), profile overrides said out loud,
refusals as one line, and precision formats that agree with the lowering's tensor shapes. No export runs here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export import precision
from export.plan import make_plan
from export.quant import QuantSpec
from export.tolerances import COREML_GATE, GATE
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
    assert q.overrides == ("--dtype fp16 overrides device profile x86-2core's int4",
                           "--max-context 1024 overrides device profile x86-2core's 8192",
                           "--lowering function overrides device profile x86-2core's fused")
    assert q.describe()["overrides"] == list(q.overrides)
    assert make_plan("onnx", SMALL, device="x86-2core", requantize=True).recipe == "requantize"


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
    r = subprocess.run([sys.executable, "-m", "export", "plan", "--size", "7b", "--device", "l4", "--dtype", "int4"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "note: --dtype int4 overrides device profile l4's fp16" in r.stderr


@pytest.mark.parametrize("n,k", [(896, 896), (4864, 896), (151936, 896), (40, 100)])
def test_int4_format_bytes_equal_matmulnbits_tensors(n, k):
    """The bytes `plan` counts per int4 weight are the bytes of the three MatMulNBits tensors the lowering
    declares (codes, fp32 scales, packed 4-bit zero points)."""
    fmt = precision.get("onnx", "int4").weights
    shapes = QuantSpec(fmt.bits, fmt.block).shapes(n, k)
    declared = np.prod(shapes["B"]) + 4 * np.prod(shapes["scales"]) + np.prod(shapes["zero_points"])
    assert fmt.stored_bytes(n, k) == declared
