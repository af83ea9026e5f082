"""Weight sources: lazy, per-tensor access to Hugging Face safetensors (single or sharded) and GGUF files.

Every source exposes checkpoint tensors under Hugging Face names, so the model, the exporters and the reports all
speak one naming. Nothing here reads a whole checkpoint into memory: safetensors tensors are read with positioned
reads (no memory map: a mapped checkpoint keeps every page it touched resident), and GGUF tensors are dequantized
one at a time, in row blocks (a stacked GGUF expert tensor one expert at a time).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .config import ModelArgs
from .errors import CheckpointError, read_json


class WeightSource(Protocol):
    path: Path

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


# ---- the tensors a config needs -------------------------------------------------------------------------------
def expected_tensors(cfg: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape for every tensor a checkpoint of `cfg` must hold."""
    h, hd, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    t: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (nq * hd, h), p + "self_attn.q_proj.bias": (nq * hd,),
                  p + "self_attn.k_proj.weight": (nkv * hd, h), p + "self_attn.k_proj.bias": (nkv * hd,),
                  p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.v_proj.bias": (nkv * hd,),
                  p + "self_attn.o_proj.weight": (h, nq * hd)})
        if cfg.is_sparse_layer(i):
            m, si = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
            t[p + "mlp.gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                q = f"{p}mlp.experts.{e}."
                t.update({q + "gate_proj.weight": (m, h), q + "up_proj.weight": (m, h), q + "down_proj.weight": (h, m)})
            t.update({p + "mlp.shared_expert.gate_proj.weight": (si, h), p + "mlp.shared_expert.up_proj.weight": (si, h),
                      p + "mlp.shared_expert.down_proj.weight": (h, si), p + "mlp.shared_expert_gate.weight": (1, h)})
        else:
            f = cfg.intermediate_size
            t.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                      p + "mlp.down_proj.weight": (h, f)})
    return t


_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def param_slot(name: str) -> tuple[str, int | None]:
    """Checkpoint name -> (model parameter name, index into its stacked first dim or None)."""
    m = _EXPERT.match(name)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return name, None


def validate(source: WeightSource, cfg: ModelArgs) -> list[str]:
    """Check names and shapes against `cfg`; returns the names to load (a tied checkpoint's stray head is skipped)."""
    want = expected_tensors(cfg)
    have = set(source.names())
    skip = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = [n for n in want if n not in have]
    unexpected = sorted(n for n in have - set(want) - skip if not n.endswith("rotary_emb.inv_freq"))
    where = source.path
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]}{more}: expected shape {list(want[missing[0]])} "
                              f"for this config")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}{more}: not part of a "
                              f"{cfg.model_type} model with {cfg.num_hidden_layers} layers")
    for n, shape in want.items():
        found = tuple(source.shape(n))
        if found != shape:
            raise CheckpointError(f"{where}: tensor {n} has shape {list(found)}, expected {list(shape)}")
    return list(want)


