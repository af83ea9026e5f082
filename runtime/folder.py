"""An export folder as the runner sees it: config, context, genai metadata, tokenizer, report — checked up front so
a wrong folder fails with one line that says what is missing and how to make it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen2_ref.config import ModelArgs
from qwen2_ref.errors import CheckpointError, ConfigError, Qwen2Error, read_json
from qwen2_ref.tokenizer import Tokenizer

MAKE_ONE = "create one with `python -m export onnx --size 0.5b --dtype int4 --out DIR`"


@dataclass(frozen=True)
class ExportFolder:
    path: Path
    config: ModelArgs
    context: int  # longest sequence (prompt + generated) the export was made for
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    report: dict
    tokenizer: Tokenizer | None  # random-weight exports carry none

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def dtype(self) -> str:
        return self.report.get("dtype", "?")

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def _json(path: Path) -> dict:
    """An optional JSON object beside the model: {} when absent, else the object or one line naming the file."""
    if not path.is_file():
        return {}
    try:
        obj = read_json(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; re-export the folder with --overwrite") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object; re-export the folder with --overwrite")
    return obj


def _field(path: Path, key: str, value, kind: str):
    """A typed value read from an export's JSON file: `kind` "id" (integer >= 0), "ids" (one or a list of ids),
    "count" (integer >= 1) or "counts" (an object of name -> integer >= 0)."""
    def is_int(v, least: int) -> bool:
        return type(v) is int and v >= least

    ok = {"id": lambda v: is_int(v, 0), "count": lambda v: is_int(v, 1),
          "ids": lambda v: is_int(v, 0) or (isinstance(v, list) and v and all(is_int(i, 0) for i in v)),
          "counts": lambda v: isinstance(v, dict) and all(is_int(i, 0) for i in v.values())}[kind](value)
    if not ok:
        want = {"id": "a token id", "count": "a positive integer", "ids": "a token id or a list of them",
                "counts": "an object of integer counts"}[kind]
        raise CheckpointError(f"{path}: {key} is {str(value)[:40]!r}, expected {want}; re-export the folder "
                              "with --overwrite")
    return value


def open_export(path: str | Path) -> ExportFolder:
    if not str(path):
        raise CheckpointError(f"--model is empty; pass an export folder ({MAKE_ONE})")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; {MAKE_ONE}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; --model takes an export folder ({MAKE_ONE})")
    missing = [n for n in ("model.onnx", "config.json") if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not an ONNX export folder (no {', '.join(missing)}); {MAKE_ONE}")
    try:
        cfg = ModelArgs.from_hf_config(_json(path / "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: not a Qwen2 config ({e})") from None
    report_path, gen_path, genai_path = (path / n for n in ("export_report.json", "generation_config.json",
                                                            "genai_config.json"))
    report, gen, genai = _json(report_path), _json(gen_path), _json(genai_path)
    if report.get("context") is not None:
        context = _field(report_path, "context", report["context"], "count")
    else:
        model = genai.get("model")
        given = model.get("context_length") if isinstance(model, dict) else None
        context = (cfg.max_position_embeddings if given is None
                   else _field(genai_path, "model.context_length", given, "count"))
    _field(report_path, "ops", report.get("ops", {}), "counts")
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    eos = _field(gen_path, "eos_token_id", gen.get("eos_token_id", cfg.eos_token_id), "ids")
    eos = list(eos) if isinstance(eos, list) else [eos]
    for i in (tok.eos_token_ids if tok else []):
        if i not in eos:
            eos.append(i)
    pad = gen.get("pad_token_id")
    pad = cfg.bos_token_id if pad is None else _field(gen_path, "pad_token_id", pad, "id")
    return ExportFolder(path, cfg, context, tuple(eos), pad, report, tok)


def require_tokenizer(folder: ExportFolder) -> Tokenizer:
    if folder.tokenizer is None:
        raise Qwen2Error(f"{folder.path}: no tokenizer.json (a random-weight export); text generation needs one — "
                         "pass token ids through the library API instead")
    return folder.tokenizer
