"""A bounded soak of `python -m runtime serve`: several clients for a fixed time, mixing streamed and plain
completions and chats, clients that hang up mid-stream, and bad requests; then one table.

    python bench/soak.py --model exports/qwen2-0.5b-int4-seqlens [--minutes 5] [--clients 6] [--max-batch 4]

Checks, printed as PASS/FAIL lines (exit status 1 on a FAIL):
- every valid request that was not hung up on is answered 200 with a finish_reason (greedy ones are also compared
  with the text the same prompt gave alone before the soak, and the count printed: an int4 export's MatMulNBits runs
  one row with another kernel than several, so a greedy text can change at a near-tie with the batch's size);
- every bad request (malformed JSON, unknown model, a prompt past the context, max_tokens 0 or past the context,
  wrong types) is answered 400 with an OpenAI-style error body;
- the server's RSS stays within 10% of its level after the first minute (sampled every 2 s from /proc).
Loopback only; bounded by --minutes (each request also has a 120 s client timeout).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import click
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import PROMPTS, start  # noqa: E402

PORT = 8413


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, base: str, model: str, context: int, seed: int):
        self.base, self.model, self.context = base, model, context
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.greedy: dict[tuple[str, int], str] = {}
        self.rng = random.Random(seed)

    def note(self, kind: str, ok: bool, why: str = "") -> None:
        with self.lock:
            self.counts[(kind, ok)] += 1
            if not ok and len(self.failures) < 20:
                self.failures.append(f"{kind}: {why}")

    def same(self, equal: bool) -> None:
        with self.lock:
            self.counts[("greedy text as alone", equal)] += 1

    def reference(self) -> None:
        """Each fixed prompt's greedy text alone, before any load."""
        for p in PROMPTS:
            for n in (16, 48):
                r = httpx.post(f"{self.base}/v1/completions", timeout=120,
                               json={"model": self.model, "prompt": p, "max_tokens": n, "temperature": 0})
                r.raise_for_status()
                self.greedy[(p, n)] = r.json()["choices"][0]["text"]

    # ---- one request of each kind ------------------------------------------------------------------------------
    def greedy_stream(self, c: httpx.Client, rng: random.Random) -> None:
        p, n = rng.choice(PROMPTS), rng.choice((16, 48))
        text, finish = "", None
        with c.stream("POST", "/v1/completions", json={"model": self.model, "prompt": p, "max_tokens": n,
                                                       "temperature": 0, "stream": True}) as r:
            if r.status_code != 200:
                return self.note("greedy stream", False, f"HTTP {r.status_code}")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])["choices"][0]
                    text += ch.get("text") or ""
                    finish = ch.get("finish_reason") or finish
        self.same(text == self.greedy[(p, n)])
        self.note("greedy stream", finish is not None, f"finish {finish}")

    def greedy_plain(self, c: httpx.Client, rng: random.Random) -> None:
        p, n = rng.choice(PROMPTS), rng.choice((16, 48))
        r = c.post("/v1/completions", json={"model": self.model, "prompt": p, "max_tokens": n, "temperature": 0})
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] is not None
        if ok:
            self.same(r.json()["choices"][0]["text"] == self.greedy[(p, n)])
        self.note("greedy plain", ok, f"HTTP {r.status_code}")

    def sampled_chat(self, c: httpx.Client, rng: random.Random) -> None:
        r = c.post("/v1/chat/completions", json={
            "model": self.model, "max_tokens": rng.randint(4, 64), "temperature": 0.8, "top_p": 0.95,
            "seed": rng.randint(0, 1 << 30), "stream": rng.random() < 0.5,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS) + "Explain briefly."}]})
        ok = r.status_code == 200 and ("finish_reason" in r.text)
        self.note("sampled chat", ok, f"HTTP {r.status_code}")

    def hang_up(self, c: httpx.Client, rng: random.Random) -> None:
        """A streamed request the client abandons after a few tokens (the server must free its row)."""
        k = rng.randint(1, 8)
        with c.stream("POST", "/v1/completions", json={"model": self.model, "prompt": rng.choice(PROMPTS),
                                                       "max_tokens": 200, "temperature": 0.7, "stream": True}) as r:
            if r.status_code != 200:
                return self.note("hang up", False, f"HTTP {r.status_code}")
            for i, _ in enumerate(r.iter_lines()):
                if i >= 2 * k:
                    break
        self.note("hang up", True)

    def bad(self, c: httpx.Client, rng: random.Random) -> None:
        m = self.model
        kind, body = rng.choice([
            ("malformed JSON", b'{"model": "x", "prompt": '),
            ("unknown model", {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}),
            ("prompt past the context", {"model": m, "prompt": list(range(1, self.context + 10)), "max_tokens": 4}),
            ("max_tokens 0", {"model": m, "prompt": "hi", "max_tokens": 0}),
            ("max_tokens past the context", {"model": m, "prompt": "hi", "max_tokens": self.context + 1}),
            ("wrong type", {"model": m, "prompt": "hi", "max_tokens": "many"}),
            ("wrong type", {"model": m, "prompt": {"a": 1}}),
        ])
        if isinstance(body, bytes):
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/v1/completions", json=body)
        ok = r.status_code == 400 and "message" in r.json().get("error", {})
        self.note(f"bad: {kind}", ok, f"HTTP {r.status_code} {r.text[:80]}")

    def client(self, stop_at: float, seed: int) -> None:
        rng = random.Random(seed)
        kinds = [self.greedy_stream, self.greedy_plain, self.sampled_chat, self.hang_up, self.bad]
        weights = [3, 2, 2, 2, 2]
        with httpx.Client(base_url=self.base, timeout=120) as c:
            while time.monotonic() < stop_at:
                f = rng.choices(kinds, weights)[0]
                try:
                    f(c, rng)
                except httpx.HTTPError as e:
                    self.note(f.__name__.replace("_", " "), False, repr(e))


