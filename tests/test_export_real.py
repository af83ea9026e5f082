"""The real Qwen2.5-Coder-0.5B-Instruct through the ONNX exporter: fp32 and int4, through ONNX Runtime.

Golden text: llama.cpp's greedy continuation (../shared/REAL_MODEL.md). Perplexity text: CPython 3.11's heapq.py,
first 1000 tokens, the text REAL_MODEL.md's peer figures use (fp32 9.170; optimum int4 10.162; genai int4 10.145).
"""

from __future__ import annotations

import pytest
import torch

from export.onnx import export_onnx
from export.onnx.evaluate import fixed_text, greedy, perplexity
from export.onnx.verify import session
from export.tolerances import GATE, INT4_MAX_PERPLEXITY_INCREASE

from .test_real_model import LLAMA_CPP_GREEDY, PROMPT_IDS

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_exports(real_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    reports = {d: export_onnx(real_checkpoint, root / d, d) for d in ("fp32", "int4")}
    return root, reports


@pytest.fixture(scope="module")
def text_ids(real_tokenizer):
    return real_tokenizer.encode(fixed_text())[:1000]


def test_fp32_export_greedy_equals_reference(real_exports, real_tokenizer):
    root, reports = real_exports
    assert reports["fp32"]["parity"]["max_abs_logits"] <= GATE["fp32"].max_abs_logits
    sess = session(root / "fp32")
    assert sess.get_providers() == ["CPUExecutionProvider"]
    out = greedy(sess, PROMPT_IDS, 64)
    assert real_tokenizer.decode(PROMPT_IDS + out) == LLAMA_CPP_GREEDY


def test_int4_export_quality(real_exports, real_tokenizer, text_ids):
    root, reports = real_exports
    rep = reports["int4"]
    assert rep["parity"]["passed"]
    # every weight kept its GGUF grid: 4-bit where the file is 4-bit, 8-bit codes for its 5/6/8-bit tensors
    assert {q["from"] for q in rep["quantized"].values()} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    fp32 = session(root / "fp32")
    int4 = session(root / "int4")
    ppl32, ppl4 = perplexity(fp32, text_ids), perplexity(int4, text_ids)
    print(f"\nperplexity fp32 {ppl32:.4f} int4 {ppl4:.4f} ({(ppl4 / ppl32 - 1) * 100:+.2f}%)")
    assert abs(ppl32 - 9.170) < 0.01  # REAL_MODEL.md: transformers / optimum / genai fp32 on the same text
    assert ppl4 <= ppl32 * (1 + INT4_MAX_PERPLEXITY_INCREASE)
    a, b = greedy(fp32, PROMPT_IDS, 64), greedy(int4, PROMPT_IDS, 64)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print(f"int4 greedy agreement with fp32: {same}/64 tokens before the first difference")
    assert same >= 32


def test_optimum_loads_the_export_and_generates_reference_tokens(real_exports, real_model):
    from optimum.onnxruntime import ORTModelForCausalLM

    from qwen2_ref.generate import SamplingParams, generate_one

    root, _ = real_exports
    model = ORTModelForCausalLM.from_pretrained(root / "fp32", use_cache=True, use_io_binding=False)
    out = model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=32, do_sample=False)
    ref = list(generate_one(real_model, PROMPT_IDS, SamplingParams(max_new_tokens=32)))
    assert out[0, len(PROMPT_IDS):].tolist() == ref
