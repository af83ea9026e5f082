"""Speculative decoding (runtime/speculative.py): greedy output equal to plain greedy token for token (prompt lookup
and a draft export, tiny models and the real 0.5B), the rejection sampler's output distributed as the target's
(chi-square tests that can fail), the KV rollback, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from qwen2_ref.errors import Qwen2Error
from qwen2_ref.generate import SamplingParams
from runtime import GenerationConfig, Runner, SessionSettings
from runtime.speculative import Draft, DraftModel, PromptLookup, _verify

CPU2 = SessionSettings(threads=2)
# prompts whose text repeats (lookup drafts from them) and one that does not
PROMPTS = [[5, 9, 200, 31, 77, 12, 5, 9, 200, 31, 77, 12, 5, 9], [40, 41, 42, 43, 44, 45, 46, 47, 40, 41, 42],
           [301, 17, 45, 2, 260, 11, 90, 6]]


def run(runner, prompt, params, proposer=None):
    runner.speculator = proposer
    try:
        return [s[0] for s in runner.generate([prompt], params)], runner.stats
    finally:
        runner.speculator = None


@pytest.mark.parametrize("attention", ["bias", "seqlens"])
def test_greedy_lookup_and_draft_equal_plain_greedy(tiny_export, attention):
    """Both KV layouts; a draft that agrees often (the same model at int4) and one that rarely does (other
    weights): every output equals plain greedy, and drafts were both accepted and rejected along the way."""
    kw = {"attention": "seqlens"} if attention == "seqlens" else {}
    target = Runner(tiny_export("tiny", "fp32", "fused", **kw)[1], CPU2)
    drafts = [Runner(tiny_export("tiny", "int4", "fused")[1], CPU2),
              Runner(tiny_export("tiny-untied", "fp32", "fused")[1], CPU2)]
    params = SamplingParams(max_new_tokens=40)
    totals = {"drafted": 0, "accepted": 0}
    for prompt in PROMPTS:
        plain, _ = run(target, prompt, params)
        for proposer in (PromptLookup(5), DraftModel(drafts[0], 4, target), DraftModel(drafts[1], 3, target)):
            got, st = run(target, prompt, params, proposer)
            assert got == plain, (type(proposer).__name__, prompt)
            assert st.new_tokens == len(plain) and st.verify_steps <= len(plain) - 1
            totals["drafted"] += st.drafted
            totals["accepted"] += st.accepted
    assert 0 < totals["accepted"] < totals["drafted"]


def test_stops_and_context_end_where_plain_generation_does(tiny_export):
    target = Runner(tiny_export("tiny", "fp32", "fused")[1], CPU2)
    plain, _ = run(target, PROMPTS[0], SamplingParams(max_new_tokens=30))
    stop = plain[12]
    params = GenerationConfig(max_new_tokens=30, stop_token_ids=(stop,))
    want, st0 = run(target, PROMPTS[0], params)
    got, st = run(target, PROMPTS[0], params, PromptLookup(8))
    assert got == want == plain[:plain.index(stop) + 1] and st.finish == st0.finish == ["stop"]
    ctx = target.folder.context
    long_prompt = (PROMPTS[1] * ctx)[:ctx - 5]
    want, st0 = run(target, long_prompt, SamplingParams(max_new_tokens=50))
    got, st = run(target, long_prompt, SamplingParams(max_new_tokens=50), PromptLookup(8))
    assert got == want and len(got) == 6 and st.finish == st0.finish == ["context"]


def expected(p: torch.Tensor, n: float) -> np.ndarray:
    e = p.numpy() / p.numpy().sum()
    return e * n


@pytest.mark.parametrize("drafted_from", ["model", "lookup"])
def test_rejection_sampling_keeps_the_target_distribution(drafted_from):
    """`_verify` on fixed target and draft distributions over 6 tokens, 20000 times: the first emitted token is
    distributed as p[0], and after an accepted first draft the second as p[1] (chi-square, p-value > 1e-3; a
    sampler that accepted every draft, or resampled from p instead of max(0, p - q), fails it)."""
    g = torch.Generator().manual_seed(0)
    V, n = 6, 20000
    p_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.1, 1.5, -0.5, 0.8, 0.0, 1.0],
                             [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    p = torch.softmax(p_logits, -1).double()
    q = torch.softmax(torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 2.0, 0.0]]), -1)
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(n):
        if drafted_from == "model":
            d = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
            draft = Draft(d, q)
        else:
            draft = Draft([1, 3])  # a point mass on a token the target finds unlikely
        take, nxt = _verify(p_logits, draft, params, g)
        out = take + [nxt]
        first[out[0]] += 1
        if take and take[0] == draft.tokens[0]:
            second[out[1]] += 1
    assert chisquare(first, expected(p[0], first.sum())).pvalue > 1e-3
    assert second.sum() > 1000
    assert chisquare(second, expected(p[1], second.sum())).pvalue > 1e-3


def test_sampling_with_lookup_is_seeded_and_well_formed(tiny_export):
    target = Runner(tiny_export("tiny", "fp32", "fused")[1], CPU2)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=4)
    a, st = run(target, PROMPTS[0], params, PromptLookup(4))
    b, _ = run(target, PROMPTS[0], params, PromptLookup(4))
    assert a == b and len(a) == 24 and all(0 <= t < target.vocab for t in a) and st.verify_steps > 0


def test_refusals(tiny_export, tmp_path):
    import shutil

    target = Runner(tiny_export("tiny", "fp32", "fused")[1], CPU2)
    with pytest.raises(Qwen2Error, match="speculative decoding .* runs one prompt at a time"):
        target.speculator = PromptLookup(3)
        list(target.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(max_new_tokens=4)))
    target.speculator = None
    with pytest.raises(Qwen2Error, match="--repetition-penalty does not combine with --lookup or --draft"):
        run(target, PROMPTS[0], GenerationConfig(max_new_tokens=4, repetition_penalty=1.2), PromptLookup(3))
    function = Runner(tiny_export("tiny", "fp32", "function")[1], CPU2)
    with pytest.raises(Qwen2Error, match="needs the fused lowering's shared KV cache"):
        run(function, PROMPTS[0], SamplingParams(max_new_tokens=4), PromptLookup(3))
    other = tmp_path / "other"
    shutil.copytree(tiny_export("tiny-untied", "fp32", "fused")[1], other)
    (other / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}, "merges": []}, "added_tokens": []}')
    with pytest.raises(Qwen2Error, match="the draft's tokenizer is not the target's .*same model family"):
        DraftModel(Runner(other, CPU2), 4, target)


# ---- the real Qwen2.5-Coder-0.5B-Instruct ----------------------------------------------------------------------------
EDIT = ("Rename the function `area` to `rectangle_area` and return the whole file:\n```python\n"
        "def area(width, height):\n    \"\"\"The area of a rectangle.\"\"\"\n    return width * height\n\n\n"
        "def total(shapes):\n    return sum(area(w, h) for w, h in shapes)\n```\n")


@pytest.mark.real_model
def test_real_greedy_speculation_equals_plain(real_exports):
    """The fp32 export as target: prompt lookup on a code edit and on free text, and the int4 export drafting;
    every output equals plain greedy token for token, and the edit's drafts are mostly accepted."""
    root, _ = real_exports
    target = Runner(root / "fp32", CPU2)
    draft = DraftModel(Runner(root / "int4", CPU2), 4, target)
    params = target.default_config(max_new_tokens=32)
    for prompt, chat in ((EDIT, True), ("Tell me about the history of the printing press.", True),
                         ("def merge_sort(items):\n", False)):
        ids = target.encode_prompt(prompt, chat)
        plain, _ = run(target, ids, params)
        for proposer in (PromptLookup(8), draft):
            got, st = run(target, ids, params, proposer)
            assert got == plain, (prompt[:30], type(proposer).__name__)
            if prompt is EDIT:
                assert st.acceptance > 0.5 and st.tokens_per_step > 2
