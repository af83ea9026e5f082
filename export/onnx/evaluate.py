"""Quality of an export on real text: perplexity and greedy generation through ONNX Runtime."""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np

from .verify import empty_past, ort_step

# A fixed text every Python install carries, byte for byte (CPython 3.11's Lib/heapq.py): the same text the peer
# figures in ../shared/REAL_MODEL.md were measured on.
def fixed_text() -> str:
    return Path(heapq.__file__).read_text()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def perplexity(sess, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] given the prefix, in one pass."""
    x = np.array([ids], dtype=np.int64)
    logits, _ = ort_step(sess, x, np.ones_like(x), np.arange(len(ids))[None], empty_past(sess, 1))
    lp = log_softmax(logits[0, :-1])
    nll = -lp[np.arange(len(ids) - 1), np.array(ids[1:])]
    return float(np.exp(nll.mean()))


def greedy(sess, prompt: list[int], n: int, stop: tuple[int, ...] = ()) -> list[int]:
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(len(prompt))[None]
    past = empty_past(sess, 1)
    out: list[int] = []
    for _ in range(n):
        logits, past = ort_step(sess, ids, mask, pos, past)
        t = int(logits[0, -1].argmax())
        out.append(t)
        if t in stop:
            break
        ids = np.array([[t]])
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        pos = np.array([[mask.shape[1] - 1]])
    return out
