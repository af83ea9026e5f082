"""Property-based tests of the readers that take untrusted bytes: safetensors headers, GGUF files and config
parsing. Arbitrary bytes and mutated real inputs must end in the project's error type (Qwen2Error) or load;
anything else (a TypeError, an IndexError, a numpy error, a hang) is a bug. Each fuzzer runs at least
FUZZ_EXAMPLES examples, derandomized so that CI sees the same ones every run."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qwen2_ref.checkpoint import open_checkpoint
from qwen2_ref.config import ModelArgs, from_gguf_metadata, from_name
from qwen2_ref.errors import Qwen2Error
from qwen2_ref.weights import parse_safetensors_header
from tests.damaged import write_tiny_gguf, write_tiny_hf

FUZZ_EXAMPLES = 2000
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
# JSON values one level deep: what a damaged config holds (a recursive strategy costs 5x the time per example)
json_values = _scalars | st.lists(_scalars, max_size=3) | st.dictionaries(st.text(max_size=8), _scalars, max_size=3)


def _run(fuzzer) -> int:
    """Run a @given function; return how many examples it saw."""
    seen = [0]
    fuzzer(seen)
    return seen[0]


def _either_loads_or_qwen2error(fn) -> None:
    try:
        fn()
    except Qwen2Error:
        pass


# ---- config.json --------------------------------------------------------------------------------------------------
_REAL_CONFIG = from_name("tiny-moe").to_hf_config() | {"rope_scaling": {"type": "yarn", "factor": 4.0},
                                                        "dual_chunk_attention_config": {"chunk_size": 16,
                                                                                        "local_size": 4}}


_GGUF_META = {"general.architecture": "qwen2", "qwen2.embedding_length": 64, "qwen2.feed_forward_length": 128,
              "qwen2.block_count": 2, "qwen2.attention.head_count": 4, "qwen2.attention.head_count_kv": 2,
              "qwen2.context_length": 4096, "qwen2.rope.freq_base": 1e6,
              "qwen2.attention.layer_norm_rms_epsilon": 1e-6, "qwen2.rope.scaling.type": "yarn",
              "qwen2.rope.scaling.factor": 4.0, "qwen2.rope.scaling.original_context_length": 1024,
              "tokenizer.ggml.eos_token_id": 2}


def test_config_parsing_fuzz():
    """config.json (one key replaced, up to three dropped, or a whole arbitrary value) and GGUF metadata (one key
    replaced, any vocabulary size)."""
    @FUZZ
    @given(key=st.sampled_from(sorted(_REAL_CONFIG) + ["head_dim", "model_type"]), value=json_values,
           drop=st.sets(st.sampled_from(sorted(_REAL_CONFIG)), max_size=3), whole=st.none() | json_values,
           gguf_key=st.sampled_from(sorted(_GGUF_META)), vocab=st.integers(-5, 2**30))
    def fuzz(seen, key, value, drop, whole, gguf_key, vocab):
        seen[0] += 1
        cfg = dict(_REAL_CONFIG) | {key: value}
        for k in drop:
            cfg.pop(k, None)
        _either_loads_or_qwen2error(lambda: ModelArgs.from_hf_config(cfg))
        if whole is not None:
            _either_loads_or_qwen2error(lambda: ModelArgs.from_hf_config(whole))
        _either_loads_or_qwen2error(lambda: from_gguf_metadata(_GGUF_META | {gguf_key: value}, vocab, False))

    assert _run(fuzz) >= FUZZ_EXAMPLES


# ---- safetensors headers ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_safetensors(tmp_path_factory) -> bytes:
    return (write_tiny_hf(tmp_path_factory.mktemp("st") / "ckpt") / "model.safetensors").read_bytes()


def _parse(blob: bytes) -> None:
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else -1
    parse_safetensors_header(blob[8:8 + n] if n > 0 else b"", n, len(blob), "fuzz.safetensors")


def test_safetensors_header_fuzz(real_safetensors):
    """A real header with one entry or field replaced (offsets shifted, the file cut short), or arbitrary bytes
    (behind a plausible length prefix half the time, so that they reach the JSON parser)."""
    n = struct.unpack("<Q", real_safetensors[:8])[0]
    header = json.loads(real_safetensors[8:8 + n])
    names = sorted(header)
    data = real_safetensors[8 + n:]

    @FUZZ
    @given(mutate=st.booleans(), name=st.sampled_from(names),
           field=st.sampled_from(["dtype", "shape", "data_offsets", None]), value=json_values,
           offset_delta=st.integers(-64, 64), cut=st.integers(0, 64), blob=st.binary(max_size=256),
           prefix=st.booleans())
    def fuzz(seen, mutate, name, field, value, offset_delta, cut, blob, prefix):
        seen[0] += 1
        if not mutate:
            if prefix:
                blob = struct.pack("<Q", len(blob)) + blob + b"\0" * 16
            _either_loads_or_qwen2error(lambda: _parse(blob))
            return
        h = json.loads(json.dumps(header))
        if field is None:
            h[name] = value
        elif isinstance(h[name], dict):
            h[name][field] = value
            if field == "data_offsets" and isinstance(value, list) and len(value) == 2 and \
                    all(type(v) is int for v in value):
                h[name][field] = [value[0] + offset_delta, value[1]]
        raw = json.dumps(h).encode()
        blob = struct.pack("<Q", len(raw)) + raw + data
        _either_loads_or_qwen2error(lambda: _parse(blob[: len(blob) - cut]))

    assert _run(fuzz) >= FUZZ_EXAMPLES


# ---- GGUF files ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_gguf_bytes(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def _open_and_read(path: Path) -> None:
    ckpt = open_checkpoint(path)
    for name in ckpt.source.names()[:4]:  # dequantize a few tensors: damaged data must be caught too
        t = ckpt.source.get(name)
        assert t.dtype.is_floating_point and bool(t.isfinite().all())
    ckpt.tokenizer()


def test_gguf_fuzz(real_gguf_bytes, tmp_path):
    """A real tiny GGUF (vocabulary-shaped string, int and float arrays included) with up to four byte runs
    overwritten in its metadata and tensor infos and maybe cut short,
    or arbitrary bytes behind the magic and a version."""
    import gguf

    path = tmp_path / "fuzz.gguf"
    (tmp_path / "real.gguf").write_bytes(real_gguf_bytes)
    header_end = gguf.GGUFReader(str(tmp_path / "real.gguf")).data_offset  # metadata and tensor infos

    @FUZZ
    @given(mutate=st.integers(0, 3), edits=st.lists(st.tuples(st.integers(0, header_end),
                                                               st.binary(min_size=1, max_size=8)), max_size=4),
           cut=st.none() | st.integers(0, len(real_gguf_bytes)), body=st.binary(max_size=128),
           version=st.sampled_from([2, 3, 4, 2**31]))
    def fuzz(seen, mutate, edits, cut, body, version):
        seen[0] += 1
        if mutate:
            b = bytearray(real_gguf_bytes)
            for pos, chunk in edits:
                b[pos:pos + len(chunk)] = chunk
            b = bytes(b[:cut] if cut is not None else b)
        else:
            b = b"GGUF" + struct.pack("<I", version) + body
        path.write_bytes(b)
        _either_loads_or_qwen2error(lambda: _open_and_read(path))

    assert _run(fuzz) >= FUZZ_EXAMPLES


def test_nan_is_not_a_finite_config_value():
    """The fuzzers' float strategy includes NaN and inf; one direct case that the parser refuses them."""
    with pytest.raises(Qwen2Error, match="finite"):
        ModelArgs.from_hf_config(_REAL_CONFIG | {"rope_theta": math.nan})
