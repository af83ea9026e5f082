"""Serving under concurrency, ours against llama.cpp's OpenAI-compatible server, on loopback: aggregate decode
tokens/s and p50/p99 time to first token and inter-token latency at 1, 4 and 16 concurrent streams. Both servers
run at once (each on its own port, each told to use the machine's cores); the levels alternate between them, so
background load hits both alike. A benchmark: prints a table, asserts nothing; bounded in requests and time.

    python bench/serve.py --model exports/qwen2-0.5b-int4-seqlens --gguf ~/.cache/qwen2-export/...gguf \
        [--levels 1,4,16] [--tokens 64] [--rounds 2]

Ours: `python -m runtime serve --max-batch 16`. llama.cpp: `python -m llama_cpp.server` (llama-cpp-python[server]
0.3.36, built from source, see README) on the same GGUF; it has no parallel slots (it answers one request at a time;
the C++ `llama-server`, which batches, is not pip-installable); left out when it is not installed.
Every request is a streamed completion of a fixed code prompt at temperature 0 with `max_tokens` tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import httpx

PROMPTS = ["def quicksort(items):\n", "class LinkedList:\n    def __init__(self):\n",
           "import json\n\ndef load(path):\n", "# merge two sorted lists\ndef merge(a, b):\n"]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise click.ClickException(f"{cmd[2]} exited: see {log}")
        time.sleep(0.5)
    proc.kill()
    raise click.ClickException(f"{cmd[2]} did not start in 5 minutes: see {log}")


def one(base: str, model: str, prompt: str, tokens: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between tokens, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    stamps = []
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    if not stamps:
        return float("nan"), [], 0
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)


def level(base: str, model: str, streams: int, tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        got = list(pool.map(lambda i: one(base, model, PROMPTS[i % len(PROMPTS)], tokens), range(streams)))
    wall = time.perf_counter() - t0
    ttft = sorted(g[0] for g in got)
    gaps = sorted(x for g in got for x in g[1])

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    return {"tok_s": sum(g[2] for g in got) / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99)}


@click.command()
@click.option("--model", "folder", required=True, type=click.Path(exists=True, file_okay=False),
              help="A --attention seqlens export.")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False), default=None, help="llama.cpp's model.")
@click.option("--levels", default="1,4,16", show_default=True)
@click.option("--tokens", default=64, show_default=True, help="max_tokens of every request")
@click.option("--rounds", default=2, show_default=True, help="each level this many times per server; medians")
@click.option("--threads", default=os.cpu_count() or 1, show_default=True)
def main(folder, gguf, levels, tokens, rounds, threads):
    levels = [int(x) for x in levels.split(",")]
    most = max(levels)
    logs = Path(folder).parent
    servers = {"ours": ("http://127.0.0.1:8411", Path(folder).resolve().name,
                        [sys.executable, "-m", "runtime", "serve", "--model", folder, "--port", "8411",
                         "--max-batch", str(most), "--threads", str(threads), "--context", str(1024)])}
    try:
        import llama_cpp.server  # noqa: F401

        if gguf:
            servers["llama.cpp"] = ("http://127.0.0.1:8412", "llama", [
                sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "llama", "--port", "8412",
                "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "1024"])
    except ImportError:
        click.echo("llama-cpp-python[server] is not installed: ours only", err=True)
    procs = {}
    try:
        for name, (base, _, cmd) in servers.items():
            click.echo(f"starting {name} ...", err=True)
            procs[name] = start(cmd, int(base.rsplit(":", 1)[1]), logs / f"serve-bench-{name}.log")
        for name, (base, model, _) in servers.items():  # warm up
            one(base, model, PROMPTS[0], 8)
        res: dict = {}
        load0 = os.getloadavg()[0]
        for r in range(rounds):
            for n in levels:
                for name, (base, model, _) in servers.items():
                    out = level(base, model, n, tokens)
                    res.setdefault((name, n), []).append(out)
                    click.echo(f"round {r + 1}/{rounds} {name} x{n}: {out['tok_s']:.1f} tok/s", err=True)
    finally:
        for p in procs.values():
            p.terminate()
    from peers import cpu_model  # bench/ is the script's folder, first on sys.path

    cpu = cpu_model()
    print(f"\n{cpu}, {os.cpu_count()} cores, load average {load0:.2f} at the start; {tokens} tokens per request, "
          f"median of {rounds} rounds\n")
    print("| server | streams | aggregate tok/s | TTFT p50 s | TTFT p99 s | inter-token p50 ms | inter-token p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for (name, n), runs in res.items():
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(f"| {name} | {n} | {med['tok_s']:.1f} | {med['ttft_p50']:.2f} | {med['ttft_p99']:.2f} | "
              f"{1000 * med['itl_p50']:.0f} | {1000 * med['itl_p99']:.0f} |")


if __name__ == "__main__":
    main()
