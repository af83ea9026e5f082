"""The real Qwen2.5-Coder-0.5B-Instruct through the ONNX exporter as a user's default command makes it (fused
lowering, the gate on): fp32 and int4, through ONNX Runtime, and through optimum.

Golden text: llama.cpp's greedy continuation (tests/golden.py). Perplexity text: CPython 3.11's heapq.py, first 1000
tokens (fp32 9.170 in transformers, optimum and onnxruntime-genai on the same weights).
"""

from __future__ import annotations

import pytest
import torch

from export.evaluate import fixed_text, greedy, perplexity
from export.onnx.verify import onnx_step, session
from export.tolerances import GATE, INT4_MAX_PERPLEXITY_INCREASE
from qwen2_ref.memory import release_freed_memory

from .golden import FP32_PERPLEXITY_HEAPQ, LLAMA_CPP_GREEDY, PROMPT_IDS

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def text_ids(real_tokenizer):
    return real_tokenizer.encode(fixed_text())[:1000]


def test_fp32_export_greedy_equals_reference(real_exports, real_tokenizer):
    root, reports = real_exports
    assert reports["fp32"]["parity"]["max_abs_logits"] <= GATE["fp32"].max_abs_logits
    sess = session(root / "fp32")
    assert sess.get_providers() == ["CPUExecutionProvider"]
    out = greedy(onnx_step(sess), PROMPT_IDS, 64)
    assert real_tokenizer.decode(PROMPT_IDS + out) == LLAMA_CPP_GREEDY


def test_int4_export_quality(real_exports, real_tokenizer, text_ids):
    root, reports = real_exports
    rep = reports["int4"]
    assert rep["parity"]["passed"]
    # the default recipe (reblock): every weight from its GGUF grid, the file's 4-bit blocks (Q4_K) with their
    # codes and scales and their float zero points folded, its 5/6/8-bit ones (Q5_0, Q6_K, Q8_0; the LM head is
    # Q8_0) as 8-bit codes on blocks of 128
    assert rep["plan"]["recipe"] == "gguf-reblock"
    q = rep["quantized"]
    assert {(v["from"], v["bits"], v["block"], v.get("folded", False)) for v in q.values()} == {
        ("Q4_K", 4, 32, True), ("Q5_0", 8, 128, False), ("Q6_K", 8, 128, False), ("Q8_0", 8, 128, False)}, q
    assert (q["lm_head.weight"]["bits"], q["lm_head.weight"]["block"]) == (8, 128)
    results = {}
    for dtype in ("fp32", "int4"):  # one session at a time
        sess = session(root / dtype)
        results[dtype] = perplexity(onnx_step(sess), text_ids), greedy(onnx_step(sess), PROMPT_IDS, 64)
        del sess
        release_freed_memory()
    (ppl32, a), (ppl4, b) = results["fp32"], results["int4"]
    print(f"\nperplexity fp32 {ppl32:.4f} int4 {ppl4:.4f} ({(ppl4 / ppl32 - 1) * 100:+.2f}%)")
    assert abs(ppl32 - FP32_PERPLEXITY_HEAPQ) < 0.01
    assert ppl4 <= ppl32 * (1 + INT4_MAX_PERPLEXITY_INCREASE)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print(f"int4 greedy agreement with fp32: {same}/64 tokens before the first difference")
    assert same >= 32


def test_optimum_loads_the_export_and_generates_reference_tokens(real_exports, real_checkpoint):
    from optimum.onnxruntime import ORTModelForCausalLM

    from qwen2_ref.generate import SamplingParams, generate_one

    root, _ = real_exports
    reference = real_checkpoint.load_model(progress=False)
    ref = list(generate_one(reference, PROMPT_IDS, SamplingParams(max_new_tokens=32)))
    del reference  # not beside optimum's session: 2.35 GiB each
    release_freed_memory()
    model = ORTModelForCausalLM.from_pretrained(root / "fp32", use_cache=True, use_io_binding=False)
    out = model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=32, do_sample=False)
    assert out[0, len(PROMPT_IDS):].tolist() == ref
