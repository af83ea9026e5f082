"""The GPU layout's figures in one table: for each export folder, prefill and decode tok/s, time to first token,
GPU memory, and parity against the fp32 PyTorch reference on fixed prompts, all on CUDA (the runner keeps the KV
cache, logits and greedy arg-max on the GPU). With `--device cpu` the same figures for the CPU twin (the same
graphs on ONNX Runtime's CPU provider). A benchmark: prints a table, asserts nothing. bench/gpu_check.sh runs it.

    python bench/gpu.py exports/qwen2-0.5b-int4-fp16act exports/qwen2-0.5b-fp16 [--device cuda|cpu]
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.evaluate import export_reports  # noqa: E402
from export.gate import compare, record, reference_step  # noqa: E402
from export.onnx import export_step, reference_model  # noqa: E402
from export.tolerances import GATE, GATE_ACTIVATIONS  # noqa: E402
from runtime.bench import run_bench  # noqa: E402
from runtime.session import SessionSettings, resolve_providers  # noqa: E402

# Fixed prompts for parity (code, as users generate): teacher-forced over DECODE_STEPS greedy steps of the reference.
PROMPTS = ["def fibonacci(n):\n", "import numpy as np\n\ndef normalize(x):\n",
           "class Stack:\n    def __init__(self):\n", "# Read a CSV file and print the sum of each column\n"]
DECODE_STEPS = 32


def gpu_memory_mib() -> float | None:
    """This process's GPU memory as nvidia-smi reports it (None without a GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = [float(m) for p, m in (ln.split(",") for ln in out.strip().splitlines() if "," in ln)
            if int(p) == os.getpid()]
    return sum(used) if used else None


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--prompt-tokens", default=512, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--runs", default=3, show_default=True)
def main(folders, device, prompt_tokens, new_tokens, runs):
    providers = resolve_providers(device)
    reports, ckpt = export_reports(folders)
    tok = ckpt.tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    run = record(reference_step(reference_model(ckpt)), prompts, DECODE_STEPS)  # once, shared by the folders
    rows = []
    for f in folders:
        rep = reports[f]
        plan = rep["plan"]
        tol = GATE_ACTIVATIONS[rep["activations"]] if rep["dtype"] == "int4" and rep["activations"] != "fp32" \
            else GATE[rep["dtype"]]
        step, backend = export_step(Path(f), providers, (rep["activations"], plan.get("attention", "bias")))
        p = compare(step, run, tol, backend)
        del step
        b = run_bench(f, SessionSettings(providers=providers), prompt_tokens, new_tokens, runs)
        if device == "cuda" and b.providers[0] != "CUDAExecutionProvider":
            raise click.ClickException(f"{f}: CUDA was asked for but the session runs on {b.providers}")
        mem = gpu_memory_mib()
        label = rep["dtype"] + (f" ({rep['activations']} act.)" if rep["activations"] != rep["dtype"] and
                                rep["dtype"] == "int4" and rep["activations"] != "fp32" else "")
        rows.append((label, plan.get("attention", "bias"), b, mem, p))
    where = platform.processor() or platform.machine()
    print(f"\n{', '.join(providers)}; {len(prompts)} prompts x ({DECODE_STEPS} + 1) teacher-forced steps against "
          f"the fp32 reference; prefill {prompt_tokens} tokens, decode {new_tokens}, batch 1, median of {runs} "
          f"({where})\n")
    print("| export | attention | prefill tok/s | TTFT s | decode tok/s | GPU memory MiB | max abs dlogits | "
          "top-1 agreement | greedy agreement | parity |\n|---|---|---|---|---|---|---|---|---|---|")
    for label, att, b, mem, p in rows:
        print(f"| {label} | {att} | {b.prefill_tok_s:.1f} | {b.ttft_s:.3f} | {b.decode_tok_s:.1f} | "
              f"{'-' if mem is None else f'{mem:.0f}'} | {p.max_abs_logits:.3f} | {p.top1_agreement:.3f} | "
              f"{p.greedy_agreement:.2f} | {'PASS' if p.passed else 'FAIL'} |")


if __name__ == "__main__":
    main()
