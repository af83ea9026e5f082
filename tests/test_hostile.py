"""A corpus of damaged inputs, careless flags and interrupted runs, each through the real CLI entry (`run_cli`, in
process: the same code `python -m export|runtime` runs, without paying torch's import per case).

Every case must end with exit status != 0, exactly one `error:` line naming the file or flag, no traceback, nothing
new left in the working folder, and its inputs byte-for-byte unchanged."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from export.__main__ import cli as export_cli
from qwen2_ref.__main__ import run_cli
from runtime.__main__ import cli as runtime_cli
from tests.damaged import gguf_tensor_offset, tree_digest, write_tiny_gguf, write_tiny_hf


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return write_tiny_hf(root / "ckpt"), write_tiny_gguf(root / "tiny.gguf")


@pytest.fixture(scope="module")
def export_folder(tiny_export):
    return tiny_export("tiny")[1]


def run(cli, args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        run_cli(cli, args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


# ---- damage to a Hugging Face folder ------------------------------------------------------------------------------
def _config(folder: Path, edit) -> None:
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    out = edit(cfg)
    p.write_bytes(out if isinstance(out, bytes) else json.dumps(cfg if out is None else out).encode())


def _st_header(folder: Path, edit) -> None:
    """Rewrite model.safetensors' JSON header through `edit(header)`, keeping the data bytes."""
    p = folder / "model.safetensors"
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first_tensor(header: dict) -> dict:
    return next(v for k, v in sorted(header.items()) if k != "__metadata__" and v["shape"] and
                len(v["shape"]) == 2)


def _swap_offsets(h):
    t = _first_tensor(h)
    t["data_offsets"] = t["data_offsets"][::-1]


def _wrong_dtype(h):
    _first_tensor(h)["dtype"] = "F16"