# ---- safetensors ------------------------------------------------------------------------------------------------
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def parse_safetensors_header(raw: bytes, n: int, file_size: int, where: object
                             ) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """A safetensors header (`n` = its declared length, `raw` = its bytes) checked against a `file_size`-byte file:
    name -> (dtype, shape, absolute byte offset, byte length). Every way a header can be damaged (length, JSON,
    types, unknown dtype, offsets that run backwards, overlap or leave the file, a byte length that disagrees with
    dtype x shape) is a CheckpointError naming `where` and the tensor; nothing else escapes."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{where}: not a valid safetensors file: {msg}")

    if not 2 <= n <= min(file_size - 8, MAX_HEADER) or len(raw) != n:
        raise bad(f"header length {n} does not fit a {file_size}-byte file")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    base = 8 + n
    out: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, h in header.items():
        if name == "__metadata__":
            if not isinstance(h, dict):
                raise bad("__metadata__ is not an object")
            continue
        if not isinstance(h, dict):
            raise bad(f"entry for tensor {name} is not an object")
        dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise bad(f"tensor {name} has dtype {dtype!r}; expected one of {', '.join(_ST_DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
            raise bad(f"tensor {name} has shape {str(shape)[:40]}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"tensor {name} has data_offsets {str(offsets)[:40]}; expected [begin, end]")
        start, end = offsets
        if not 0 <= start <= end:
            raise bad(f"tensor {name} has data_offsets [{start}, {end}] that run backwards")
        if base + end > file_size:
            raise bad(f"truncated: tensor {name} ends at byte {base + end}, the file has {file_size}")
        want = _ST_DTYPES[dtype].itemsize
        for d in shape:
            want *= d
        if end - start != want:
            raise bad(f"tensor {name} holds {end - start} bytes, but {dtype} {shape} needs {want}")
        out[name] = (_ST_DTYPES[dtype], tuple(shape), base + start, end - start)
    spans = sorted((o, o + ln, name) for name, (_, _, o, ln) in out.items() if ln)
    for (_, e0, a), (s1, _, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise bad(f"tensors {a} and {b} overlap")
    return out


class SafetensorsSource:
    """A single `model.safetensors`, a sharded folder (`model.safetensors.index.json`), or one `.safetensors` file.

    Tensors are read with positioned reads, not memory maps: a mapped checkpoint keeps every page it touched
    resident, so streaming a 15 GB checkpoint through an mmap shows up as 15 GB of RSS.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.is_file():
            files, index = [self.path], None
        else:
            index_path = self.path / "model.safetensors.index.json"
            single = self.path / "model.safetensors"
            if index_path.exists():
                raw_index = read_json(index_path)
                weight_map = raw_index.get("weight_map") if isinstance(raw_index, dict) else None
                if not isinstance(weight_map, dict) or not all(
                        isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()):
                    raise CheckpointError(f"{index_path}: not a valid safetensors index (expected "
                                          '{"weight_map": {tensor name: shard file name in this folder}})')
                index = {n: self.path / f for n, f in weight_map.items()}
                files = sorted(set(index.values()))
            elif single.exists():
                files, index = [single], None
            else:
                files, index = sorted(self.path.glob("*.safetensors")), None
                if not files:
                    raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        # name -> (file, dtype, shape, absolute byte offset, byte length)
        self._info: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard named in the index is missing")
            for n, info in self._read_header(f).items():
                if index is not None and index.get(n) != f:
                    continue
                self._info[n] = info
        for n, f in (index or {}).items():
            if n not in self._info:
                raise CheckpointError(f"{f}: tensor {n} is listed in the index but not stored in the shard")

    @staticmethod
    def _read_header(f: Path) -> dict:
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                raw = fh.read(n) if 2 <= n <= min(size - 8, MAX_HEADER) else b""
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read ({e.strerror or e})") from None
        return {name: (f, *info) for name, info in parse_safetensors_header(raw, n, size, f).items()}

    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][2]

    def get(self, name: str) -> torch.Tensor:
        shape = self._info[name][2]
        return self.get_rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, read without touching the rest of the file."""
        f, dtype, shape, offset, length = self._info[name]
        rows = shape[0] if shape else 1
        stop = min(stop, rows)
        row_bytes = length // rows if rows else 0
        buf = bytearray((stop - start) * row_bytes)
        try:
            with open(f, "rb", buffering=0) as fh:
                fh.seek(offset + start * row_bytes)
                got = fh.readinto(buf)
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None
        if got != len(buf):
            raise CheckpointError(f"{f}: truncated while reading tensor {name}")
        if not buf:
            return torch.empty((0,) + tuple(shape[1:]), dtype=dtype)
        t = torch.frombuffer(buf, dtype=dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{f}: tensor {name} holds non-finite values (NaN or inf); the file is damaged")
        return t.reshape((stop - start,) + tuple(shape[1:])) if shape else t.reshape(())


# ---- GGUF -------------------------------------------------------------------------------------------------------
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight", "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_GGUF_EXPERTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                 "ffn_down_exps.weight": "down_proj"}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def gguf_to_hf(name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (None for a stacked expert tensor, which maps to many)."""
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None


_GGUF_ROWS = 4096


