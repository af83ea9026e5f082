"""An export folder as the runner sees it: config, context, genai metadata, tokenizer, report — checked up front so
a wrong folder fails with one line that says what is missing and how to make it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen2_ref.config import ModelArgs
from qwen2_ref.errors import CheckpointError, ConfigError, Qwen2Error
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
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); re-export the folder with --overwrite") from None


def open_export(path: str | Path) -> ExportFolder:
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
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not a Qwen2 config ({e})") from None
    report = _json(path / "export_report.json") if (path / "export_report.json").is_file() else {}
    gen = _json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    genai = _json(path / "genai_config.json") if (path / "genai_config.json").is_file() else {}
    context = int(report.get("context") or genai.get("model", {}).get("context_length")
                  or cfg.max_position_embeddings)
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    eos = list(eos) if isinstance(eos, list) else [eos]
    for i in (tok.eos_token_ids if tok else []):
        if i not in eos:
            eos.append(i)
    pad = gen.get("pad_token_id", cfg.bos_token_id)
    return ExportFolder(path, cfg, context, tuple(int(i) for i in eos), int(pad if pad is not None else 0), report,
                        tok)


def require_tokenizer(folder: ExportFolder) -> Tokenizer:
    if folder.tokenizer is None:
        raise Qwen2Error(f"{folder.path}: no tokenizer.json (a random-weight export); text generation needs one — "
                         "pass token ids through the library API instead")
    return folder.tokenizer
