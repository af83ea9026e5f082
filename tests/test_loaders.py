"""Checkpoint loaders: sharded equals single, bf16 loads, and bad checkpoints give one clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2_ref.checkpoint import open_checkpoint, resolve_checkpoint
from qwen2_ref.config import ModelArgs, from_name
from qwen2_ref.errors import CheckpointError, ConfigError

IDS = torch.tensor([[5, 17, 300, 42, 7, 99]])


def logits(folder):
    return open_checkpoint(folder).load_model(progress=False)(IDS)[0]


def test_sharded_equals_single(make_hf_checkpoint):
    single, _ = make_hf_checkpoint("tiny-moe", name="single", seed=3)
    sharded, _ = make_hf_checkpoint("tiny-moe", name="sharded", seed=3, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert torch.equal(logits(single), logits(sharded))


def test_bf16_checkpoint_loads_as_bf16_values(make_hf_checkpoint):
    folder, hf = make_hf_checkpoint("tiny", dtype=torch.bfloat16)
    model = open_checkpoint(folder).load_model(progress=False)
    want = hf.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16).float()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, want)


def _rewrite(folder, edit):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor(make_hf_checkpoint):
    folder, _ = make_hf_checkpoint("tiny")
    _rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.bias.*\[32\]"):
        open_checkpoint(folder).load_model(progress=False)


def test_unexpected_tensor(make_hf_checkpoint):
    folder, _ = make_hf_checkpoint("tiny")
    _rewrite(folder, lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.7\.mlp\.up_proj\.weight"):
        open_checkpoint(folder).load_model(progress=False)


def test_wrong_shape(make_hf_checkpoint):
    folder, _ = make_hf_checkpoint("tiny")
    _rewrite(folder, lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \[63\], expected \[64\]"):
        open_checkpoint(folder).load_model(progress=False)


def test_truncated_safetensors(make_hf_checkpoint):
    folder, _ = make_hf_checkpoint("tiny")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        open_checkpoint(folder).load_model(progress=False)


def test_missing_shard(make_hf_checkpoint):
    folder, _ = make_hf_checkpoint("tiny", max_shard_size="100KB")
    victim = sorted(folder.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        open_checkpoint(folder)


def test_wrong_file_type(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_checkpoint(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match="neither a GGUF file nor a .safetensors"):
        open_checkpoint(txt)
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_truncated_gguf(tmp_path, real_gguf):
    bad = tmp_path / "cut.gguf"
    with open(real_gguf, "rb") as src:
        bad.write_bytes(src.read(1_000_000))
    with pytest.raises(CheckpointError, match="cut.gguf"):
        open_checkpoint(bad).load_model(progress=False)


def test_inconsistent_config_rejected(make_hf_checkpoint):
    folder, _ = make_hf_checkpoint("tiny")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_key_value_heads"] = 3  # 4 query heads are not a multiple of 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: num_attention_heads 4 is not a multiple"):
        open_checkpoint(folder)


def test_config_ignores_unknown_keys_and_roundtrips():
    for name in ("0.5b", "1.5b", "7b", "72b", "57b-a14b", "tiny-moe", "tiny-yarn", "tiny-dca"):
        cfg = from_name(name)
        d = cfg.to_hf_config() | {"some_future_key": 1, "use_sliding_window": False, "sliding_window": 4096}
        assert ModelArgs.from_hf_config(d) == cfg


def test_size_registry_errors():
    with pytest.raises(ConfigError, match="valid sizes: 0.5b, 1.5b, 7b, 72b, 57b-a14b"):
        from_name("3b")
    assert from_name("72b", "base").rms_norm_eps == 1e-5
    assert from_name("72b").rms_norm_eps == 1e-6
    assert from_name("7b", "base").max_position_embeddings == 131072
    assert from_name("7b").eos_token_id == 151645 and from_name("7b", "base").eos_token_id == 151643


def test_size_conflicts_with_checkpoint(make_hf_checkpoint, tmp_path):
    folder, _ = make_hf_checkpoint("tiny")
    with pytest.raises(ConfigError, match="--size 7b conflicts"):
        resolve_checkpoint("7b", folder)


def test_no_checkpoint_for_size_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="--checkpoint PATH.*--random-weights"):
        resolve_checkpoint("7b")
    assert resolve_checkpoint("7b", random_weights=True).kind == "random"


def test_cli_gives_one_line_error_not_traceback(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "qwen2_ref", "generate", "--checkpoint", str(bad), "--prompt", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {bad}: not a GGUF file (magic b'nope', expected b'GGUF')"]
    r = subprocess.run([sys.executable, "-m", "qwen2_ref", "generate", "--size", "3b", "--prompt", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "'3b' is not one of" in r.stderr


def test_fast_gguf_reader_reads_what_gguf_reads(tmp_path):
    """The reader GGUFSource uses (gguf's, with its per-element hot paths rewritten) returns the same fields, values
    and tensors as gguf.GGUFReader, on a file with string, int and float arrays."""
    import gguf

    from qwen2_ref.weights import _fast_gguf_reader
    from tests.damaged import write_tiny_gguf

    path = str(write_tiny_gguf(tmp_path / "t.gguf"))
    fast, stock = _fast_gguf_reader()(path), gguf.GGUFReader(path)
    assert list(fast.fields) == list(stock.fields) and "tokenizer.ggml.tokens" in fast.fields
    for key, f in fast.fields.items():
        g = stock.fields[key]
        assert f.contents() == g.contents() and f.types == g.types and f.data == g.data, key
        assert [p.tobytes() for p in f.parts] == [p.tobytes() for p in g.parts], key
    assert fast.data_offset == stock.data_offset
    for t, u in zip(fast.tensors, stock.tensors, strict=True):
        assert (t.name, t.tensor_type, t.data_offset, t.shape.tolist()) == \
            (u.name, u.tensor_type, u.data_offset, u.shape.tolist())
        assert t.data.tobytes() == u.data.tobytes()
