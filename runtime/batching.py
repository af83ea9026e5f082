"""Continuous batching: many sequences share each decode step of one export, joining and leaving independently.

The engine owns a Runner and one shared KV cache of `slots` rows (kv.py; each row a contiguous slice of every layer's
buffer). A request waits in a bounded queue; when a row is free it is prefilled into that row alone, `chunk` prompt
tokens per scheduler step (bound to the row's slice: `KVCache.bind_row`; requests that arrive together fill
consecutive rows and are prefilled together, the chunk shared among them), then it decodes with every other running
row in one forward step per token, each row at its own length. A row that finishes, is cancelled or
passes its deadline is freed at the next step; the others never restart. Between two decode steps at most one
prefill chunk runs, so a newcomer delays the running streams by one chunk at most.

This needs an export whose attention reads each row's length from its own mask row ("seqlens": `python -m export
onnx --attention seqlens`, the CUDA profiles' default): with the CPU profiles' padding-bias layout every row writes
its new key at one shared position, so rows cannot be at different lengths.

A decode step runs the rows up to the last decoding one (rows are taken lowest first, so a lone stream is a batch of
one). Rows below it that are not decoding ride along: a free row writes one key at its position 0, a row still being
prefilled one key just after its prompt so far, each overwritten by that row's next prefill.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from qwen2_ref.errors import Qwen2Error
from qwen2_ref.generate import next_token

from .runner import GenerationConfig, Runner, _StopText, apply_repetition_penalty
from .speculative import Draft, PromptLookup, verify


class QueueFull(Qwen2Error):
    """The engine's waiting queue is full: the caller should retry later (HTTP 429)."""


@dataclass
class Request:
    """One sequence: its prompt, its sampling, and what it has produced. `on_token(token, text)` is called from
    the engine's thread for each new token (text: the piece that became safe to show, possibly empty); `finish`
    is set once (stop | length | context | cancelled | deadline) and `done` fires."""

    prompt: list[int]
    params: GenerationConfig
    on_token: Callable[[int, str], None] | None = None
    on_finish: Callable[[str], None] | None = None  # called once, from the engine's thread, with `finish`
    deadline: float | None = None  # time.monotonic() after which the request ends ("deadline")
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _cancel: bool = False

    def cancel(self) -> None:
        """End the request at the engine's next step (a client that went away)."""
        self._cancel = True


@dataclass
class _Slot:
    req: Request
    fed: int = 0  # prompt tokens already in the cache
    next_token: int | None = None  # sampled, not yet fed
    gen: torch.Generator | None = None
    seen: torch.Tensor | None = None  # repetition penalty: tokens seen
    text: _StopText | None = None
    lookup: PromptLookup | None = None


