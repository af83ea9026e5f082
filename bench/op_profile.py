"""Where one decode step's time goes, per operator type, for ONNX folders side by side: ours, or any other
exporter's whose graph takes optimum's inputs (onnxruntime-genai's builder output included). A benchmark: prints
one table, asserts nothing.

    python bench/op_profile.py exports/qwen2-0.5b-int4 ~/.cache/qwen2-export/peers/genai-int4 [--past 300] [--new 1]

Each folder gets a plain ONNX Runtime session (2 threads, profiling on) and runs `--steps` steps of `--new` tokens
against `--past` cached positions of random keys and values (the step's cost does not depend on their values),
after `--warmup` unprofiled ones; the table shows the mean per step of ONNX Runtime's own timings: the whole run,
and the kernel times of its operators ("everything else": other kernels and the session's own overhead).
MatMulNBits is split by what it computes, from the node names both exporters use (q/k/v/o; gate/up; down; head).
Folders take turns, one round each, `--rounds` rounds; the figures are the medians over rounds.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import click
import numpy as np

THREADS = 2


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def role(node: str) -> str:
    n = node.lower()
    if "head" in n or "embed" in n:  # a tied table's MatMulNBits is named after the embedding
        return "head"
    if "down" in n:
        return "down"
    if "gate" in n or "up_proj" in n or ".up" in n or "mlp" in n:
        return "gate/up"
    return "attention"


def feeds(sess, past: int, new: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            out[i.name] = rng.integers(100, 150000, (1, new))
        elif i.name == "attention_mask":
            out[i.name] = np.ones((1, past + new), np.int64)
        elif i.name == "position_ids":
            out[i.name] = np.arange(past, past + new)[None]
        elif i.name.startswith("past_key_values."):
            kv = [d if isinstance(d, int) else None for d in i.shape]
            heads, dim = kv[1], kv[3] or 64
            dtype = np.float16 if "float16" in i.type else np.float32
            out[i.name] = rng.standard_normal((1, heads, past, dim)).astype(dtype)
    return out


def profile_once(folder: Path, past: int, new: int, steps: int, warmup: int, tmp: Path) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / "op-profile")
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    f = feeds(sess, past, new)
    for _ in range(warmup + steps):
        sess.run(["logits"], f)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    os.unlink(path)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-steps:]
    t0 = runs[0]["ts"]
    by_op: collections.Counter = collections.Counter()
    by_role: collections.Counter = collections.Counter()
    nodes = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            op = e["args"]["op_name"]
            by_op[op] += e["dur"]
            nodes += 1
            if op == "MatMulNBits":
                by_role[role(e["name"])] += e["dur"]
    ms = 1e-3 / steps
    return {"step_ms": sum(r["dur"] for r in runs) * ms, "nodes": nodes // steps,
            "ops": {k: v * ms for k, v in by_op.items()}, "nbits": {k: v * ms for k, v in by_role.items()}}


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--past", default=300, help="cached positions before the step")
@click.option("--new", default=1, help="tokens in the step (1: decode; more: a speculative verify step)")
@click.option("--steps", default=20, type=click.IntRange(min=1))
@click.option("--warmup", default=5)
@click.option("--rounds", default=2, type=click.IntRange(min=1))
def main(folders, past, new, steps, warmup, rounds):
    import tempfile

    got: dict[Path, list[dict]] = {f: [] for f in folders}
    loads = []
    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        for _ in range(rounds):
            for f in folders:
                loads.append(os.getloadavg()[0])
                got[f].append(profile_once(f, past, new, steps, warmup, Path(tmp)))
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {THREADS} threads; step of {new} token(s) after {past} "
          f"cached; {steps} steps x {rounds} rounds, medians; 1-min load average {min(loads):.1f}-{max(loads):.1f}")
    print("| folder | step ms (session run) | nodes | MatMulNBits: attention | gate/up | down | head | "
          "GroupQueryAttention | everything else |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f, rs in got.items():
        med = lambda fn: statistics.median(fn(r) for r in rs)  # noqa: E731
        nb = {k: med(lambda r, k=k: r["nbits"].get(k, 0.0)) for k in ("attention", "gate/up", "down", "head")}
        gqa = med(lambda r: r["ops"].get("GroupQueryAttention", 0.0))
        step = med(lambda r: r["step_ms"])
        rest = step - sum(nb.values()) - gqa
        print(f"| {f} | {step:.2f} | {rs[0]['nodes']} | {nb['attention']:.2f} | {nb['gate/up']:.2f} | "
              f"{nb['down']:.2f} | {nb['head']:.2f} | {gqa:.2f} | {rest:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
