"""Small, valid input files written without transformers or llama.cpp (so the damaged-input tests and the fuzzers
start from something real and cheap): a tiny Hugging Face folder (config.json + one safetensors file) and a tiny
GGUF (qwen2 architecture, F32 vectors and Q8_0 matrices, or the block types asked for), both from RandomSource
weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from qwen2_ref.config import ModelArgs, from_name
from qwen2_ref.weights import _GGUF_LAYER, _GGUF_TOP, RandomSource, expected_tensors


def write_tiny_hf(folder: Path, cfg: ModelArgs | str = "tiny") -> Path:
    from safetensors.torch import save_file

    cfg = from_name(cfg) if isinstance(cfg, str) else cfg
    folder.mkdir(parents=True, exist_ok=True)
    src = RandomSource(cfg)
    save_file({n: src.get(n).contiguous() for n in src.names()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    return folder


def write_tiny_gguf(path: Path, cfg: ModelArgs | str = "tiny", types: dict[str, str] | None = None) -> Path:
    """`types`: {GGUF tensor name suffix ("attn_q.weight", "token_embd.weight", ...): GGML type name} for the 2-D
    tensors (default Q8_0). Q4_0/Q4_1/Q5_0/Q8_0 are quantized from the random weights with gguf's own quantizer;
    Q4_K and Q6_K (which gguf-py cannot quantize) are random blocks with small finite scales."""
    import gguf

    cfg = from_name(cfg) if isinstance(cfg, str) else cfg
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # vocabulary-shaped arrays (strings, int32, float32), for the readers' array paths; no tokenizer.ggml.model,
    # so no tokenizer is built from them
    w.add_token_list([f"tok{i}\u00e9" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * (cfg.vocab_size - 2) + [3, 3])
    w.add_token_scores([float(-i) for i in range(cfg.vocab_size)])
    w.add_token_merges([f"t o{i}" for i in range(100)])
    to_gguf = {hf: g for g, hf in _GGUF_TOP.items()}
    for i in range(cfg.num_hidden_layers):
        to_gguf |= {f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for g, hf in _GGUF_LAYER.items()}
    src = RandomSource(cfg)
    rng = np.random.default_rng(7)
    for n, shape in expected_tensors(cfg).items():
        a = src.get(n).numpy().astype(np.float32)
        if len(shape) == 2 and shape[1] % 32 == 0:
            name = next((t for s, t in (types or {}).items() if to_gguf[n].endswith(s)), "Q8_0")
            qt = gguf.GGMLQuantizationType[name]
            q = _random_k_blocks(rng, shape, name) if name in ("Q4_K", "Q6_K") else gguf.quants.quantize(a, qt)
            w.add_tensor(to_gguf[n], q, raw_shape=q.shape, raw_dtype=qt)
        else:
            w.add_tensor(to_gguf[n], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _random_k_blocks(rng, shape: tuple[int, int], name: str) -> np.ndarray:
    """Random llama.cpp K-quant blocks (256 weights per super-block) with small finite fp16 super-block scales."""
    size = {"Q4_K": 144, "Q6_K": 210}[name]
    raw = rng.integers(0, 256, (shape[0], shape[1] // 256, size), dtype=np.uint8)
    d = rng.uniform(1e-3, 4e-3, raw.shape[:2] + (2,)).astype(np.float16).view(np.uint8)  # (rows, sbk, 2 x 2 B)
    if name == "Q4_K":
        raw[..., 0:4] = d.reshape(raw.shape[:2] + (4,))  # d, dmin
    else:
        raw[..., 208:210] = d[..., :2]  # d
    return raw.reshape(shape[0], -1)


def gguf_tensor_offset(path: Path, name: str) -> int:
    """Absolute byte offset of a GGUF tensor's data."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return next(int(t.data_offset) for t in r.tensors if t.name == name)


def tree_digest(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `path` (or of `path` itself), to prove inputs untouched."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}

