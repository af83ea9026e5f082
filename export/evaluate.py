"""Quality of an export on real text, for any target: perplexity and greedy generation over a step function
(export/gate.py: a fresh step keeps its own cache, starting empty)."""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Sequence

import numpy as np

from .gate import Step


def fixed_text() -> str:
    """A text every Python install carries byte for byte: CPython 3.11's Lib/heapq.py (the text the README's
    perplexity figures are measured on)."""
    return Path(heapq.__file__).read_text()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def perplexity(step: Step, ids: Sequence[int], chunk: int = 256, rows: int = 128) -> float:
    """exp(mean NLL) of ids[1:] given the prefix: a prefill in chunks of `chunk` tokens through the cache (a
    1000-token prefill at once holds 1000 x 151936 logits, 0.6 GB per copy), log-softmax `rows` positions at a time."""
    ids = list(ids)
    nll = []
    for s in range(0, len(ids) - 1, chunk):
        e = min(len(ids) - 1, s + chunk)  # positions s .. e-1 predict tokens s+1 .. e
        x = np.array([ids[s:e]], dtype=np.int64)
        logits = step(x, np.ones((1, e), dtype=np.int64), np.arange(s, e)[None])[0]
        target = np.array(ids[s + 1:e + 1])
        for r in range(0, e - s, rows):
            lp = log_softmax(logits[r:r + rows])
            nll.append(-lp[np.arange(lp.shape[0]), target[r:r + rows]])
    return float(np.exp(np.concatenate(nll).mean()))


def greedy(step: Step, prompt: Sequence[int], n: int, stop: Sequence[int] = ()) -> list[int]:
    ids = np.array([list(prompt)], dtype=np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(len(prompt))[None]
    out: list[int] = []
    for _ in range(n):
        t = int(step(ids, mask, pos)[0, -1].argmax())
        out.append(t)
        if t in stop:
            break
        ids = np.array([[t]])
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        pos = np.array([[mask.shape[1] - 1]])
    return out


def export_reports(folders) -> tuple[dict, object]:
    """({folder: its export_report.json}, the one checkpoint they were all exported from): what a benchmark over
    several exports of one model compares them against. A mix of checkpoints is a one-line error."""
    import json

    from qwen2_ref.checkpoint import open_checkpoint
    from qwen2_ref.errors import Qwen2Error

    reports = {f: json.loads((Path(f) / "export_report.json").read_text()) for f in folders}
    sources = {r["source"] for r in reports.values()}
    if len(sources) != 1:
        raise Qwen2Error(f"the folders come from different checkpoints: {sorted(sources)}")
    return reports, open_checkpoint(sources.pop())
