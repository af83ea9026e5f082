"""Speculative decoding for one sequence: a cheap proposer drafts up to k tokens, the export checks them all in one
forward step over k+1 tokens (the logits of every position: `logits_to_keep` = k+1), keeps the longest prefix it
agrees with plus one token of its own, and rolls the KV cache back over the rest. With the shared past/present
buffer (kv.py) a rollback is a shorter length, nothing is copied.

Proposers:
- `PromptLookup(n)`: the tokens that followed the latest earlier occurrence of the sequence's last 4 or 3 tokens
  (prompt-lookup decoding): free to compute, and right whenever the output copies its input — code edits,
  refactors, annotations.
- `DraftModel(runner, k)`: another export of the family (same tokenizer, checked), run greedily or with the same
  sampling settings, with its own cache kept in step with the accepted text.

Greedy decoding accepts a drafted token when it is the export's own arg-max at that position, so the output is the
export's greedy output. Sampling uses speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023):
accept a drafted x with probability min(1, p(x)/q(x)), else sample from max(0, p - q) renormalized, and after k
acceptances sample one more from p; the output is distributed as sampling from p alone. A lookup draft is a point
mass (q(x) = 1).

A caveat of floating point, not of the method: the verify step runs k+1 positions through kernels that round
differently from a one-token step (GroupQueryAttention by ~1e-6 relative, measured). In an fp32 export that stays
~1e-5 in the logits and greedy speculation gives plain greedy's tokens; an int4 export quantizes its activations to
int8 inside MatMulNBits (accuracy level 4), which turns such ulps into whole quantization steps, ~0.2 in the
logits by the last layer, so at a near-tie greedy speculation on int4 can take the other branch.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from qwen2_ref.errors import Qwen2Error
from qwen2_ref.generate import next_token, sampling_probs

if TYPE_CHECKING:
    from .runner import GenerationConfig, Runner


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # (k, V) the draft's sampling distributions; None: point masses


class PromptLookup:
    """Drafts from n-gram matches in the sequence so far (prompt and output): the tokens that followed the latest
    earlier occurrence of its last 4, else 3 tokens. A verify step over several tokens costs a CPU
    more than a one-token step (about 1.7x for two tokens on 2 cores), so a draft that misses is not free: after a
    miss (nothing accepted) the lookup rests for 1, 2, 4 .. 16 steps, and each draft is as long as the last one
    accepted plus one, doubling while they are accepted whole, up to `tokens`."""

    def __init__(self, tokens: int, max_ngram: int = 4, min_ngram: int = 3):
        if tokens < 1:
            raise Qwen2Error(f"--lookup must be at least 1, not {tokens}")
        self.k, self.max_ngram, self.min_ngram = tokens, max_ngram, min_ngram
        self.start((), None)

    def start(self, prompt: Sequence[int], params) -> None:
        self.length, self.rest, self.backoff = self.k, 0, 1

    def propose(self, seq: Sequence[int], n: int, params, gen) -> Draft:
        if self.rest > 0:
            self.rest -= 1
            return Draft([])
        a = np.asarray(seq)
        L = len(a)
        n = min(n, self.length)
        for g in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            # windows a[i:i+g] for i < L-g (not the suffix itself) equal to the suffix; the latest match wins
            win = np.lib.stride_tricks.sliding_window_view(a[:L - 1], g)
            hits = np.flatnonzero((win == a[L - g:]).all(axis=1))
            if len(hits):
                i = int(hits[-1]) + g
                return Draft(a[i:i + n].tolist())
        return Draft([])

    def accepted(self, seq_len: int, drafted: int, kept: int) -> None:
        if not drafted:
            return
        if kept == 0:
            self.rest, self.backoff = self.backoff, min(16, 2 * self.backoff)
        else:
            self.backoff = 1
        self.length = min(self.k, 2 * self.length) if kept == drafted else max(1, kept + 1)


class DraftModel:
    """A smaller (or cheaper) export of the same family drafts up to k tokens, one step at a time: as many as the
    last draft's accepted tokens plus two, doubling while drafts are accepted whole (each drafted token costs a
    draft step whether it is kept or not)."""

    def __init__(self, runner: "Runner", tokens: int, target: "Runner"):
        if tokens < 1:
            raise Qwen2Error(f"--draft-tokens must be at least 1, not {tokens}")
        if not runner.shared_kv:
            raise Qwen2Error(f"{runner.folder.path}: a draft needs the fused lowering's shared KV cache (re-export "
                             "without --lowering function)")
        mine, theirs = tokenizer_digest(runner.folder.path), tokenizer_digest(target.folder.path)
        if mine != theirs or (mine is None and runner.vocab != target.vocab):  # two random exports: vocab sizes
            raise Qwen2Error(f"{runner.folder.path}: the draft's tokenizer is not the target's "
                             f"({target.folder.path}): a draft must come from the same model family")
        self.r, self.k, self.vocab = runner, tokens, target.vocab
        self.fed = 0  # tokens of the sequence in the draft's cache
        self.length = tokens

    def start(self, prompt: Sequence[int], params) -> None:
        """The draft's prefill of the prompt, all but its last token (the first propose feeds that and on), into a
        cache sized for this generation."""
        r = self.r
        r._ensure_cache(1, min(r.folder.context, len(prompt) + params.max_new_tokens + self.k + 1))
        self.fed, self.length = 0, self.k
        if len(prompt) > 1 and len(prompt) <= r.cache.capacity:
            r.prefill(np.array([list(prompt[:-1])]), np.ones((1, len(prompt) - 1), dtype=np.int64),
                      r.settings.prefill_chunk)
            self.fed = len(prompt) - 1

    def propose(self, seq: Sequence[int], n: int, params, gen) -> Draft:
        r = self.r
        n = min(n, self.length, r.cache.capacity - len(seq))
        if n <= 0:
            return Draft([])
        new = list(seq[self.fed:])
        chunk = r.settings.prefill_chunk or len(new)
        for s in range(0, len(new), chunk):  # catch up: what was accepted since, then the target's own token
            part = new[s:s + chunk]
            L = int(r.cache.lengths[0])
            logits = r.step(np.array([part]), np.ones((1, L + len(part)), dtype=np.int64),
                            np.arange(L, L + len(part))[None])
        tokens, probs = [], []
        for i in range(n):
            scores = torch.from_numpy(np.array(logits[0:1], dtype=np.float32))
            if params.greedy:
                t = int(scores.argmax())
            else:
                q = sampling_probs(scores, params)[0]
                t = int(torch.multinomial(q, 1, generator=gen))
                probs.append(torch.nn.functional.pad(q, (0, self.vocab - q.shape[0])))
            tokens.append(t)
            if i < n - 1:
                L = int(r.cache.lengths[0])
                logits = r.step(np.array([[t]]), np.ones((1, L + 1), dtype=np.int64), np.array([[L]]))
        self.fed = len(seq) + n - 1  # the last drafted token is not in the draft's cache
        return Draft(tokens, torch.stack(probs) if probs else None)

    def accepted(self, seq_len: int, drafted: int, kept: int) -> None:
        """The target kept the first `seq_len` tokens: drop the rest from the draft's cache."""
        self.fed = min(self.fed, seq_len)
        self.r.cache.lengths[:] = self.fed
        if drafted:
            self.length = min(self.k, 2 * self.length) if kept == drafted else max(2, kept + 2)