class BatchEngine:
    def __init__(self, runner: Runner, slots: int = 4, capacity: int | None = None, chunk: int = 256,
                 max_queue: int = 64, lookup: int = 0):
        """`slots`: sequences decoded together; `capacity`: each sequence's longest prompt + output (default: the
        export's context); `chunk`: prompt tokens per prefill step; `max_queue`: requests waiting for a slot;
        `lookup`: prompt-lookup drafts of up to this many tokens while one stream decodes alone (0: off)."""
        if not runner.per_row:
            raise Qwen2Error(f"{runner.folder.path}: continuous batching needs an export whose rows keep their own "
                             "lengths: re-export with --attention seqlens")
        self.runner, self.slots = runner, slots
        self.capacity = min(capacity or runner.folder.context, runner.folder.context)
        self.chunk, self.max_queue, self.lookup = chunk, max_queue, lookup
        runner._ensure_cache(slots, self.capacity)
        self.cache = runner.cache
        self.rows: list[_Slot | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self.steps = 0  # decode steps run
        self.prefills = 0  # prefill steps run

    # ---- the caller's side ------------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: GenerationConfig, on_token=None,
               timeout_s: float | None = None, on_finish=None) -> Request:
        prompt = list(prompt)
        if not prompt:
            raise Qwen2Error("the prompt is empty")
        if len(prompt) >= self.capacity:
            raise Qwen2Error(f"the prompt has {len(prompt)} tokens; this server's context is {self.capacity}")
        req = Request(prompt, params, on_token, on_finish, time.monotonic() + timeout_s if timeout_s else None)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already: retry later")
            self.waiting.append(req)
        return req

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.rows)

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()

    # ---- one scheduler step -----------------------------------------------------------------------------------
    def step(self) -> None:
        """Free what ended, admit waiting requests into free rows, run one prefill chunk (if a row is filling),
        then one decode step for every row that has a token to feed."""
        now = time.monotonic()
        for r, s in enumerate(self.rows):
            if s is not None and (s.req._cancel or (s.req.deadline is not None and now > s.req.deadline)):
                self._end(r, "cancelled" if s.req._cancel else "deadline")
        with self._lock:
            for r in range(self.slots):
                if self.rows[r] is None and self.waiting:
                    req = self.waiting.popleft()
                    if req._cancel:
                        self._finish(req, "cancelled")
                        continue
                    self.rows[r] = self._admit(req)
                    self.cache.lengths[r] = 0
        if any(s is not None and s.fed < len(s.req.prompt) for s in self.rows):
            self._prefill_chunk()
        if any(s is not None and s.next_token is not None for s in self.rows):
            self._decode()

    def _admit(self, req: Request) -> _Slot:
        p = req.params
        seen = None
        if getattr(p, "repetition_penalty", 1.0) != 1.0:
            seen = torch.zeros(1, self.runner.vocab, dtype=torch.bool)
            seen[0, req.prompt] = True
        tok = self.runner.folder.tokenizer
        return _Slot(req, gen=torch.Generator().manual_seed(p.seed) if p.seed is not None else None, seen=seen,
                     text=_StopText(tok, p.stop_strings) if tok is not None else None,
                     lookup=PromptLookup(self.lookup) if self.lookup and seen is None else None)

    def _prefill_chunk(self) -> None:
        """One prefill step of at most `chunk` tokens. The first filling row alone, `chunk` tokens of its prompt; or,
        when it has not started and whole prompts fit, it and the unstarted rows right after it (requests that
        arrived together) at once, right-padded to the longest: ONNX Runtime's GroupQueryAttention takes a batch of
        several tokens per row only as a first prompt. Each row's logits are read at its own last token."""
        self.prefills += 1
        first = next(r for r, s in enumerate(self.rows) if s is not None and s.fed < len(s.req.prompt))
        run, longest = [first], len(self.rows[first].req.prompt)
        if self.rows[first].fed == 0 and longest <= self.chunk:
            while run[-1] + 1 < self.slots and (s := self.rows[run[-1] + 1]) is not None and s.fed == 0 \
                    and (len(run) + 1) * max(longest, len(s.req.prompt)) <= self.chunk:
                run.append(run[-1] + 1)
                longest = max(longest, len(s.req.prompt))
        if len(run) == 1:
            s = self.rows[first]
            a, b = s.fed, min(len(s.req.prompt), s.fed + self.chunk)
            logits = self.runner.step(np.array([s.req.prompt[a:b]], dtype=np.int64), np.ones((1, b), dtype=np.int64),
                                      np.arange(a, b)[None], row=first)
            s.fed = b
            if b == len(s.req.prompt):
                self._sample(first, logits[0:1].copy())
            return
        slots = [self.rows[r] for r in run]
        n = np.array([len(s.req.prompt) for s in slots])
        ids = np.zeros((len(run), longest), dtype=np.int64)
        for i, s in enumerate(slots):
            ids[i, :n[i]] = s.req.prompt
        mask = (np.arange(longest)[None, :] < n[:, None]).astype(np.int64)
        keep = longest - int(n.min()) + 1  # the last positions, down to the shortest prompt's last token
        logits = self.runner.step(ids, mask, np.broadcast_to(np.arange(longest), ids.shape), row=first, keep=keep)
        for i, (r, s) in enumerate(zip(run, slots)):
            s.fed = int(n[i])
            self.cache.lengths[r] = n[i]  # the padding written past a shorter prompt is overwritten later
            self._sample(r, (logits[i:i + 1] if keep == 1 else logits[i:i + 1, n[i] - 1 - (longest - keep)]).copy())

    def _decode(self) -> None:
        """One step over the rows up to the last decoding one (a prefix of the cache: rows are taken lowest
        first, so a lone stream decodes as a batch of one)."""
        live = [r for r, s in enumerate(self.rows) if s is not None and s.next_token is not None]
        if len(live) == 1 and self.rows[live[0]].lookup is not None and not self.waiting \
                and all(s is None or s.next_token is not None for s in self.rows):
            return self._speculate(live[0])
        n = live[-1] + 1
        lengths = self.cache.lengths.copy()
        ids = np.zeros((n, 1), dtype=np.int64)
        pos = np.zeros((n, 1), dtype=np.int64)
        for r in live:
            ids[r, 0], pos[r, 0] = self.rows[r].next_token, lengths[r]
        for r in range(n):  # the others in the prefix ride along, writing one key their next prefill overwrites:
            if r not in live and self.rows[r] is None:  # a free row at position 0;
                self.cache.lengths[r] = 0  # a filling row just after its prompt so far (where its next chunk goes)
            pos[r, 0] = pos[r, 0] if r in live else self.cache.lengths[r]
        width = int(self.cache.lengths[:n].max()) + 1
        mask = (np.arange(width)[None, :] <= self.cache.lengths[:n, None]).astype(np.int64)
        logits = self.runner.step(ids, mask, pos, row=0)
        self.steps += 1
        self.cache.lengths[:] = lengths  # rows not decoded keep their length (a filling row resumes its prompt)
        for r in live:
            self.cache.lengths[r] += 1
            self._sample(r, logits[r:r + 1])

    def _speculate(self, r: int) -> None:
        """A lone decoding stream: one verify step over its token and a prompt-lookup draft (speculative.py), in
        its row alone; the accepted tokens and the step's own are emitted, the cache rolled back past the rest."""
        s = self.rows[r]
        p = s.req.params
        L = int(self.cache.lengths[r])
        seq = s.req.prompt + s.req.tokens
        room = min(s.lookup.k, p.max_new_tokens - len(s.req.tokens) - 1, self.capacity - L - 2)
        draft = s.lookup.propose(seq, room, p, s.gen) if room > 0 else Draft([])
        take, nxt = verify(self.runner, s.next_token, draft, L, p, s.gen, row=r)
        self.steps += 1
        s.lookup.accepted(len(seq) + len(take), len(draft.tokens), len(take))
        self.cache.lengths[r] = L + 1
        for t in take:
            if not self._emit(r, t):
                return
            self.cache.lengths[r] += 1
        self._emit(r, nxt)

    def _sample(self, r: int, logits: np.ndarray) -> None:
        """The row's next token from its logits (its own sampler and generator), emitted."""
        s = self.rows[r]
        p = s.req.params
        scores = torch.from_numpy(logits)
        if s.seen is not None:
            scores = apply_repetition_penalty(scores, s.seen, p.repetition_penalty)
        self._emit(r, int(next_token(scores, p, s.gen)[0]))

    def _emit(self, r: int, tok: int) -> bool:
        """Give the row its next token; the row ends on a stop token or string, its max_new_tokens, or the
        capacity. Whether it goes on."""
        s = self.rows[r]
        p = s.req.params
        if s.seen is not None:
            s.seen[0, tok] = True
        s.req.tokens.append(tok)
        stopped = tok in p.stop_token_ids
        piece = ""
        if s.text is not None:
            stopped |= s.text.push(tok)
            piece = s.text.take()
        s.req.text += piece
        if s.req.on_token is not None:
            s.req.on_token(tok, piece)
        if stopped:
            self._end(r, "stop")
        elif len(s.req.tokens) >= p.max_new_tokens:
            self._end(r, "length")
        elif int(self.cache.lengths[r]) + 1 >= self.capacity:
            self._end(r, "context")
        else:
            s.next_token = tok
            return True
        return False

    def _end(self, r: int, reason: str) -> None:
        s = self.rows[r]
        if s.text is not None:
            rest = s.text.take(final=True)
            if rest:
                s.req.text += rest
                if s.req.on_token is not None:
                    s.req.on_token(-1, rest)  # -1: text only, no new token
        self.rows[r] = None
        self._finish(s.req, reason)

    @staticmethod
    def _finish(req: Request, reason: str) -> None:
        req.finish = reason
        req.done.set()
        if req.on_finish is not None:
            req.on_finish(reason)

    def fail_all(self, reason: str = "error") -> None:
        """End every running and waiting request (the engine's step raised)."""
        for r, s in enumerate(self.rows):
            if s is not None:
                self.rows[r] = None
                self._finish(s.req, reason)
        with self._lock:
            while self.waiting:
                self._finish(self.waiting.popleft(), reason)
