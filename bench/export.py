"""Export cost per size and dtype: wall time, peak RSS (export phase and with the parity gate), size on disk.

    python bench/export.py                # ONNX: 0.5B real (fp32/fp16/int4), 1.5B random (fp32/int4); Core ML int4:
                                          # 0.5B real (gate on, and off), 1.5B random (no gate)
    python bench/export.py --case 7b=/tmp/ckpt-7b:int4 --case 72b-2l=/tmp/ckpt-72b-2l:fp16:noverify

A case is LABEL=SOURCE:DTYPE[:noverify][:coreml], SOURCE a size (its default checkpoint), `random-SIZE`, or a
checkpoint path; `coreml` exports a Core ML package instead of ONNX. Each export runs in its own process, so peak
RSS is that export's alone. Make big random checkpoints with
bench/make_checkpoint.py. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

DEFAULT = ["0.5b=0.5b:fp32", "0.5b=0.5b:fp16", "0.5b=0.5b:int4", "1.5b (random)=random-1.5b:fp32",
           "1.5b (random)=random-1.5b:int4", "0.5b Core ML=0.5b:int4:coreml", "0.5b Core ML=0.5b:int4:noverify:coreml",
           "1.5b Core ML (random)=random-1.5b:int4:noverify:coreml"]


def run_case(case: str, workdir: Path) -> dict:
    label, spec = case.split("=", 1)
    parts = spec.split(":")
    source, dtype = parts[0], parts[1]
    noverify = "noverify" in parts[2:]
    target = "coreml" if "coreml" in parts[2:] else "onnx"
    out = workdir / f"{label.replace(' ', '_').replace('/', '_')}-{dtype}"
    cmd = [sys.executable, "-m", "export", target, "--dtype", dtype, "--out", str(out), "--overwrite"]
    if source.startswith("random-"):
        cmd += ["--size", source[len("random-"):], "--random-weights"]
    elif Path(source).exists():
        cmd += ["--checkpoint", source]
    else:
        cmd += ["--size", source]
    if noverify:
        cmd.append("--no-verify")
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        return {"label": label, "dtype": dtype, "error": errs[-1:] or proc.stderr.strip().splitlines()[-2:-1]}
    rep = json.loads((out / "export_report.json").read_text())
    par = rep["parity"]
    row = {"label": label, "dtype": dtype if target == "onnx" else f"{dtype} (Core ML)", "wall_s": wall,
           "export_rss_mib": rep["export_peak_rss_mib"],
           "total_rss_mib": int(proc.stderr.strip().splitlines()[-1]) / 1024,
           "disk_mib": sum(rep["files_mib"].values()),
           "parity": "skipped" if "skipped" in par else f"{par['max_abs_logits']:.2e} ({par['scope']})"}
    shutil.rmtree(out)  # big exports: keep the disk free for the next case
    return row


@click.command()
@click.option("--case", "cases", multiple=True, help="LABEL=SOURCE:DTYPE[:noverify]; repeatable.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None)
def main(cases, workdir):
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as td:
        for case in cases or DEFAULT:
            click.echo(f"running {case} ...", err=True)
            rows.append(run_case(case, Path(td)))
    t = Table(title="Export cost (this machine)")
    for c in ("model", "dtype", "wall s", "export peak RSS MiB", "peak RSS MiB (with gate)", "on disk MiB",
              "parity max |Δ logits|"):
        t.add_column(c, justify="right")
    for r in rows:
        if "error" in r:
            t.add_row(r["label"], r["dtype"], "error", " ".join(r["error"]), "", "", "")
            continue
        t.add_row(r["label"], r["dtype"], f"{r['wall_s']:.0f}", f"{r['export_rss_mib']:.0f}",
                  f"{r['total_rss_mib']:.0f}", f"{r['disk_mib']:.0f}", r["parity"])
    Console(width=180).print(t)


if __name__ == "__main__":
    main()
