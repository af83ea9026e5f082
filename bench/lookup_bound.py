"""How far prompt lookup could go on a given export: the verify-step cost per step width measured on the export
itself, then, on `bench/speculative.py`'s code-edit prompts, the speed-up of our lookup policy and of an oracle
that drafts, from the same 3-/4-gram matches, exactly the tokens that will be accepted (the best any lookup policy
over those matches can do: no missed drafts, the best of all matching places), and the two halves of that
oracle apart (our match, drafted when and as far as it will be accepted; the best match at our length).
All replay the target's own plain greedy output through the measured cost table, so they differ only in the
policy. A benchmark: prints a table, asserts nothing.

    python bench/lookup_bound.py --model exports/qwen2-0.5b-int4 [--tokens 128]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime import Runner, SessionSettings  # noqa: E402
from runtime.speculative import PromptLookup  # noqa: E402

WIDTHS = (1, 2, 3, 4, 6, 8, 12, 17)


def step_costs(r: Runner, reps: int = 7) -> dict[int, float]:
    """Median seconds of one step over S tokens after a 200-token prompt, the cache rolled back each time."""
    prompt = np.random.default_rng(0).integers(100, 20000, 200)[None]
    r._ensure_cache(1, 256)
    r.prefill(prompt, np.ones_like(prompt))
    L = r.cache.length
    out = {}
    for S in WIDTHS:
        ts = []
        for rep in range(reps):
            r.cache.lengths[:] = L
            ids = np.random.default_rng(rep).integers(100, 20000, S)[None]
            t = time.perf_counter()
            r.step(ids, np.ones((1, L + S), dtype=np.int64), np.arange(L, L + S)[None], keep=S)
            ts.append(time.perf_counter() - t)
        out[S] = statistics.median(ts[1:])
    return out


def cost_of(costs: dict[int, float], S: int) -> float:
    ks = sorted(costs)
    if S in costs:
        return costs[S]
    hi = next((k for k in ks if k > S), None)
    lo = max(k for k in ks if k < S)
    if hi is None:  # past the table: the last slope
        a, b = ks[-2], ks[-1]
        return costs[b] + (costs[b] - costs[a]) / (b - a) * (S - b)
    return costs[lo] + (costs[hi] - costs[lo]) * (S - lo) / (hi - lo)


def _accepted(d, truth, i) -> int:
    """How many of the draft d's first tokens equal truth[i:]."""
    a = 0
    while a < len(d) and i + a < len(truth) and d[a] == truth[i + a]:
        a += 1
    return a


def replay(prompt: list[int], truth: list[int], draft, costs) -> float:
    """Seconds to produce truth[1:] (truth[0] comes from the prefill) with `draft(seq, left) -> tokens` drafts."""
    seq, i, s = list(prompt) + [truth[0]], 1, 0.0
    while i < len(truth):
        d = draft(seq, truth, i)
        a = _accepted(d, truth, i)
        s += cost_of(costs, 1 + len(d))
        n = min(a + 1, len(truth) - i)
        seq += truth[i:i + n]
        i += n
    return s


def ours(k: int):
    p = PromptLookup(k)

    def draft(seq, truth, i):
        d = p.propose(seq, len(truth) - i, None, None).tokens
        p.accepted(len(seq), len(d), _accepted(d, truth, i))
        return d
    return draft


def oracle_length(k: int):
    """Our policy's match (the latest place of the longest n-gram), drafted exactly as far as it will be accepted
    and not at all when nothing would be: what a perfect choice of when and how much to draft alone would gain."""
    def draft(seq, truth, i):
        d = PromptLookup(k).propose(seq, len(truth) - i, None, None).tokens
        return d[:_accepted(d, truth, i)]
    return draft


def _continuations(seq, n: int, ngrams=(3, 4)) -> list[list[int]]:
    """The up to n tokens that follow every earlier place where seq's last g tokens occur, g in ngrams."""
    a, out = np.asarray(seq), []
    for g in ngrams:
        if len(a) > g:
            win = np.lib.stride_tricks.sliding_window_view(a[:len(a) - 1], g)
            out += [a[h + g:h + g + n].tolist() for h in np.flatnonzero((win == a[len(a) - g:]).all(axis=1))]
    return out


def oracle_match(k: int):
    """Our policy's draft length, taken from the best of all matching places: what a perfect choice of match
    alone would gain (verifying several matches at once, a tree, could at best reach this)."""
    p = PromptLookup(k)

    def draft(seq, truth, i):
        d = p.propose(seq, len(truth) - i, None, None).tokens
        p.accepted(len(seq), len(d), _accepted(d, truth, i))
        return max(_continuations(seq, len(d)), key=lambda c: _accepted(c, truth, i)) if d else d
    return draft


def oracle(k: int):
    def draft(seq, truth, i):
        best = max((_accepted(c, truth, i) for c in _continuations(seq, k)), default=0)
        return truth[i:i + best]
    return draft


@click.command()
@click.option("--model", "folder", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--tokens", default=128, show_default=True)
@click.option("--lookup", default=16, show_default=True)
@click.option("--threads", default=2, show_default=True)
def main(folder, tokens, lookup, threads):
    from peers import cpu_model
    from speculative import prompts

    load0 = os.getloadavg()[0]
    r = Runner(folder, SessionSettings(threads=threads))
    if r.folder.tokenizer is None:
        raise click.ClickException("the prompts are text: --model needs an export with a tokenizer")
    costs = step_costs(r)
    rows = []
    for text in prompts()["code edit"]:
        ids = r.encode_prompt(text, chat=True)
        truth = [t for (t,) in r.generate([ids], r.default_config(max_new_tokens=tokens)) if t is not None]
        plain = (len(truth) - 1) * costs[1]
        rows.append((plain, *(replay(ids, truth, f(lookup), costs)
                              for f in (ours, oracle_length, oracle_match, oracle))))
    print(f"\n{cpu_model()}, {os.cpu_count()} cores, {threads} threads, load average {load0:.2f} at the start; "
          f"{Path(folder).name}; step cost over S tokens (ms, median): "
          + ", ".join(f"S={s} {c * 1e3:.1f}" for s, c in costs.items()) + "\n")
    print("| prompt | our lookup | our match, exact length | best match, our length | oracle lookup |\n"
          "|---|---|---|---|---|")
    for n, (p, *t) in enumerate(rows, 1):
        print(f"| code edit {n} | " + " | ".join(f"{p / x:.2f}x" for x in t) + " |")
    P, *T = (sum(x[i] for x in rows) for i in range(5))
    print(f"| all ({len(rows)}) | " + " | ".join(f"**{P / x:.2f}x**" for x in T) + " |")


if __name__ == "__main__":
    main()
