"""Continuous batching (runtime/batching.py) over a tiny seqlens export: every request gets exactly the tokens it
gets alone, whenever it joins and whoever else is running; rows free and refill; a full queue, a cancel and a
deadline end requests cleanly."""

from __future__ import annotations

import pytest

from export.onnx import export_onnx
from export.plan import make_plan
from qwen2_ref.errors import Qwen2Error
from qwen2_ref.generate import SamplingParams
from runtime import GenerationConfig, Runner, SessionSettings
from runtime.batching import BatchEngine, QueueFull

from .conftest import random_checkpoint

PROMPTS = [[5, 9, 200, 31, 77, 12, 400, 3, 3, 8, 51], [8, 1, 3, 99, 7], [301, 17, 45, 2, 260, 11, 90, 6],
           [44, 45, 46], [7] * 13, [100, 200, 300, 400, 500, 11]]
CPU2 = SessionSettings(threads=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    ckpt = random_checkpoint("tiny-untied")
    out = tmp_path_factory.mktemp("batching") / "seqlens"
    export_onnx(ckpt, make_plan("onnx", ckpt, dtype="fp32", attention="seqlens", out=out, verify=False))
    return out


def alone(folder, prompt, params) -> list[int]:
    return [step[0] for step in Runner(folder, CPU2).generate([prompt], params)]


def cfg(n: int = 12, **kw) -> GenerationConfig:
    return GenerationConfig(**({"max_new_tokens": n, "stop_token_ids": ()} | kw))


def test_requests_joining_at_different_steps_each_get_their_own_tokens(folder):
    """Six requests through three rows, submitted while others run (prefill in chunks of 4): each request's
    tokens equal its single-stream generation, greedy and seeded sampling alike; rows are reused."""
    params = [cfg(12), cfg(9, temperature=0.8, top_k=40, seed=3), cfg(15), cfg(5), cfg(12, temperature=1.1, seed=9),
              cfg(7)]
    engine = BatchEngine(Runner(folder, CPU2), slots=3, chunk=4)
    reqs = [engine.submit(PROMPTS[0], params[0]), engine.submit(PROMPTS[1], params[1])]
    for _ in range(3):
        engine.step()
    reqs += [engine.submit(p, q) for p, q in zip(PROMPTS[2:], params[2:])]  # join a running batch
    engine.run_until_idle()
    for req, prompt, p in zip(reqs, PROMPTS, params):
        assert req.done.is_set() and req.finish == "length"
        assert req.tokens == alone(folder, prompt, p), prompt
    assert engine.steps < sum(p.max_new_tokens for p in params)  # decode steps were shared


def test_requests_arriving_together_are_prefilled_together(folder):
    """Four prompts of different lengths submitted at once fill rows 0-3 in one right-padded prefill step (each
    row's logits read at its own last token); a fifth whose prompt is longer than the chunk joins later, prefilled
    alone in chunks. Every request's tokens equal its single-stream generation."""
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[3], PROMPTS[5], PROMPTS[4] * 2]
    params = [cfg(10), cfg(8, temperature=0.9, seed=5), cfg(12), cfg(6), cfg(9)]
    engine = BatchEngine(Runner(folder, CPU2), slots=4, chunk=48)
    reqs = [engine.submit(p, q) for p, q in zip(prompts[:4], params[:4])]
    engine.step()
    assert engine.prefills == 1 and all(s is not None and s.next_token is not None for s in engine.rows)
    reqs.append(engine.submit(prompts[4], params[4]))  # 26 tokens: 2 rows' worth of 26 > 48, so alone
    engine.run_until_idle()
    for req, prompt, p in zip(reqs, prompts, params):
        assert req.tokens == alone(folder, prompt, p), prompt
    assert engine.prefills == 2


def test_lookup_speculation_while_alone(folder):
    """With prompt lookup on, a stream decoding alone verifies drafts (fewer steps than tokens) and every request,
    alone or joined by others, greedy or seeded, still gets its single-stream tokens."""
    rep = [5, 9, 200, 31, 77, 12] * 3
    params = [cfg(30), cfg(20), cfg(12, temperature=0.8, seed=2)]
    engine = BatchEngine(Runner(folder, CPU2), slots=2, chunk=32, lookup=6)
    first = engine.submit(rep, params[0])
    engine.run_until_idle()
    assert first.tokens == alone(folder, rep, params[0]) and engine.steps < len(first.tokens) - 1
    reqs = [engine.submit(rep, params[1])]
    for _ in range(4):
        engine.step()
    reqs += [engine.submit(PROMPTS[2], params[2]), engine.submit(PROMPTS[0], params[0])]
    engine.run_until_idle()
    assert reqs[0].tokens == alone(folder, rep, params[1])
    assert reqs[2].tokens == alone(folder, PROMPTS[0], params[0])
    assert len(reqs[1].tokens) == 12 and reqs[1].finish == "length"  # sampled: speculation changes the draws


def test_stop_tokens_cancel_deadline_and_queue(folder):
    engine = BatchEngine(Runner(folder, CPU2), slots=2, chunk=8, max_queue=2)
    free = alone(folder, PROMPTS[0], cfg(10))
    stopper = engine.submit(PROMPTS[0], cfg(10, stop_token_ids=(free[4],)))
    cancelled = engine.submit(PROMPTS[1], cfg(50))
    with pytest.raises(QueueFull, match="2 requests are waiting already: retry later"):
        engine.submit(PROMPTS[2], cfg(5))
    engine.step()  # both take a row: the queue has room again
    late = engine.submit(PROMPTS[3], cfg(50), timeout_s=1e-9)
    for _ in range(5):  # one prefill chunk per step: the second row is decoding after these
        engine.step()
    cancelled.cancel()
    engine.run_until_idle()
    assert stopper.finish == "stop" and stopper.tokens == free[:free.index(free[4]) + 1]
    assert cancelled.finish == "cancelled" and 0 < len(cancelled.tokens) < 50
    assert late.finish == "deadline"
    assert not engine.busy and all(r is None for r in engine.rows)


def test_refusals(folder, tiny_export):
    _, bias, _ = tiny_export("tiny", "fp32", "fused")
    with pytest.raises(Qwen2Error, match="continuous batching needs an export whose rows keep their own lengths: "
                                         "re-export with --attention seqlens"):
        BatchEngine(Runner(bias, CPU2))
    engine = BatchEngine(Runner(folder, CPU2), slots=1, capacity=16)
    with pytest.raises(Qwen2Error, match="the prompt has 20 tokens; this server's context is 16"):
        engine.submit(list(range(1, 21)), cfg())
    with pytest.raises(Qwen2Error, match="the prompt is empty"):
        engine.submit([], cfg())
    req = engine.submit(PROMPTS[0], cfg(50))
    engine.run_until_idle()
    assert req.finish == "context" and len(PROMPTS[0]) + len(req.tokens) == 16
    assert req.tokens == alone(folder, PROMPTS[0], SamplingParams(max_new_tokens=len(req.tokens)))
