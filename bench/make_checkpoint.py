"""Write a random Hugging Face checkpoint of any published shape, sharded safetensors, without holding it in RAM.

    python bench/make_checkpoint.py --size 7b --out /tmp/ckpt-7b [--layers 2] [--dtype bf16] [--shard-gib 2]

Weights come from qwen2_ref's RandomSource (deterministic per tensor), one shard in memory at a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2_ref.checkpoint import RANDOM_MARK  # noqa: E402
from qwen2_ref.config import SIZES, from_name  # noqa: E402
from qwen2_ref.progress import track  # noqa: E402
from qwen2_ref.weights import RandomSource  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_random_checkpoint(cfg, out: Path, dtype: torch.dtype, shard_bytes: int, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    src = RandomSource(cfg, seed)
    names = src.names()
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = torch.Size(src.shape(n)).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    total = len(shards)
    weight_map, total_size = {}, 0
    for i, group in enumerate(track(shards, f"writing {total} shards"), 1):
        fname = f"model-{i:05d}-of-{total:05d}.safetensors"
        tensors = {n: src.get(n).to(dtype) for n in group}
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=1))
    hf = cfg.to_hf_config() | {RANDOM_MARK: True, "torch_dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16",
                                                torch.float32: "float32"}[dtype]}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out


@click.command()
@click.option("--size", type=click.Choice(list(SIZES)), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--layers", type=click.IntRange(1), default=None, help="Cut to this many layers (same dimensions).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bf16")
@click.option("--shard-gib", type=float, default=2.0)
def main(size, out, layers, dtype, shard_gib):
    cfg = from_name(size)
    if layers:
        cfg = cfg.replace(num_hidden_layers=layers)
    write_random_checkpoint(cfg, out, DTYPES[dtype], int(shard_gib * 2**30))
    click.echo(f"wrote {out} ({cfg.num_parameters() / 1e9:.2f}B parameters, {dtype})")


if __name__ == "__main__":
    main()