def _overlap(h):
    ts = sorted((v for k, v in h.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    a, b = ts[0], ts[1]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


def _nan_weight(folder: Path) -> None:
    p = folder / "model.safetensors"
    raw = bytearray(p.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header["model.norm.weight"]["data_offsets"][0]
    raw[start:start + 4] = struct.pack("<f", float("nan"))
    p.write_bytes(bytes(raw))


def _index_escape(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../../etc/passwd"}}))


HF_CASES = {
    "config not an object": (lambda f: _config(f, lambda c: [1, 2, 3]), "config.json must hold a JSON object"),
    "config rope_scaling a string": (lambda f: _config(f, lambda c: c.update(rope_scaling="yarn")),
                                     "rope_scaling must be an object"),
    "config not UTF-8": (lambda f: _config(f, lambda c: b'{"hidden_size": "\xff\xfe"}'), "not UTF-8"),
    "config head_dim without hidden_size": (lambda f: _config(f, lambda c: (c.pop("hidden_size"),
                                                                           c.update(head_dim=16)) and None),
                                            "lacks required keys: hidden_size"),
    "config hidden_size a string": (lambda f: _config(f, lambda c: c.update(hidden_size="64")),
                                    "hidden_size must be an integer"),
    "config layers absurd": (lambda f: _config(f, lambda c: c.update(num_hidden_layers=10**12)),
                             "num_hidden_layers"),
    "config bool as int": (lambda f: _config(f, lambda c: c.update(num_attention_heads=True)),
                           "num_attention_heads must be an integer"),
    "config nan theta": (lambda f: (f / "config.json").write_text(
        (f / "config.json").read_text().replace('"rope_theta": 1000000.0', '"rope_theta": NaN')), "rope_theta"),
    "config truncated JSON": (lambda f: (f / "config.json").write_text('{"hidden_size": 6'), "not valid JSON"),
    "config nested too deep": (lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                               "nested too deeply"),
    "config missing": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "config wrong model_type": (lambda f: _config(f, lambda c: c.update(model_type="llama")), "model_type"),
    "safetensors offsets backwards": (lambda f: _st_header(f, _swap_offsets), "run backwards"),
    "safetensors dtype vs bytes": (lambda f: _st_header(f, _wrong_dtype), "bytes, but F16"),
    "safetensors overlap": (lambda f: _st_header(f, _overlap), "overlap"),
    "safetensors unknown dtype": (lambda f: _st_header(f, lambda h: _first_tensor(h).update(dtype="Q4")),
                                  "has dtype 'Q4'"),
    "safetensors header garbage length": (lambda f: (f / "model.safetensors").write_bytes(
        b"\xff" * 8 + (f / "model.safetensors").read_bytes()[8:]), "header length"),
    "safetensors truncated": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-100]), "truncated"),
    "safetensors empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "header length"),
    "safetensors NaN weight": (_nan_weight, "model.norm.weight holds non-finite values"),
    "safetensors missing tensor": (lambda f: _st_header(f, lambda h: h.pop("model.norm.weight")),
                                   "missing tensor model.norm.weight"),
    "index escapes the folder": (_index_escape, "not a valid safetensors index"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_damaged_hf_checkpoint(case, pristine, tmp_path, monkeypatch, capsys):
    damage, expected = HF_CASES[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine[0], ckpt)
    damage(ckpt)
    _expect_clean_failure(export_cli, ["onnx", "--checkpoint", str(ckpt), "--out", "out", "--no-verify"],
                          expected, ckpt, tmp_path, monkeypatch, capsys)


# ---- damage to a GGUF ---------------------------------------------------------------------------------------------
def _gguf_nan(path: Path) -> None:
    """A Q8_0 block whose fp16 scale is NaN: dequantizes to NaN (llama.cpp's own reader would run on garbage)."""
    off = gguf_tensor_offset(path, "blk.0.attn_q.weight")
    raw = bytearray(path.read_bytes())
    raw[off:off + 2] = b"\x00\x7e"  # fp16 NaN
    path.write_bytes(bytes(raw))


GGUF_CASES = {
    "gguf NaN block": (_gguf_nan, "blk.0.attn_q.weight holds non-finite values"),
    "gguf truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot read GGUF"),
    "gguf bad magic": (lambda p: p.write_bytes(b"GGUX" + p.read_bytes()[4:]), "not a GGUF file"),
    "gguf empty": (lambda p: p.write_bytes(b""), "not a GGUF file"),
    "gguf tensor count absurd": (lambda p: p.write_bytes(p.read_bytes()[:8] + struct.pack("<Q", 2**62)
                                                         + p.read_bytes()[16:]), "cannot read GGUF"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_damaged_gguf(case, pristine, tmp_path, monkeypatch, capsys):
    damage, expected = GGUF_CASES[case]
    gguf = tmp_path / "model.gguf"
    shutil.copy(pristine[1], gguf)
    damage(gguf)
    _expect_clean_failure(export_cli, ["onnx", "--checkpoint", str(gguf), "--dtype", "int4", "--out", "out",
                                       "--no-verify"], expected, gguf, tmp_path, monkeypatch, capsys)


# ---- careless flags -----------------------------------------------------------------------------------------------
FLAG_CASES = {
    "out is the checkpoint, with --overwrite": (["--out", "{ckpt}", "--overwrite"], "is the input"),
    "out inside the checkpoint": (["--out", "{ckpt}/export"], "lies inside the input"),
    "out holds the checkpoint": (["--out", "data", "--overwrite"], "holds the input"),
    "out is above the current folder": (["--out", "{tmp}/..", "--overwrite"], "the current folder or one above"),
    "out is empty": (["--out", ""], "--out is empty"),
    "out is the current folder": (["--out", "."], "the current folder"),
    "out below a regular file": (["--out", "afile/export"], "is a file, not a folder"),
    "out name too long": (["--out", "x" * 300], "use at most 200"),
    "out is a file": (["--out", "afile", "--overwrite"], "exists and is not a folder"),
    "out exists, no --overwrite": (["--out", "anexport"], "pass --overwrite"),
    "out is not an export, --overwrite": (["--out", "somedir", "--overwrite"], "not an earlier export"),
    "checkpoint is empty": (["--checkpoint", ""], "--checkpoint is empty"),
    "checkpoint missing": (["--checkpoint", "nothere"], "no such file or folder"),
    "checkpoint is a text file": (["--checkpoint", "afile"], "neither a GGUF file nor a .safetensors file"),
    "checkpoint is an empty folder": (["--checkpoint", "somedir/sub"], "no config.json"),
    "size conflicts": (["--size", "7b"], "conflicts with --checkpoint"),
    "max-context zero": (["--max-context", "0"], "'--max-context'"),
    "unknown dtype": (["--dtype", "int3"], "'--dtype'"),
    "unknown flag": (["--turbo"], "--turbo"),
    "calibration file missing": (["--dtype", "int4", "--quantizer", "calibrated", "--calibration", "nothere.txt"],
                                 "nothere.txt"),
    "random weights and checkpoint": (["--random-weights"], "exclude each other"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_careless_flags(case, pristine, tmp_path, monkeypatch, capsys):
    extra, expected = FLAG_CASES[case]
    ckpt = tmp_path / "data" / "ckpt"
    shutil.copytree(pristine[0], ckpt)
    (tmp_path / "afile").write_text("not a model")
    (tmp_path / "somedir" / "sub").mkdir(parents=True)
    (tmp_path / "somedir" / "mine.txt").write_text("mine")
    (tmp_path / "anexport").mkdir()
    (tmp_path / "anexport" / "export_report.json").write_text("{}")
    extra = [a.format(ckpt=ckpt, tmp=tmp_path) for a in extra]
    args = ["onnx", "--checkpoint", str(ckpt), "--out", "out", "--no-verify"]
    for flag in ("--checkpoint", "--out"):  # a case's own value replaces the default one
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    _expect_clean_failure(export_cli, args + extra, expected, tmp_path, tmp_path, monkeypatch, capsys)


# ---- the machine says no, mid-export ------------------------------------------------------------------------------
def test_disk_full_during_onnx_export(pristine, tmp_path, monkeypatch, capsys):
    import export.onnx as onnx_export

    def full(folder, *a, **k):
        (folder / "config.json").write_bytes(b"{")  # half-written, as a real full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "config.json"))

    monkeypatch.setattr(onnx_export, "write_metadata", full)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine[0], ckpt)
    _expect_clean_failure(export_cli, ["onnx", "--checkpoint", str(ckpt), "--out", "out", "--no-verify"],
                          "the disk is full (config.json); nothing was written", ckpt, tmp_path, monkeypatch, capsys)


def test_disk_full_during_coreml_save(pristine, tmp_path, monkeypatch, capsys):
    """coremltools copies its package into place with shutil, which reports a full disk as shutil.Error."""
    from export.coreml import CoreMLTarget

    def build(self, ckpt, plan, folder, tokenizer):
        (folder / "model.mlpackage").mkdir()
        raise shutil.Error([(str(folder / "x"), str(folder / "model.mlpackage" / "weight.bin"),
                             "[Errno 28] No space left on device")])

    monkeypatch.setattr(CoreMLTarget, "build", build)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine[0], ckpt)
    _expect_clean_failure(export_cli, ["coreml", "--checkpoint", str(ckpt), "--out", "out", "--no-verify"],
                          "No space left on device (copying to weight.bin)", ckpt, tmp_path, monkeypatch, capsys)


# ---- the runner's inputs ------------------------------------------------------------------------------------------
def _edit_json(folder: Path, name: str, edit) -> None:
    p = folder / name
    obj = json.loads(p.read_text()) if p.exists() else {}
    edit(obj)
    p.write_text(json.dumps(obj))


RUNTIME_CASES = {
    "model missing": (lambda f: shutil.rmtree(f), [], "no such folder"),
    "model is a file": (lambda f: (shutil.rmtree(f), f.write_text("x")), [], "not a folder"),
    "model is empty": (None, ["--model", ""], "--model is empty"),
    "no model.onnx": (lambda f: (f / "model.onnx").unlink(), [], "no model.onnx"),
    "config not an object": (lambda f: (f / "config.json").write_text("[]"), [], "expected a JSON object"),
    "report context not a number": (lambda f: _edit_json(f, "export_report.json",
                                                         lambda r: r.update(context="long")), [], "context is"),
    "report ops a list": (lambda f: _edit_json(f, "export_report.json", lambda r: r.update(ops=[1])), [], "ops is"),
    "report not JSON": (lambda f: (f / "export_report.json").write_text("{oops"), [], "not valid JSON"),
    "generation eos a string": (lambda f: _edit_json(f, "generation_config.json",
                                                     lambda g: g.update(eos_token_id="</s>")), [], "eos_token_id"),
    "genai context negative": (lambda f: (_edit_json(f, "export_report.json", lambda r: r.pop("context")),
                                          _edit_json(f, "genai_config.json",
                                                     lambda g: g.update(model={"context_length": -1}))),
                               [], "context_length"),
    "prompt empty": (None, ["--prompt", ""], "--prompt is empty"),
    "prompt not UTF-8": (None, ["--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),
    "trace into a missing folder": (None, ["--trace", "nothere/trace"], "is not a writable folder"),
    "no tokenizer": (None, [], "no tokenizer.json"),
    "max-new-tokens negative": (None, ["--max-new-tokens", "-1"], "'--max-new-tokens'"),
}


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_runner_inputs(case, export_folder, tmp_path, monkeypatch, capsys):
    damage, extra, expected = RUNTIME_CASES[case]
    model = tmp_path / "model"
    shutil.copytree(export_folder, model)
    if damage is not None:
        damage(model)
    args = ["generate", "--model", str(model), "--prompt", "hello", "--max-new-tokens", "2"]
    for flag in ("--model", "--prompt"):
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    _expect_clean_failure(runtime_cli, args + extra, expected, tmp_path, tmp_path, monkeypatch, capsys)


def _expect_clean_failure(cli, args, expected: str, inputs: Path, workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    before_inputs = tree_digest(inputs)
    before_entries = sorted(p.name for p in workdir.iterdir())
    code, err = run(cli, args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0, f"exit 0 for {args}: {err}"
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]
    assert sorted(p.name for p in workdir.iterdir()) == before_entries, "left something behind"
    assert tree_digest(inputs) == before_inputs, "an input was modified"


# ---- interrupted runs and what they leave -------------------------------------------------------------------------
def _staged_then(tmp_path: Path, action: str) -> subprocess.CompletedProcess:
    code = (
        "import os, signal, time\n"
        "from pathlib import Path\n"
        "from export.output import staged_folder\n"
        f"with staged_folder(Path({str(tmp_path / 'model')!r}), overwrite=True) as tmp:\n"
        "    (tmp / 'model.onnx.data').write_bytes(b'0' * 4096)\n"
        f"    {action}\n"
        "    time.sleep(30)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])


def test_sigkilled_export_is_cleaned_up_by_the_next(tmp_path, capsys):
    """SIGKILL cannot be caught: the staged folder survives its process; the next export into the same parent
    removes it and says so. A live export's staged folder is left alone."""
    from export.output import staged_folder

    r = _staged_then(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    assert r.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.partial-"), left
    live = tmp_path / f".other.partial-{os.getpid()}-x"
    live.mkdir()
    os.environ["QWEN2_QUIET"] = "0"
    try:
        with staged_folder(tmp_path / "next", overwrite=False) as tmp:
            (tmp / "export_report.json").write_text("{}")
    finally:
        os.environ["QWEN2_QUIET"] = "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["next", live.name])
    assert f"removed {tmp_path / left[0]}" in capsys.readouterr().err


def test_ctrl_c_leaves_nothing(tmp_path):
    r = _staged_then(tmp_path, "os.kill(os.getpid(), signal.SIGINT)")
    assert r.returncode != 0 and list(tmp_path.iterdir()) == []


def test_published_folder_gets_the_umask(tmp_path):
    from export.output import staged_folder

    old = os.umask(0o027)
    try:
        with staged_folder(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "export_report.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_empty_folder_is_a_valid_destination(tmp_path):
    from export.output import staged_folder

    (tmp_path / "out").mkdir()
    with staged_folder(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "export_report.json").write_text("{}")
    assert (tmp_path / "out" / "export_report.json").exists()
