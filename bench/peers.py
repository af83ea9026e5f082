"""The race: our runner (int4, fp32) against llama.cpp, optimum + ORT, onnxruntime-genai and PyTorch eager on the
real Qwen2.5-Coder-0.5B-Instruct, 2 threads, greedy, batch 1. A benchmark: prints one table, asserts nothing.

    python bench/peers.py --ours int4=exports/qwen2-0.5b-int4 --ours fp32=exports/qwen2-0.5b-fp32 \
        [--genai-python /tmp/genai-b/bin/python] [--skip optimum] [--runs 3] [--no-ppl] [--json-out race.json]

Each run of each peer is its own process (so peak RSS is that peer's alone); the peers take turns, one run each
per round, `--runs` rounds, and the table shows medians (peak RSS: the largest). Round-robin because decode with
2 spinning threads on 2 cores slows down several-fold when anything else runs on the machine: a round's peers
meet the same conditions, and the load average during the runs is printed with the table.
prefill tok/s = 512-token prompt to the first new token (TTFT), decode tok/s = the 127 tokens after the first of a
128-token greedy run from a 16-token prompt. Token ids are fixed pseudo-random ids (runtime.bench.bench_prompt),
the same for every peer. Memory read bandwidth is measured in the same run (numpy, 2 threads) before the first round
and after every round, and turned into the fp32 decode bound: bandwidth / bytes of weights read per token; each fp32
round is also set against the bound read beside it (the VM's reading drifts 15-20% between runs).

Quality column: every peer's perplexity on the same held-out text, the first 1000 tokens of CPython 3.11's
`Lib/heapq.py` (export/evaluate.py: fixed_text) as the model's tokenizer splits them. The ids are computed once here
and handed to each peer in a JSON file; perplexity = exp(mean NLL of ids[1:] given the prefix), one pass, a prefill
in 256-token chunks through each peer's own cache (export/evaluate.py: perplexity; llama.cpp with logits_all,
onnxruntime-genai via Generator.append_tokens + get_output("logits"), which holds every prompt position's logits).
It is deterministic, so it is measured once per peer, in its own process (`ppl` subcommand), after the timed rounds:
it never runs beside a timed one. "vs fp32" is the change against PyTorch eager fp32's perplexity (that one is
measured even when eager is skipped from the race). `--runs 0`: perplexity only; `--no-ppl`: timing only.

Peers and what they need (`pip install -e ".[peers]"`, llama-cpp-python built from source, see README):
  llama.cpp        llama-cpp-python 0.3.36 on the GGUF itself (Q4_K_M)
  optimum fp32     optimum-onnx's own export of the dequantized weights (HF folder written here), ORTModelForCausalLM
  genai int4       onnxruntime-genai 0.18.0's builder (needs transformers 5.x: its own venv, --genai-python);
                   its int4 is MatMulNBits in blocks of 32, lm_head included
  PyTorch eager    the reference (qwen2_ref) on the dequantized weights
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen2_ref.memory import peak_rss_mib  # noqa: E402
from runtime.bench import bench_prompt  # noqa: E402

THREADS = 2
PROMPT, NEW = 512, 128
PPL_TOKENS = 1000  # perplexity: the first PPL_TOKENS tokens of heapq.py
PPL_COLUMN = f"perplexity (heapq.py, {PPL_TOKENS} tok)"
WORK = Path(os.environ.get("QWEN2_PEERS_DIR", Path.home() / ".cache" / "qwen2-export" / "peers"))


def dir_mib(p: Path) -> float:
    p = Path(p)
    return (p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) / 2**20


def summary(prefill: list[float], ttft: list[float], decode: list[float], size_mib: float) -> dict:
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "ttft_s": statistics.median(ttft), "peak_rss_mib": peak_rss_mib(), "size_mib": size_mib}


def timed_stream(first_call, next_calls) -> tuple[float, float]:
    """(TTFT s, decode tok/s): `first_call()` runs the prompt and returns the first token; `next_calls` yields the
    remaining NEW - 1 tokens."""
    t0 = time.perf_counter()
    first_call()
    t1 = time.perf_counter()
    n = sum(1 for _ in next_calls())
    t2 = time.perf_counter()
    assert n == NEW - 1, n
    return t1 - t0, n / (t2 - t1)


def cpu_model() -> str:
    """The CPU's model name, as lscpu shows it (/proc/cpuinfo "model name")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