@functools.cache  # one class, built on the first GGUF opened
def _fast_gguf_reader():
    """gguf's GGUFReader with two hot paths rewritten, same fields and tensors: its per-element reads go through
    np.memmap.__getitem__ (slow Python), and an array-valued field is read one element at a time; a Qwen2 GGUF
    holds 151,936 tokens, as many token types and 151,387 merges, so opening the real 0.5B took 16 s, before any
    work. Here reads slice a plain ndarray view of the same map, and arrays of strings or scalars are walked in
    one loop with bounds checks (a damaged length is a ValueError, as the stock reader's would be, never a read
    past the end). Big-endian files take the stock path."""
    import gguf

    scalar = gguf.GGUFReader.gguf_scalar_to_np
    array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING

    class Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None or plain.size != self.data.size:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            dt = np.dtype(dtype)
            arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != array or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            if len(raw_itype) != 1 or len(alen) != 1:
                raise ValueError("GGUF array header runs past the end of the file")
            itype, n = int(raw_itype[0]), int(alen[0])
            if itype != string and itype not in [int(t) for t in scalar]:
                return super()._get_field_parts(orig_offs, raw_type)
            plain, size = self._plain, self._plain.size
            offs = orig_offs + 12
            parts: list = [raw_itype, alen]
            if itype == string:
                mv = memoryview(plain)
                for _ in range(n):
                    if offs + 8 > size:
                        raise ValueError("GGUF string array runs past the end of the file")
                    slen = int.from_bytes(mv[offs:offs + 8], "little")
                    if offs + 8 + slen > size:
                        raise ValueError("GGUF string runs past the end of the file")
                    parts += (plain[offs:offs + 8].view(np.uint64), plain[offs + 8:offs + 8 + slen])
                    offs += 8 + slen
                idxs = list(range(3, 2 + 2 * n + 1, 2))
            else:
                dt = np.dtype(scalar[gguf.GGUFValueType(itype)])
                if offs + n * dt.itemsize > size:
                    raise ValueError("GGUF array runs past the end of the file")
                values = plain[offs:offs + n * dt.itemsize].view(dt)
                parts += [values[i:i + 1] for i in range(n)]
                offs += n * dt.itemsize
                idxs = list(range(2, 2 + n))
            return offs - orig_offs, parts, idxs, [gguf.GGUFValueType(raw_type), gguf.GGUFValueType(itype)]

    return Reader