@click.command()
@click.option("--model", "folder", required=True, type=click.Path(exists=True, file_okay=False),
              help="A --attention seqlens export.")
@click.option("--minutes", type=click.FloatRange(0.1), default=5.0, show_default=True)
@click.option("--clients", type=click.IntRange(1), default=6, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=4, show_default=True)
@click.option("--context", type=click.IntRange(64), default=512, show_default=True)
@click.option("--threads", default=os.cpu_count() or 1, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(folder, minutes, clients, max_batch, context, threads, seed):
    model = Path(folder).resolve().name
    log = Path(folder).parent / "soak-server.log"
    proc = start([sys.executable, "-m", "runtime", "serve", "--model", folder, "--port", str(PORT), "--max-batch",
                  str(max_batch), "--threads", str(threads), "--context", str(context)], PORT, log)
    soak = Soak(f"http://127.0.0.1:{PORT}", model, context, seed)
    samples: list[tuple[float, float]] = []
    try:
        soak.reference()
        t0 = time.monotonic()
        stop_at = t0 + 60 * minutes
        workers = [threading.Thread(target=soak.client, args=(stop_at, seed + i)) for i in range(clients)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            samples.append((time.monotonic() - t0, rss_mib(proc.pid)))
            done = sum(soak.counts.values())
            click.echo(f"\r{samples[-1][0]:5.0f}/{60 * minutes:.0f} s  {done} requests  RSS {samples[-1][1]:.0f} MiB",
                       err=True, nl=False)
            time.sleep(2)
        click.echo("", err=True)
        alive = proc.poll() is None
        health: dict = {}
        for _ in range(20):  # hung-up streams end at the server's next step
            health = httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=10).json() if alive else {}
            if health.get("running") == 0 and health.get("waiting") == 0:
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
    from peers import cpu_model  # bench/ is the script's folder, first on sys.path

    cpu = cpu_model()
    print(f"\n{cpu}, {os.cpu_count()} cores; {clients} clients for {minutes:g} min, --max-batch {max_batch}, "
          f"load average {os.getloadavg()[0]:.2f} at the end\n")
    same = soak.counts.pop(("greedy text as alone", True), 0)
    total = same + soak.counts.pop(("greedy text as alone", False), 0)
    print("| request kind | answered as expected | not |")
    print("|---|---|---|")
    for kind in sorted({k for k, _ in soak.counts}):
        print(f"| {kind} | {soak.counts[(kind, True)]} | {soak.counts[(kind, False)]} |")
    print(f"\ngreedy texts equal to the prompt's text alone: {same} of {total}")
    after_1 = [m for t, m in samples if t >= 60] or [m for _, m in samples]
    base = after_1[0]
    rss_ok = max(after_1) <= 1.1 * base and min(after_1) >= 0.9 * base
    print(f"\nRSS: {samples[0][1]:.0f} MiB at the start, {base:.0f} after the first minute, "
          f"{min(after_1):.0f}-{max(after_1):.0f} after it, {samples[-1][1]:.0f} at the end "
          f"({100 * (max(after_1) / base - 1):+.1f}% at most)")
    failed = sum(n for (k, ok), n in soak.counts.items() if not ok)
    checks = [("every valid request answered as expected, every bad one 400", failed == 0),
              ("RSS within 10% of its level after the first minute", rss_ok),
              ("server alive and idle at the end", alive and health.get("running") == 0 and health.get("waiting") == 0)]
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    for f in soak.failures:
        print(f"  {f}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
