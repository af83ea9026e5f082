"""Reference generation: batching, chunked prefill, sampling, stops and streaming."""

from __future__ import annotations

import pytest
import torch

from qwen2_ref.checkpoint import random_model
from qwen2_ref.config import from_name
from qwen2_ref.generate import SamplingParams, TextStream, generate, generate_one, next_token


@pytest.fixture(scope="module")
def model():
    return random_model(from_name("tiny-untied"), seed=11)


PROMPTS = [[5, 9, 200, 31, 77, 12, 400], [8, 1, 3], [100, 101, 102, 103, 104]]


def run(model, prompts, params, **kw):
    rows = [[] for _ in prompts]
    for step in generate(model, prompts, params, **kw):
        for r, t in zip(rows, step):
            if t is not None:
                r.append(t)
    return rows


def test_padded_batch_equals_one_by_one(model):
    p = SamplingParams(max_new_tokens=12)
    batch = run(model, PROMPTS, p)
    assert batch == [list(generate_one(model, x, p)) for x in PROMPTS]


def test_chunked_prefill_equals_one_shot(model):
    p = SamplingParams(max_new_tokens=10)
    long = list(range(3, 60))
    assert list(generate_one(model, long, p, prefill_chunk=7)) == list(generate_one(model, long, p))


def test_seeded_sampling_is_reproducible_and_seed_matters(model):
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=123)
    a = list(generate_one(model, PROMPTS[0], p))
    assert a == list(generate_one(model, PROMPTS[0], p))
    other = list(generate_one(model, PROMPTS[0], SamplingParams(**{**p.__dict__, "seed": 124})))
    assert a != other


def test_degenerate_sampling_is_greedy(model):
    greedy = list(generate_one(model, PROMPTS[1], SamplingParams(max_new_tokens=15)))
    assert list(generate_one(model, PROMPTS[1], SamplingParams(max_new_tokens=15, temperature=0.7, top_k=1,
                                                                seed=0))) == greedy
    assert list(generate_one(model, PROMPTS[1], SamplingParams(max_new_tokens=15, temperature=0.7, top_p=1e-6,
                                                                seed=0))) == greedy


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    seen_k = {int(next_token(logits, SamplingParams(temperature=5.0, top_k=2), g)) for _ in range(300)}
    assert seen_k == {0, 1}
    # softmax ≈ [.66, .24, .09, ...]: top_p 0.8 keeps the first two only
    seen_p = {int(next_token(logits, SamplingParams(temperature=1.0, top_p=0.8), g)) for _ in range(300)}
    assert seen_p == {0, 1}


def test_stops_at_stop_token_and_max_tokens(model):
    free = list(generate_one(model, PROMPTS[0], SamplingParams(max_new_tokens=12)))
    stop = free[4]
    first = free.index(stop)
    stopped = list(generate_one(model, PROMPTS[0], SamplingParams(max_new_tokens=12, stop_token_ids=(stop,))))
    assert stopped == free[: first + 1]
    assert len(list(generate_one(model, PROMPTS[0], SamplingParams(max_new_tokens=3)))) == 3
    assert list(generate_one(model, PROMPTS[0], SamplingParams(max_new_tokens=0))) == []


def test_batch_rows_stop_independently(model):
    free = run(model, PROMPTS, SamplingParams(max_new_tokens=8))
    stop = free[1][2]
    rows = run(model, PROMPTS, SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))
    for f, r in zip(free, rows):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert r == f[:cut]


def test_text_stream_waits_for_complete_characters(real_tokenizer):
    text = "naïve 🌍 世界 done"
    ids = real_tokenizer.encode(text)
    stream = TextStream(real_tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