def tokenizer_digest(folder) -> str | None:
    """A digest of the tokenizer's vocabulary, merges and added tokens (not its file's formatting)."""
    from pathlib import Path

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    t = json.loads(path.read_text(encoding="utf-8"))
    key = json.dumps([t.get("model", {}).get("vocab"), t.get("model", {}).get("merges"),
                      [(a.get("id"), a.get("content")) for a in t.get("added_tokens", [])]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def speculative_generate(runner: "Runner", prompt: Sequence[int], params: "GenerationConfig", proposer,
                         prefill_chunk: int, stop_check=None) -> Iterator[list[int | None]]:
    """One sequence, one token per yield (`Runner.generate`'s contract, batch of one); statistics in
    `runner.stats` (verify_steps, drafted, accepted)."""
    from .runner import Stats

    if not runner.shared_kv:
        raise Qwen2Error(f"{runner.folder.path}: speculative decoding needs the fused lowering's shared KV cache "
                         "(re-export without --lowering function)")
    if getattr(params, "repetition_penalty", 1.0) != 1.0:
        raise Qwen2Error("--repetition-penalty does not combine with --lookup or --draft")
    ctx = runner.folder.context
    T = len(prompt)
    steps = min(params.max_new_tokens, ctx - T + 1)
    runner.stats = st = Stats(prompt_tokens=T, batch=1, finish=["length"])
    if steps <= 0:
        if params.max_new_tokens > 0:
            st.finish = ["context"]
        return
    cache = runner._ensure_cache(1, min(ctx, T + steps - 1 + proposer.k))
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    stops = set(params.stop_token_ids)
    t0 = time.perf_counter()
    proposer.start(prompt, params)
    logits = runner.prefill(np.array([list(prompt)]), np.ones((1, T), dtype=np.int64), prefill_chunk)
    seq = list(prompt)
    x = int(next_token(torch.from_numpy(np.array(logits[0:1], dtype=np.float32)), params, gen)[0])
    st.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        seq.append(x)
        st.new_tokens += 1
        yield [x]
        if x in stops or (stop_check is not None and stop_check(0, x)):
            st.finish = ["stop"]
            break
        if st.new_tokens >= steps:
            if steps < params.max_new_tokens:
                st.finish = ["context"]
            break
        L = int(cache.lengths[0])  # = len(seq) - 1: the last token is not fed yet
        room = min(proposer.k, steps - st.new_tokens - 1, cache.capacity - L - 1)
        draft = proposer.propose(seq, room, params, gen) if room > 0 else Draft([])
        take, nxt = verify(runner, x, draft, L, params, gen)
        st.verify_steps += 1
        st.drafted += len(draft.tokens)
        st.accepted += len(take)
        # keep x and the accepted drafts; the rejected ones' keys are past the new length
        cache.lengths[0] = L + 1 + len(take)
        proposer.accepted(len(seq) + len(take), len(draft.tokens), len(take))
        ended = False
        for t in take:
            seq.append(t)
            st.new_tokens += 1
            yield [t]
            if t in stops or (stop_check is not None and stop_check(0, t)):
                st.finish, ended = ["stop"], True
                break
            if st.new_tokens >= steps:
                ended = True
                break
        if ended:
            if st.finish == ["length"] and steps < params.max_new_tokens:
                st.finish = ["context"]
            break
        x = nxt
    st.decode_s = time.perf_counter() - t1


def verify(runner: "Runner", last: int, draft: Draft, length: int, params, gen,
           row: int | None = None) -> tuple[list[int], int]:
    """One forward step over `last` and the drafted tokens at positions length, length+1, .. (the cache's rows
    `row` alone, or its only row), every position's logits kept; (the drafted tokens accepted, the next token)."""
    feed = [last] + draft.tokens
    S = len(feed)
    out = runner.step(np.array([feed], dtype=np.int64), np.ones((1, length + S), dtype=np.int64),
                      np.arange(length, length + S)[None], row=row, keep=S)
    return _verify(np.asarray(out, dtype=np.float32).reshape(S, -1), draft, params, gen)


def _verify(scores: np.ndarray | torch.Tensor, draft: Draft, params, gen) -> tuple[list[int], int]:
    """(S, V) logits for the positions after x, d1 .. dk -> (accepted drafted tokens, the next token). Greedy reads
    the runner's logits buffer in place (numpy's arg-max: one pass, no copy; torch's over 17 x 151936 logits cost
    ~6 ms a step beside ONNX Runtime's spinning threads, a fifth of a step)."""
    k = len(draft.tokens)
    if params.greedy:
        best = scores.argmax(-1).tolist()
        a = 0
        while a < k and draft.tokens[a] == best[a]:
            a += 1
        return draft.tokens[:a], best[a]
    p = sampling_probs(torch.as_tensor(scores), params)  # (S, V)
    for i, t in enumerate(draft.tokens):
        q_t = 1.0 if draft.probs is None else float(draft.probs[i, t])
        u = float(torch.rand(1, generator=gen))
        if u * q_t < float(p[i, t]):  # accept with probability min(1, p/q)
            continue
        if draft.probs is None:
            resid = p[i].clone()
            resid[t] = 0.0
        else:
            resid = torch.clamp(p[i] - draft.probs[i], min=0.0)
        if float(resid.sum()) <= 0:  # p == q exactly: any sample from p is right
            resid = p[i]
        return draft.tokens[:i], int(torch.multinomial(resid / resid.sum(), 1, generator=gen))
    return draft.tokens, int(torch.multinomial(p[k], 1, generator=gen))