class GGUFSource:
    """A GGUF file read with llama.cpp's `gguf` package; tensors dequantized to fp32 on demand."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        self._gguf = gguf
        try:
            with open(self.path, "rb") as fh:
                magic = fh.read(4)
            if magic != b"GGUF":
                raise CheckpointError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
            self.reader = _fast_gguf_reader()(str(self.path))
        except CheckpointError:
            raise
        except Exception as e:  # truncated files surface as numpy / struct errors from the reader
            raise CheckpointError(f"{self.path}: cannot read GGUF file, truncated or corrupt ({e})") from None
        self._index: dict[str, tuple[object, int | None]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for t in self.reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml order -> row-major
            hf = gguf_to_hf(t.name)
            m = re.match(r"^blk\.(\d+)\.(.+)$", t.name)
            if hf is not None:
                if hf.endswith("shared_expert_gate.weight") and len(shape) == 1:
                    shape = (1, shape[0])
                self._index[hf], self._shapes[hf] = (t, None), shape
            elif m and m.group(2) in _GGUF_EXPERTS:
                for e in range(shape[0]):
                    n = f"model.layers.{m.group(1)}.mlp.experts.{e}.{_GGUF_EXPERTS[m.group(2)]}.weight"
                    self._index[n], self._shapes[n] = (t, e), shape[1:]
            else:
                self._index[t.name], self._shapes[t.name] = (t, None), shape  # reported as unexpected

    def metadata(self) -> dict[str, object]:
        """Scalar and string key/values (token arrays are left out; see `field`)."""
        out = {}
        for k, f in self.reader.fields.items():
            if k.startswith("tokenizer.ggml.") and k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                          "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
                continue
            try:
                out[k] = f.contents()
            except Exception:
                continue
        return out

    def field(self, key: str):
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def tensor_type(self, name: str) -> str:
        return self._index[name][0].tensor_type.name

    def get(self, name: str) -> torch.Tensor:
        return self.get_rows(name, 0, self._shapes[name][0] if self._shapes[name] else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t, expert = self._index[name]
        data = np.asarray(t.data if expert is None else t.data[expert])
        shape = self._shapes[name]
        if len(shape) <= 1:
            return torch.from_numpy(np.array(self._dequantize(t, data.reshape(1, -1)), dtype=np.float32).reshape(shape))
        src = data.reshape(shape[0], -1)
        stop = min(stop, shape[0])
        out = np.empty((stop - start,) + tuple(shape[1:]), dtype=np.float32)
        rows = out.reshape(stop - start, -1)
        # Row blocks keep the dequantizer's temporaries small (a 151936-row embedding would need ~2 GB at once).
        for r in range(start, stop, _GGUF_ROWS):
            e = min(stop, r + _GGUF_ROWS)
            rows[r - start:e - start] = self._dequantize(t, src[r:e])
        return torch.from_numpy(out)

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        """(GGUF type name, raw bytes (rows, bytes per row)) — for carrying quantized blocks over exactly."""
        t, expert = self._index[name]
        data = np.asarray(t.data if expert is None else t.data[expert])
        return t.tensor_type.name, data.reshape(self._shapes[name][0], -1)

    def _dequantize(self, t, data: np.ndarray) -> np.ndarray:
        try:
            with np.errstate(all="ignore"):  # damaged scales: reported below as one error, not numpy warnings
                out = self._gguf.quants.dequantize(data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {t.name} ({e})") from None
        if not np.isfinite(out).all():
            raise CheckpointError(f"{self.path}: tensor {t.name} holds non-finite values (NaN or inf) after "
                                  "dequantization; the file is damaged")
        return out


# ---- random weights ---------------------------------------------------------------------------------------------
class RandomSource:
    """Deterministic random weights under Hugging Face names, generated in fixed row blocks from (seed, name, block),
    so any slice, any layer count and any consumer (reference model, streaming exporter) sees the same values.
    Norm weights 1 + N(0, 0.1), biases N(0, 0.1), matrices N(0, 0.02): zeros and ones would hide bugs."""

    ROWS = 256

    def __init__(self, cfg: ModelArgs, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.path = Path(f"<random weights, seed {seed}>")
        self._shapes = expected_tensors(cfg)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        return self.get_rows(name, 0, shape[0]).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        import zlib

        shape = self._shapes[name]
        stop = min(stop, shape[0])
        width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if name.endswith("norm.weight"):
            mean, std = 1.0, 0.1
        elif name.endswith("bias"):
            mean, std = 0.0, 0.1
        else:
            mean, std = 0.0, 0.02
        parts = []
        for b in range(start // self.ROWS, -(-stop // self.ROWS)):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + b)
                                              % (2**63 - 1))
            lo, hi = b * self.ROWS, min(shape[0], (b + 1) * self.ROWS)
            block = torch.randn(hi - lo, width, generator=g) * std + mean
            parts.append(block[max(start, lo) - lo: min(stop, hi) - lo])
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out.reshape((stop - start,) + tuple(shape[1:])) if len(shape) > 1 else out.reshape(-1)


# ---- filling a model --------------------------------------------------------------------------------------------
def load_into(model: torch.nn.Module, source: WeightSource, cfg: ModelArgs, progress: bool = True) -> None:
    """Copy every checkpoint tensor into `model` (converted to the model's dtype), one tensor at a time."""
    from .progress import track

    params = dict(model.named_parameters(remove_duplicate=False))
    names = validate(source, cfg)
    it = track(names, f"loading {source.path.name}", unit="tensors") if progress else names
    with torch.no_grad():
        for n in it:
            pname, idx = param_slot(n)
            dst = params[pname] if idx is None else params[pname][idx]
            dst.copy_(source.get(n).to(dst.dtype))
