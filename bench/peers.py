"""The race: our runner (int4, fp32) against llama.cpp, optimum + ORT, onnxruntime-genai and PyTorch eager on the
real Qwen2.5-Coder-0.5B-Instruct, 2 threads, greedy, batch 1. A benchmark: prints one table, asserts nothing.

    python bench/peers.py --ours int4=exports/qwen2-0.5b-int4 --ours fp32=exports/qwen2-0.5b-fp32 \
        [--genai-python /tmp/genai-b/bin/python] [--skip optimum] [--runs 3]

Each run of each peer is its own process (so peak RSS is that peer's alone); the peers take turns, one run each
per round, `--runs` rounds, and the table shows medians (peak RSS: the largest). Round-robin because decode with
2 spinning threads on 2 cores slows down several-fold when anything else runs on the machine: a round's peers
meet the same conditions, and the load average during the runs is printed with the table.
prefill tok/s = 512-token prompt to the first new token (TTFT), decode tok/s = the 127 tokens after the first of a
128-token greedy run from a 16-token prompt. Token ids are fixed pseudo-random ids (runtime.bench.bench_prompt),
the same for every peer. Memory read bandwidth is measured in the same run (numpy, 2 threads) and turned into the
fp32 decode bound: bandwidth / bytes of weights read per token.

Peers and what they need (`pip install -e ".[peers]"`, llama-cpp-python built from source, see README):
  llama.cpp        llama-cpp-python 0.3.36 on the GGUF itself (Q4_K_M)
  optimum fp32     optimum-onnx's own export of the dequantized weights (HF folder written here), ORTModelForCausalLM
  genai int4       onnxruntime-genai 0.18.0's builder (needs transformers 5.x: its own venv, --genai-python)
  PyTorch eager    the reference (qwen2_ref) on the dequantized weights
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
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen2_ref.memory import peak_rss_mib  # noqa: E402
from runtime.bench import bench_prompt  # noqa: E402

THREADS = 2
PROMPT, NEW = 512, 128
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


@click.group(invoke_without_command=True)
@click.option("--ours", "ours", multiple=True, help="LABEL=EXPORT_DIR of our runner (repeatable).")
@click.option("--gguf", default=None, help="The GGUF (default: the real 0.5B from the cache).")
@click.option("--genai-python", default="/tmp/genai-b/bin/python", show_default=True,
              help="Python of a venv with onnxruntime-genai 0.18.0 + transformers 5.x.")
@click.option("--skip", multiple=True, type=click.Choice(["llama_cpp", "optimum", "genai", "eager"]))
@click.option("--runs", default=3, show_default=True)
@click.option("--json-out", default=None, help="Also write the rows as JSON here.")
@click.pass_context
def main(ctx, ours, gguf, genai_python, skip, runs, json_out):
    if ctx.invoked_subcommand:
        return
    from qwen2_ref.checkpoint import open_checkpoint
    from qwen2_ref.hub import fetch_real_model

    from export import precision, sizing

    gguf = gguf or str(fetch_real_model())
    jobs = [(f"ours {label}", "ours", path, sys.executable)
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
            results[label].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"round {rnd + 1} {label}: {results[label][-1]} (load {loads[-1]:.1f})", file=sys.stderr)
        bws.append(bandwidth_gbs())
    cfg = open_checkpoint(gguf).config
    read = sizing.weight_bytes(cfg, precision.get("onnx", "fp32"))[1]
    bound = max(bws) * 1e9 / read  # the best the machine delivered: other load only lowers a reading
    print(f"\nmachine: {os.cpu_count()} CPUs, {THREADS} threads; read bandwidth best {max(bws):.1f} GB/s "
          f"(numpy, {THREADS} threads, readings {', '.join(f'{b:.1f}' for b in bws)}); fp32 weights read per token "
          f"{read / 1e6:.0f} MB -> fp32 decode bound {bound:.1f} tok/s; 1-min load average during the runs "
          f"{min(loads):.1f}-{max(loads):.1f}\n")
    print(f"| peer | prefill tok/s ({PROMPT}) | decode tok/s ({NEW}) | decode, best round | TTFT s | peak RSS MiB "
          "| size on disk MiB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for label, got in results.items():
        if not got:
            print(f"| {label} | failed | | | | | |")
            continue
        row = {"peer": label, "runs": len(got)} | {k: statistics.median(g[k] for g in got) for k in
                                                  ("prefill_tok_s", "decode_tok_s", "ttft_s", "size_mib")}
        row["peak_rss_mib"] = max(g["peak_rss_mib"] for g in got)
        row["decode_all"] = [round(g["decode_tok_s"], 1) for g in got]
        rows.append(row)
        print(f"| {label} | {row['prefill_tok_s']:.1f} | {row['decode_tok_s']:.1f} | {max(row['decode_all']):.1f} | "
              f"{row['ttft_s']:.3f} | "
              f"{row['peak_rss_mib']:.0f} | {row['size_mib']:.0f} |")
    if json_out:
        Path(json_out).write_text(json.dumps({"bandwidth_gbs": bws, "fp32_bound_tok_s": bound, "loads": loads,
                                              "rows": rows, "raw": results}, indent=2))


@main.command()
@click.argument("peer", type=click.Choice(list(PEERS)))
@click.argument("target")
@click.option("--runs", default=3)
def one(peer, target, runs):
    """Run one peer in this process and print its figures as one JSON line."""
    print(json.dumps(PEERS[peer](target, runs)))


if __name__ == "__main__":
    main()
