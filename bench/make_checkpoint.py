"""Write a random Hugging Face checkpoint of any published shape, sharded safetensors, without holding it in RAM.

    python bench/make_checkpoint.py --size 7b --out /tmp/ckpt-7b [--layers 2] [--dtype bf16] [--shard-gib 2]
    python bench/make_checkpoint.py --size 1.5b --out /tmp/q15.gguf --dtype q4_k_m

Weights come from qwen2_ref's RandomSource (deterministic per tensor), one shard in memory at a time. `--dtype
q4_k_m` writes one GGUF file with llama.cpp's Q4_K_M type layout instead (Q4_K, with Q6_K for the head, tied or
not, and for attn_v / ffn_down in llama.cpp's "more bits" layers; random K-quant blocks: for speed and size, not
quality; rows must be multiples of 256, as from 1.5B up).
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


def write_q4_k_m_gguf(cfg, out: Path) -> Path:
    """llama.cpp's Q4_K_M choice of types (llama_tensor_get_type: attn_v and ffn_down get Q6_K in the first and last
    eighth of the layers and every third between; a tied embedding gets Q6_K; the rest Q4_K)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from damaged import write_tiny_gguf

    n = cfg.num_hidden_layers
    more = [i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2]
    types = {f".{i}.{t}.weight": "Q6_K" for i in more for t in ("attn_v", "ffn_down")}
    # first match wins (by name suffix): attn_output before the untied head's output; an untied table keeps the
    # base type (Q4_K), a tied one is the head and gets Q6_K
    types |= {"token_embd.weight": "Q6_K" if cfg.tie_word_embeddings else "Q4_K", "attn_output.weight": "Q4_K",
              "output.weight": "Q6_K", "weight": "Q4_K"}
    return write_tiny_gguf(out, cfg, types)


@click.command()
@click.option("--size", type=click.Choice(list(SIZES)), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--layers", type=click.IntRange(1), default=None, help="Cut to this many layers (same dimensions).")
@click.option("--dtype", type=click.Choice([*DTYPES, "q4_k_m"]), default="bf16")
@click.option("--shard-gib", type=float, default=2.0)
def main(size, out, layers, dtype, shard_gib):
    cfg = from_name(size)
    if layers:
        cfg = cfg.replace(num_hidden_layers=layers)
    if dtype == "q4_k_m":
        if cfg.hidden_size % 256 or cfg.intermediate_size % 256:
            raise click.BadParameter(f"{size}'s rows are not multiples of 256 (K-quant super-blocks)", param_hint="--dtype")
        write_q4_k_m_gguf(cfg, out)
    else:
        write_random_checkpoint(cfg, out, DTYPES[dtype], int(shard_gib * 2**30))
    click.echo(f"wrote {out} ({cfg.num_parameters() / 1e9:.2f}B parameters, {dtype})")


if __name__ == "__main__":
    main()
