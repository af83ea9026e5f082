"""Opening checkpoints: a Hugging Face folder (or a `.safetensors` file beside a config.json) or a GGUF file,
and choosing one when the user names only a size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import hub
from .config import ModelArgs, from_name, size_of
from .errors import CheckpointError, ConfigError, read_json
from .model import Qwen2ForCausalLM
from .tokenizer import Tokenizer
from .weights import GGUFSource, RandomSource, SafetensorsSource, WeightSource, load_into


# config.json key that marks a checkpoint of generated random weights (bench/make_checkpoint.py writes it)
RANDOM_MARK = "qwen2_export_random_weights"


@dataclass
class Checkpoint:
    path: Path
    config: ModelArgs
    source: WeightSource
    kind: str  # "hf" | "gguf" | "random"
    random_weights: bool = False  # a generated checkpoint (kind "random", or written by bench/make_checkpoint.py)

    @property
    def size(self) -> str | None:
        return size_of(self.config)

    def tokenizer(self) -> Tokenizer | None:
        if self.kind == "random":  # no files behind it (and never a stray tokenizer.json from the cwd)
            return None
        if self.kind == "gguf":
            return Tokenizer.from_gguf(self.source) if self.source.field("tokenizer.ggml.model") is not None else None
        folder = self.path if self.path.is_dir() else self.path.parent
        return Tokenizer.from_dir(folder) if (folder / "tokenizer.json").is_file() else None

    def load_model(self, dtype: torch.dtype = torch.float32, progress: bool = True) -> Qwen2ForCausalLM:
        model = empty_model(self.config, dtype)
        load_into(model, self.source, self.config, progress=progress)
        return model.eval()


def empty_model(cfg: ModelArgs, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """Allocated but uninitialized (no time spent on random init that loading overwrites)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()
    model.init_buffers()
    return model


def random_model(cfg: ModelArgs, dtype: torch.dtype = torch.float32, seed: int = 0) -> Qwen2ForCausalLM:
    """Random weights (`RandomSource`: biases and norm weights randomized too, the same values the exporters see)."""
    model = empty_model(cfg, torch.float32)
    load_into(model, RandomSource(cfg, seed), cfg, progress=False)
    return model.to(dtype).eval()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A Hugging Face folder (config.json + safetensors, sharded or not) or a `.gguf` file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (expected a Hugging Face folder or a .gguf file)")
    if path.is_file():
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        if magic == b"GGUF" or path.suffix == ".gguf":
            return _open_gguf(path)
        if path.suffix == ".safetensors":
            return _open_hf(path.parent, SafetensorsSource(path))
        raise CheckpointError(f"{path}: neither a GGUF file nor a .safetensors file; pass a Hugging Face folder "
                              "(config.json + *.safetensors) or a .gguf file")
    return _open_hf(path, None)


def _open_hf(folder: Path, source: WeightSource | None) -> Checkpoint:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json; not a Hugging Face checkpoint folder")
    raw = read_json(cfg_path)
    try:
        cfg = ModelArgs.from_hf_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None
    marked = bool(raw.get(RANDOM_MARK))
    return Checkpoint(folder, cfg, source or SafetensorsSource(folder), "hf", random_weights=marked)


def _open_gguf(path: Path) -> Checkpoint:
    src = GGUFSource(path)
    meta = src.metadata()
    if "model.embed_tokens.weight" not in src.names():
        raise CheckpointError(f"{path}: GGUF has no token_embd.weight tensor")
    try:
        cfg = hf_from_gguf(meta, src)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return Checkpoint(path, cfg, src, "gguf")


def hf_from_gguf(meta: dict, src: GGUFSource) -> ModelArgs:
    from .config import from_gguf_metadata

    vocab = src.shape("model.embed_tokens.weight")[0]
    return from_gguf_metadata(meta, vocab_size=vocab, has_output="lm_head.weight" in src.names())


def resolve_checkpoint(size: str | None = None, checkpoint: str | Path | None = None,
                       random_weights: bool = False, variant: str = "instruct") -> Checkpoint:
    """What the CLIs load: `--checkpoint` if given (its size must agree with `--size`), else the default for the size.

    Defaults: `0.5b` -> the real Qwen2.5-Coder-0.5B-Instruct GGUF (fetched once into the cache); other sizes -> the
    local Hugging Face cache; `random_weights` -> architecture only, as an explicit opt-in.
    """
    if checkpoint is not None:
        if not str(checkpoint).strip():
            raise CheckpointError("--checkpoint is empty; pass a Hugging Face folder or a .gguf file")
        if random_weights:
            raise ConfigError("--random-weights and --checkpoint exclude each other; pass one")
        ckpt = open_checkpoint(checkpoint)
        if size is not None and not ckpt.config.dual_chunk_attention_config and ckpt.size not in (None, size):
            raise ConfigError(f"--size {size} conflicts with --checkpoint {checkpoint}, which is a {ckpt.size} model; "
                              "drop --size (it is inferred from the checkpoint)")
        if size is not None and ckpt.size is None and size in hub.HF_REPOS:
            raise ConfigError(f"--size {size} conflicts with --checkpoint {checkpoint}, whose shape matches no "
                              "published size; drop --size")
        return ckpt
    if size is None:
        raise ConfigError("pass --size or --checkpoint")
    cfg = from_name(size, variant)
    if random_weights:
        return Checkpoint(Path(f"<random {size}>"), cfg, RandomSource(cfg), "random", random_weights=True)
    if size == "0.5b":
        return open_checkpoint(hub.fetch_real_model())
    found = hub.find_in_hf_cache(size)
    if found is not None:
        return open_checkpoint(found)
    raise CheckpointError(
        f"no checkpoint for size {size}: none of {', '.join(hub.HF_REPOS.get(size, ()))} is in the local Hugging "
        f"Face cache. Pass --checkpoint PATH (a Hugging Face folder or a .gguf file), or --random-weights for "
        f"architecture-only work")
