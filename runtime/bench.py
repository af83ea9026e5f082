"""`python -m runtime bench`: prefill speed on a 512-token prompt, decode speed over 128 tokens, time to first
token and peak RSS, medians over runs, printed as `key: value` lines (or one JSON object) that scripts parse."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from qwen2_ref.memory import peak_rss_mib
from qwen2_ref.progress import format_duration, status

from .runner import GenerationConfig, Runner
from .session import SessionSettings

FIELDS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mib")


@dataclass
class BenchResult:
    model: str
    dtype: str
    providers: list[str]
    threads: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    peak_rss_mib: float
    size_mib: float

    def text(self) -> str:
        """`key: value` lines; floats below 1 to 4 significant digits (a tiny model's time to first token is well
        under a millisecond, which 3 decimals printed as 0.0), others to 2 decimals."""
        def fmt(v):
            return v if not isinstance(v, float) else f"{v:.4g}" if abs(v) < 1 else round(v, 2)

        return "\n".join(f"{k}: {fmt(v)}" for k, v in asdict(self).items())


def bench_prompt(n: int, vocab: int) -> list[int]:
    """n fixed pseudo-random token ids (no tokenizer needed, so random-weight exports bench too)."""
    return np.random.default_rng(0).integers(100, min(vocab, 150000), n).tolist()


def run_bench(model: str, settings: SessionSettings, prompt_tokens: int = 512, new_tokens: int = 128,
              runs: int = 3) -> BenchResult:
    """Progress goes to stderr (one line per phase and per run, with its figures and an ETA); the result is
    returned for stdout. There is no separate warm-up: run 1 carries the first-run costs and the medians absorb it."""
    threads = {0: "ONNX Runtime's default threads", 1: "1 thread"}.get(settings.threads, f"{settings.threads} threads")
    status(f"bench: loading {model} ({threads}) ...")
    t0 = time.perf_counter()
    r = Runner(model, settings)
    load_s = time.perf_counter() - t0
    status(f"bench: loaded in {load_s:.1f} s on {', '.join(r.session.active)}; {runs} run{'s' if runs > 1 else ''} "
           f"follow, each: prefill {prompt_tokens} tokens, decode {new_tokens} tokens")
    long = bench_prompt(prompt_tokens, r.vocab)
    short = long[:16]
    no_stop = GenerationConfig(max_new_tokens=1, stop_token_ids=())
    decode_cfg = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
    prefill, ttft, decode = [], [], []
    t_runs = time.perf_counter()
    for i in range(1, runs + 1):
        for _ in r.generate([long], no_stop):  # prompt in, first token out
            pass
        prefill.append(r.stats.prefill_tok_s)
        ttft.append(r.stats.prefill_s)
        for _ in r.generate([short], decode_cfg):
            pass
        decode.append(r.stats.decode_tok_s)
        el = time.perf_counter() - t_runs
        status(f"bench: run {i}/{runs}{' (includes first-run costs)' if i == 1 and runs > 1 else ''}: prefill "
               f"{prefill[-1]:.1f} tok/s (TTFT {ttft[-1]:.3f} s), decode {decode[-1]:.1f} tok/s; "
               f"{format_duration(el)} elapsed, ETA {format_duration(el / i * (runs - i))}")
    return BenchResult(model=str(model), dtype=r.folder.dtype, providers=list(r.session.active),
                       threads=settings.threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
                       load_s=load_s, prefill_tok_s=statistics.median(prefill),
                       decode_tok_s=statistics.median(decode), ttft_s=statistics.median(ttft),
                       peak_rss_mib=peak_rss_mib(), size_mib=r.folder.size_on_disk() / 2**20)


def print_result(res: BenchResult, as_json: bool) -> None:
    print(json.dumps(asdict(res)) if as_json else res.text(), flush=True)