# ---- memory bandwidth --------------------------------------------------------------------------------------------------
def bandwidth_gbs(threads: int = THREADS, mib: int = 1024, reps: int = 5) -> float:
    """Read bandwidth: `threads` numpy reductions over disjoint halves of a buffer far larger than the caches."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(reps):
            t0 = time.perf_counter()
            list(ex.map(np.add.reduce, parts))  # numpy releases the GIL inside the reduction
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


# ---- peers, each in its own process -----------------------------------------------------------------------------------
def peer_ours(model: str, runs: int) -> dict:
    from runtime.bench import run_bench
    from runtime.session import SessionSettings

    r = run_bench(model, SessionSettings(threads=THREADS), PROMPT, NEW, runs)
    return {"prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s, "ttft_s": r.ttft_s,
            "peak_rss_mib": r.peak_rss_mib, "size_mib": r.size_mib}


def peer_llama_cpp(gguf: str, runs: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=PROMPT + NEW + 16, n_batch=PROMPT, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)
    long, short = bench_prompt(PROMPT, 151936), bench_prompt(PROMPT, 151936)[:16]
    pre, ttft, dec = [], [], []
    for _ in range(runs):
        llm.reset()  # else generate() reuses the cached prefix of the previous run
        g = llm.generate(long, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        t0 = time.perf_counter()
        next(g)
        ttft.append(time.perf_counter() - t0)
        g.close()
        pre.append(PROMPT / ttft[-1])
        llm.reset()
        g = llm.generate(short, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        dec.append(timed_stream(lambda: next(g), lambda: (next(g) for _ in range(NEW - 1)))[1])
        g.close()
    return summary(pre, ttft, dec, dir_mib(Path(gguf)))


def hf_folder(gguf: str) -> Path:
    """The GGUF's dequantized weights as a Hugging Face folder (what optimum's and genai's builders read)."""
    out = WORK / "hf-0.5b"
    if (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_file

    from qwen2_ref.checkpoint import open_checkpoint

    ck = open_checkpoint(gguf)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({n: ck.source.get(n).float().contiguous() for n in ck.source.names()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    hf = ck.config.to_hf_config() | {"architectures": ["Qwen2ForCausalLM"], "torch_dtype": "float32"}
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                                            "do_sample": False}))
    ck.tokenizer().save(tmp)
    tmp.rename(out)
    return out


def optimum_export(gguf: str) -> Path:
    out = WORK / "optimum-fp32"
    if not (out / "model.onnx").exists():
        src = hf_folder(gguf)
        subprocess.run([sys.executable, "-m", "optimum.exporters.onnx", "--model", str(src), "--task",
                        "text-generation-with-past", str(out)], check=True)
    return out


def peer_optimum(gguf: str, runs: int) -> dict:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    path = optimum_export(gguf)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    model = ORTModelForCausalLM.from_pretrained(path, session_options=so, provider="CPUExecutionProvider")

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(ids: list[int], n: int) -> list[float]:
        clock = Clock()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       streamer=clock, pad_token_id=0)
        return [t0] + clock.times[1:]  # put() #0 is the prompt itself

    long = bench_prompt(PROMPT, 151936)
    pre, ttft, dec = [], [], []
    for _ in range(runs):
        t = run(long, 1)
        ttft.append(t[1] - t[0])
        pre.append(PROMPT / ttft[-1])
        t = run(long[:16], NEW)
        dec.append((NEW - 1) / (t[-1] - t[1]))
    return summary(pre, ttft, dec, dir_mib(path))


