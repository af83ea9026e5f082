"""Decode and prefill speed of export folders through plain ONNX Runtime sessions (2 threads): a quick
comparison between export forms (e.g. `--lowering function` vs `fused`). Runs alternate between the folders so
background load hits each alike. Prefill computes the last position's logits only (`logits_to_keep`).
A benchmark: prints a table, asserts nothing.

    python bench/decode.py exports/qwen2-0.5b-int4-function exports/qwen2-0.5b-int4 [--tokens 128] [--runs 3]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx.verify import empty_past, ort_step, session  # noqa: E402


def run(sess, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for one greedy generation of n tokens."""
    ids = np.array([prompt], dtype=np.int64)
    t0 = time.perf_counter()
    logits, past = ort_step(sess, ids, np.ones_like(ids), np.arange(len(prompt))[None], empty_past(sess, 1),
                            logits_to_keep=1)
    t1 = time.perf_counter()
    total = len(prompt)
    tok = int(logits[0, -1].argmax())
    t2 = time.perf_counter()
    for _ in range(n - 1):
        total += 1
        logits, past = ort_step(sess, np.array([[tok]]), np.ones((1, total), dtype=np.int64),
                                np.array([[total - 1]]), past)
        tok = int(logits[0, -1].argmax())
    t3 = time.perf_counter()
    return len(prompt) / (t1 - t0), (n - 1) / (t3 - t2)


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--tokens", default=128)
@click.option("--prompt-len", default=512)
@click.option("--runs", default=3)
@click.option("--threads", default=2)
def main(folders, tokens, prompt_len, runs, threads):
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 150000, prompt_len).tolist()
    print(f"| export | prefill tok/s ({prompt_len}) | decode tok/s ({tokens}) |\n|---|---|---|")
    sessions = {f: session(Path(f), threads=threads) for f in folders}
    res: dict[str, list] = {f: [] for f in folders}
    for _ in range(runs):
        for f, sess in sessions.items():
            res[f].append(run(sess, prompt, tokens))
    for f in folders:
        r = res[f]
        print(f"| {f} | {statistics.median(x[0] for x in r):.1f} | {statistics.median(x[1] for x in r):.1f} |")


if __name__ == "__main__":
    main()