def genai_build(gguf: str, python: str) -> Path:
    out = WORK / "genai-int4"
    if not (out / "genai_config.json").exists():
        src = hf_folder(gguf)
        subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(WORK / "genai-cache")],
                       check=True)
    cfg = json.loads((out / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
    cfg["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def peer_genai(model: str, runs: int) -> dict:
    import onnxruntime_genai as og

    m = og.Model(model)
    long = bench_prompt(PROMPT, 151936)

    def generator(ids):
        p = og.GeneratorParams(m)
        p.set_search_options(max_length=len(ids) + NEW, do_sample=False)
        g = og.Generator(m, p)
        return g, ids

    def first(g, ids):
        g.append_tokens(ids)
        g.generate_next_token()

    pre, ttft, dec = [], [], []
    for _ in range(runs):
        g, ids = generator(long)
        t0 = time.perf_counter()
        first(g, ids)
        ttft.append(time.perf_counter() - t0)
        pre.append(PROMPT / ttft[-1])
        g, ids = generator(long[:16])
        dec.append(timed_stream(lambda: first(g, ids), lambda: (g.generate_next_token() for _ in range(NEW - 1)))[1])
    return summary(pre, ttft, dec, dir_mib(Path(model)))


def peer_eager(gguf: str, runs: int) -> dict:
    import torch

    from qwen2_ref.checkpoint import open_checkpoint

    torch.set_num_threads(THREADS)
    model = open_checkpoint(gguf).load_model(progress=False)
    long = bench_prompt(PROMPT, 151936)

    @torch.no_grad()
    def first(ids):
        logits, past = model(torch.tensor([ids]), logits_to_keep=1)
        return int(logits[0, -1].argmax()), past, len(ids)

    @torch.no_grad()
    def rest(state):
        tok, past, n = state
        for _ in range(NEW - 1):
            logits, past = model(torch.tensor([[tok]]), position_ids=torch.tensor([[n]]), past=past, logits_to_keep=1)
            tok, n = int(logits[0, -1].argmax()), n + 1
            yield tok

    pre, ttft, dec = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        first(long)
        ttft.append(time.perf_counter() - t0)
        pre.append(PROMPT / ttft[-1])
        state = []
        dec.append(timed_stream(lambda: state.append(first(long[:16])), lambda: rest(state[0]))[1])
    return summary(pre, ttft, dec, dir_mib(Path(gguf)))


PEERS = {"ours": peer_ours, "llama_cpp": peer_llama_cpp, "optimum": peer_optimum, "genai": peer_genai,
         "eager": peer_eager}


# ---- perplexity, each peer in its own process -------------------------------------------------------------------------
# Each peer's model as a step function (export/gate.py: ids, mask, pos of the new tokens -> their logits, cache kept
# inside), run through export.evaluate.perplexity: 256-token chunks, log-softmax 128 rows at a time.
def ppl_ours(model: str, ids: list[int]) -> float:
    from export.evaluate import perplexity
    from export.onnx.verify import onnx_step, session

    return perplexity(onnx_step(session(Path(model), threads=THREADS)), ids)


def ppl_llama_cpp(gguf: str, ids: list[int]) -> float:
    from llama_cpp import Llama

    from export.evaluate import perplexity

    # logits_all: every position's logits land in llm.scores (n_ctx, vocab), else only the last row is kept
    llm = Llama(model_path=gguf, n_ctx=len(ids), n_batch=256, n_threads=THREADS, n_threads_batch=THREADS,
                logits_all=True, verbose=False)

    def step(x: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        n0 = llm.n_tokens
        assert n0 == int(pos[0, 0]), (n0, pos)
        llm.eval(x[0].tolist())
        return np.array(llm.scores[n0:llm.n_tokens][None], dtype=np.float32)

    return perplexity(step, ids)


def ppl_optimum(gguf: str, ids: list[int]) -> float:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from export.evaluate import perplexity

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    model = ORTModelForCausalLM.from_pretrained(optimum_export(gguf), session_options=so,
                                                provider="CPUExecutionProvider")
    past = [None]

    @torch.no_grad()
    def step(x: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        out = model(input_ids=torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), past_key_values=past[0], use_cache=True)
        past[0] = out.past_key_values
        return out.logits.float().numpy()

    return perplexity(step, ids)


def ppl_genai(model: str, ids: list[int]) -> float:
    import onnxruntime_genai as og

    from export.evaluate import perplexity

    m = og.Model(model)
    p = og.GeneratorParams(m)
    p.set_search_options(max_length=len(ids) + 1, do_sample=False)
    g = og.Generator(m, p)

    def step(x: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        g.append_tokens(x[0].tolist())
        logits = g.get_output("logits")  # the graph's raw output: (1, appended tokens, vocab) during a prompt
        assert logits.shape[1] == x.shape[1], (logits.shape, x.shape)
        return np.asarray(logits, dtype=np.float32)

    return perplexity(step, ids)


def ppl_eager(gguf: str, ids: list[int]) -> float:
    import torch

    from export.evaluate import perplexity
    from export.gate import reference_step
    from qwen2_ref.checkpoint import open_checkpoint

    torch.set_num_threads(THREADS)
    return perplexity(reference_step(open_checkpoint(gguf).load_model(progress=False)), ids)


PPLS = {"ours": ppl_ours, "llama_cpp": ppl_llama_cpp, "optimum": ppl_optimum, "genai": ppl_genai, "eager": ppl_eager}


def run_ppl(peer: str, target: str, python: str, ids_file: str) -> dict | str:
    """One peer's perplexity in its own process: its JSON line, or why it failed."""
    r = subprocess.run([python, str(Path(__file__).resolve()), "ppl", peer, target, "--ids", ids_file],
                       capture_output=True, text=True, env=os.environ | {"QWEN2_QUIET": "1"})
    if r.returncode:
        return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@click.group(invoke_without_command=True)
@click.option("--ours", "ours", multiple=True, help="LABEL=EXPORT_DIR of our runner (repeatable).")
@click.option("--gguf", default=None, help="The GGUF (default: the real 0.5B from the cache).")
@click.option("--genai-python", default="/tmp/genai-b/bin/python", show_default=True,
              help="Python of a venv with onnxruntime-genai 0.18.0 + transformers 5.x.")
@click.option("--skip", multiple=True, type=click.Choice(["llama_cpp", "optimum", "genai", "eager"]))
@click.option("--runs", default=3, show_default=True, help="Timed rounds (0: perplexity only).")
@click.option("--ppl/--no-ppl", default=True, show_default=True,
              help=f"Measure each peer's perplexity ({PPL_TOKENS} tokens of heapq.py) once, after the rounds.")
@click.option("--json-out", default=None, help="Also write the rows as JSON here.")
@click.pass_context
def main(ctx, ours, gguf, genai_python, skip, runs, ppl, json_out):
    if ctx.invoked_subcommand:
        return
    from qwen2_ref.checkpoint import open_checkpoint
    from qwen2_ref.hub import fetch_real_model

    from export import precision, sizing
    from export.evaluate import fixed_text

    gguf = gguf or str(fetch_real_model())
    ck = open_checkpoint(gguf)
    jobs = [(f"ours {label}", "ours", path, sys.executable)  # our exports first, in the order given
            for label, _, path in (spec.partition("=") for spec in ours)]
    if "llama_cpp" not in skip:
        jobs.append(("llama.cpp Q4_K_M", "llama_cpp", gguf, sys.executable))
    if "optimum" not in skip:
        optimum_export(gguf)  # built once, outside the timed runs
        jobs.append(("optimum + ORT fp32", "optimum", gguf, sys.executable))
    if "genai" not in skip:
        try:
            jobs.append(("onnxruntime-genai int4", "genai", str(genai_build(gguf, genai_python)), genai_python))
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"onnxruntime-genai: builder failed ({e})", file=sys.stderr)
    if "eager" not in skip:
        jobs.append(("PyTorch eager fp32 (qwen2_ref)", "eager", gguf, sys.executable))
    results: dict[str, list[dict]] = {label: [] for label, *_ in jobs}
    loads: list[float] = []
    bws = [bandwidth_gbs()]
    # Round-robin: every peer once per round, so each round's peers meet the same machine (others' load drifts).
    for rnd in range(runs):
        for label, peer, target, python in jobs:
            loads.append(os.getloadavg()[0])
            r = subprocess.run([python, str(Path(__file__).resolve()), "one", peer, target, "--runs", "1"],
                               capture_output=True, text=True, env=os.environ | {"QWEN2_QUIET": "1"})
            if r.returncode:
                err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else str(r.returncode)
                print(f"{label}: failed ({err})", file=sys.stderr)
                continue
            results[label].append(json.loads(r.stdout.strip().splitlines()[-1]) | {"round": rnd})
            print(f"round {rnd + 1} {label}: {results[label][-1]} (load {loads[-1]:.1f})", file=sys.stderr)
        bws.append(bandwidth_gbs())

    # Perplexity: once per peer, each in its own process, after (never beside) the timed runs; same ids for all.
    ppls: dict[str, dict] = {}
    fp32_ppl = None
    ids: list[int] = []
    if ppl:
        ids = ck.tokenizer().encode(fixed_text())[:PPL_TOKENS]
        ppl_jobs = [(label, peer, target, python) for label, peer, target, python in jobs]
        if "eager" in skip:  # the fp32 reference is measured anyway, for the "vs fp32" column
            ppl_jobs.append(("PyTorch eager fp32 (qwen2_ref, not raced)", "eager", gguf, sys.executable))
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="peers-ppl-ids-", delete=False) as f:
            json.dump(ids, f)
        try:
            for label, peer, target, python in ppl_jobs:
                got = run_ppl(peer, target, python, f.name)
                if isinstance(got, str):
                    print(f"{label}: perplexity failed ({got})", file=sys.stderr)
                    continue
                ppls[label] = got
                if peer == "eager":
                    fp32_ppl = got["perplexity"]
                print(f"perplexity {label}: {got['perplexity']:.4f} ({got['ppl_s']:.0f} s)", file=sys.stderr)
        finally:
            os.unlink(f.name)

    cfg = ck.config
    read = sizing.weight_bytes(cfg, precision.get("onnx", "fp32"))[1]
    bound = max(bws) * 1e9 / read  # the best the machine delivered: other load only lowers a reading
    load_txt = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a (no timed runs)"
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} CPUs, {THREADS} threads; read bandwidth best "
          f"{max(bws):.1f} GB/s (numpy, {THREADS} threads, readings {', '.join(f'{b:.1f}' for b in bws)}); fp32 "
          f"weights read per token {read / 1e6:.0f} MB -> fp32 decode bound {bound:.1f} tok/s; 1-min load average "
          f"during the runs {load_txt}")
    for label, got in results.items():  # each round against the bandwidth read just before and after it
        if "fp32" in label and got:
            shares = [g["decode_tok_s"] / (max(bws[g["round"]], bws[g["round"] + 1]) * 1e9 / read) for g in got]
            print(f"{label}: decode against its own round's bound (the better reading beside it): "
                  f"{', '.join(f'{x:.0%}' for x in shares)} (median {statistics.median(shares):.0%})")
    if ppl:
        ref = f"{fp32_ppl:.4f} (PyTorch eager)" if fp32_ppl is not None else "unavailable"
        print(f"perplexity: first {len(ids)} tokens of CPython's Lib/heapq.py, the same ids for every peer; "
              f"fp32 reference {ref}")
    print()
    print(f"| peer | prefill tok/s ({PROMPT}) | decode tok/s ({NEW}) | decode, best round | TTFT s | peak RSS MiB "
          f"| size on disk MiB | {PPL_COLUMN} | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for label in [label for label, *_ in jobs] + [label for label in ppls if label not in results]:
        got = results.get(label, [])
        row: dict = {"peer": label, "runs": len(got)}
        if got:
            row |= {k: statistics.median(g[k] for g in got) for k in
                    ("prefill_tok_s", "decode_tok_s", "ttft_s", "size_mib")}
            row["peak_rss_mib"] = max(g["peak_rss_mib"] for g in got)
            row["decode_all"] = [round(g["decode_tok_s"], 1) for g in got]
            timing = (f"{row['prefill_tok_s']:.1f} | {row['decode_tok_s']:.1f} | {max(row['decode_all']):.1f} | "
                      f"{row['ttft_s']:.3f} | {row['peak_rss_mib']:.0f} | {row['size_mib']:.0f}")
        else:
            timing = ("failed" if runs and label in results else "-") + " | | | | |"
        quality = " | " if not ppl else "failed | "
        if label in ppls:
            row["perplexity"] = ppls[label]["perplexity"]
            row["ppl_s"] = ppls[label]["ppl_s"]
            row["ppl_peak_rss_mib"] = ppls[label]["peak_rss_mib"]
            quality = f"{row['perplexity']:.4f} | "
            if fp32_ppl is not None:
                row["ppl_vs_fp32"] = row["perplexity"] / fp32_ppl - 1
                quality += f"{row['ppl_vs_fp32'] * 100:+.2f}%"
        rows.append(row)
        print(f"| {label} | {timing} | {quality} |")
    if json_out:
        Path(json_out).write_text(json.dumps({"cpu_model": cpu_model(), "bandwidth_gbs": bws,
                                              "fp32_bound_tok_s": bound, "loads": loads,
                                              "ppl_text": f"first {len(ids)} tokens of CPython Lib/heapq.py",
                                              "ppl_tokens": len(ids), "fp32_perplexity": fp32_ppl,
                                              "rows": rows, "raw": results}, indent=2))


@main.command()
@click.argument("peer", type=click.Choice(list(PEERS)))
@click.argument("target")
@click.option("--runs", default=3)
def one(peer, target, runs):
    """Run one peer in this process and print its figures as one JSON line."""
    print(json.dumps(PEERS[peer](target, runs)))


@main.command("ppl")
@click.argument("peer", type=click.Choice(list(PPLS)))
@click.argument("target")
@click.option("--ids", "ids_file", required=True, help="JSON list of the token ids to score.")
def ppl_cmd(peer, target, ids_file):
    """One peer's perplexity on the given ids, in this process, as one JSON line."""
    ids = [int(i) for i in json.loads(Path(ids_file).read_text())]
    t0 = time.perf_counter()
    value = PPLS[peer](target, ids)
    print(json.dumps({"perplexity": value, "tokens": len(ids), "ppl_s": time.perf_counter() - t0,
                      "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
