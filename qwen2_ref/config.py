"""Model configuration: one frozen class with Hugging Face `config.json` field names, and the registry of sizes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """YaRN (`rope_scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`)."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.rope_type, "rope_type": self.rope_type, "factor": self.factor,
             "original_max_position_embeddings": self.original_max_position_embeddings,
             "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
        if self.attention_factor is not None:
            d["attention_factor"] = self.attention_factor
        return d


@dataclass(frozen=True)
class DualChunkConfig:
    """Dual Chunk Attention (`dual_chunk_attention_config`): chunk_size c, local_size w, chunk length s = c - w."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int | None = None

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    def to_dict(self) -> dict[str, Any]:
        d = {"chunk_size": self.chunk_size, "local_size": self.local_size}
        if self.original_max_position_embeddings is not None:
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        return d


@dataclass(frozen=True)
class ModelArgs:
    """A Qwen2 / Qwen2-MoE configuration. Field names are Hugging Face's, so `config.json` maps one to one."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    rope_scaling: RopeScaling | None = None
    dual_chunk_attention_config: DualChunkConfig | None = None
    # Qwen2-MoE; num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def model_type(self) -> str:
        return "qwen2_moe" if self.is_moe else "qwen2"

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """transformers' rule: sparse iff not in mlp_only_layers and (layer_idx + 1) % decoder_sparse_step == 0."""
        return (self.is_moe and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def num_parameters(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        attn = h * h + h + 2 * (h * self.num_key_value_heads * hd + self.num_key_value_heads * hd) + h * h
        dense_mlp = 3 * h * self.intermediate_size
        total = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for i in range(self.num_hidden_layers):
            if self.is_sparse_layer(i):
                mlp = (self.num_experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
                       + 3 * h * self.shared_expert_intermediate_size + h)
            else:
                mlp = dense_mlp
            total += attn + mlp + 2 * h
        return total

    # ---- checks --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name, most in (("vocab_size", 2**24), ("hidden_size", 2**17), ("intermediate_size", 2**20),
                           ("num_hidden_layers", 1024), ("num_attention_heads", 1024), ("num_experts", 1024),
                           ("moe_intermediate_size", 2**20), ("shared_expert_intermediate_size", 2**20)):
            need(getattr(self, name) <= most, f"{name} {getattr(self, name)} is beyond any Qwen2 model (at most {most})")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} is not a multiple of "
             f"num_key_value_heads {self.num_key_value_heads}")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        need(self.rope_theta > 0 and self.rms_norm_eps > 0, "rope_theta and rms_norm_eps must be positive")
        if self.is_moe:
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts ({self.num_experts})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive for a MoE model")
            need(self.decoder_sparse_step > 0, "decoder_sparse_step must be positive")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            need(not bad, f"mlp_only_layers {bad} are outside 0..{self.num_hidden_layers - 1}")
        rs = self.rope_scaling
        if rs is not None:
            need(rs.rope_type == "yarn", f"rope_scaling type {rs.rope_type!r} is not supported (only 'yarn')")
            need(rs.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {rs.factor}")
            need(rs.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings must be > 0")
        dca = self.dual_chunk_attention_config
        if dca is not None:
            need(0 <= dca.local_size < dca.chunk_size,
                 f"dual_chunk_attention_config: local_size {dca.local_size} must be in 0..chunk_size-1 "
                 f"({dca.chunk_size - 1})")

    # ---- (de)serialization --------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        """Build from a Hugging Face `config.json` dict; unknown keys are ignored, wrong types and inconsistent
        values rejected with a ConfigError that names the key (never a TypeError from deep inside)."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"config.json must hold a JSON object, got {_kind(cfg)}")
        mt = cfg.get("model_type", "qwen2")
        if mt not in ("qwen2", "qwen2_moe"):
            raise ConfigError(f"model_type {mt!r} is not a Qwen2 model (expected 'qwen2' or 'qwen2_moe')")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = cfg.get(f.name)
            if v is None or f.name in ("rope_scaling", "dual_chunk_attention_config"):
                continue
            if f.name == "eos_token_id" and isinstance(v, list):  # generation may stop on several ids
                if not v:
                    raise ConfigError("eos_token_id is an empty list; expected a token id or a list of them")
                v = [_typed(f"eos_token_id[{i}]", x, int) for i, x in enumerate(v)][0]
            elif f.name == "mlp_only_layers":
                if not isinstance(v, list):
                    raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {_kind(v)}")
                v = tuple(_typed(f"mlp_only_layers[{i}]", x, int) for i, x in enumerate(v))
            else:
                v = _typed(f.name, v, _FIELD_TYPES[f.name])
            kw[f.name] = v
        if "num_key_value_heads" not in kw and "num_attention_heads" in kw:
            kw["num_key_value_heads"] = kw["num_attention_heads"]
        rs = _section(cfg, "rope_scaling")
        if rs:
            rtype = rs.get("rope_type", rs.get("type"))
            if rtype not in (None, "default"):
                if not isinstance(rtype, str):
                    raise ConfigError(f"rope_scaling.rope_type must be a string, got {_kind(rtype)}")
                opt = lambda key, typ, default: (default if rs.get(key) is None  # noqa: E731
                                                 else _typed(f"rope_scaling.{key}", rs[key], typ))
                kw["rope_scaling"] = RopeScaling(
                    rope_type=rtype, factor=opt("factor", float, 1.0),
                    original_max_position_embeddings=(opt("original_max_position_embeddings", int, 0)
                                                      or kw.get("max_position_embeddings", 32768)),
                    beta_fast=opt("beta_fast", float, 32.0) or 32.0, beta_slow=opt("beta_slow", float, 1.0) or 1.0,
                    attention_factor=opt("attention_factor", float, None))
        dca = _section(cfg, "dual_chunk_attention_config")
        if dca:
            for key in ("chunk_size", "local_size"):
                if key not in dca:
                    raise ConfigError(f"dual_chunk_attention_config lacks {key}")
            omp = dca.get("original_max_position_embeddings")
            kw["dual_chunk_attention_config"] = DualChunkConfig(
                chunk_size=_typed("dual_chunk_attention_config.chunk_size", dca["chunk_size"], int),
                local_size=_typed("dual_chunk_attention_config.local_size", dca["local_size"], int),
                original_max_position_embeddings=None if omp is None else _typed(
                    "dual_chunk_attention_config.original_max_position_embeddings", omp, int))
        if mt == "qwen2_moe":
            kw.setdefault("num_experts", 60)
        else:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
                kw.pop(k, None)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in kw]
        if missing:
            raise ConfigError(f"config.json lacks required keys: {', '.join(missing)}")
        hd = cfg.get("head_dim")
        if hd is not None and _typed("head_dim", hd, int) != kw["hidden_size"] // kw["num_attention_heads"]:
            raise ConfigError(f"head_dim {hd} disagrees with hidden_size / num_attention_heads = "
                              f"{kw['hidden_size'] // kw['num_attention_heads']}")
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` transformers writes for this model (Qwen2Config / Qwen2MoeConfig)."""
        d: dict[str, Any] = {
            "architectures": ["Qwen2MoeForCausalLM" if self.is_moe else "Qwen2ForCausalLM"],
            "model_type": self.model_type, "hidden_act": "silu", "attention_dropout": 0.0,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": self.num_hidden_layers,
            "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
        }
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("rope_scaling", "dual_chunk_attention_config"):
                if v is not None:
                    d[f.name] = v.to_dict()
                elif f.name == "rope_scaling":
                    d[f.name] = None
                continue
            if not self.is_moe and f.name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                               "shared_expert_intermediate_size", "norm_topk_prob",
                                               "decoder_sparse_step", "mlp_only_layers"):
                continue
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


# ---- typed reading of config.json values ----------------------------------------------------------------------
_FIELD_TYPES: dict[str, type] = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
    "num_attention_heads": int, "num_key_value_heads": int, "max_position_embeddings": int, "rope_theta": float,
    "rms_norm_eps": float, "tie_word_embeddings": bool, "bos_token_id": int, "eos_token_id": int,
    "num_experts": int, "num_experts_per_tok": int, "moe_intermediate_size": int,
    "shared_expert_intermediate_size": int, "norm_topk_prob": bool, "decoder_sparse_step": int,
}
_BIGGEST = 2**40  # no dimension, id or length of a real model comes near this; larger values are damage


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _typed(key: str, v: Any, typ: type) -> Any:
    """`v` as `typ` (int: an integer, or a float with an integral value; float: any finite number; bool: a boolean),
    else a ConfigError naming `key`."""
    if typ is bool:
        if isinstance(v, bool):
            return v
    elif typ is int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            if abs(v) > _BIGGEST:
                raise ConfigError(f"{key} is {v}, far beyond any Qwen2 model")
            return v
    elif typ is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v) or abs(v) > 1e30:
                raise ConfigError(f"{key} must be a finite number, got {v}")
            return float(v)
    expected = {bool: "true or false", int: "an integer", float: "a number"}[typ]
    raise ConfigError(f"{key} must be {expected}, got {_kind(v)} {json_repr(v)}")


def json_repr(v: Any, limit: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _section(cfg: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    v = cfg.get(key)
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ConfigError(f"{key} must be an object or null, got {_kind(v)} {json_repr(v)}")
    return v


# ---- the published sizes ---------------------------------------------------------------------------------------
_COMMON = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=151643)

SIZES: dict[str, ModelArgs] = {
    # 494M parameters (0.36B without embeddings)
    "0.5b": ModelArgs(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, **_COMMON),
    # 1.54B
    "1.5b": ModelArgs(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, **_COMMON),
    # 7.62B
    "7b": ModelArgs(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, **_COMMON),
    # 72.7B
    "72b": ModelArgs(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, **_COMMON),
    # 57.4B total, 14.2B active: 64 routed experts (top-8) + a shared expert in every layer
    "57b-a14b": ModelArgs(vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                          num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                          shared_expert_intermediate_size=20480, norm_topk_prob=False, decoder_sparse_step=1,
                          **_COMMON),
}
VARIANTS = ("instruct", "base")

# Tiny random configurations for tests: every code path, seconds to run. Not published models.
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
             eos_token_id=2)
TINY: dict[str, ModelArgs] = {
    "tiny": ModelArgs(tie_word_embeddings=True, **_TINY),
    "tiny-untied": ModelArgs(tie_word_embeddings=False, **_TINY),
    "tiny-moe": ModelArgs(**{**_TINY, "num_hidden_layers": 4}, num_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=32, shared_expert_intermediate_size=96, norm_topk_prob=False,
                          decoder_sparse_step=1),
    "tiny-yarn": ModelArgs(**{**_TINY, "max_position_embeddings": 256},
                           rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=64)),
    "tiny-dca": ModelArgs(**_TINY, dual_chunk_attention_config=DualChunkConfig(chunk_size=16, local_size=4)),
}


def from_name(name: str, variant: str = "instruct") -> ModelArgs:
    """A published size (`0.5b`, `1.5b`, `7b`, `72b`, `57b-a14b`) or a tiny test config, matched exactly."""
    key = name.strip().lower()
    if key in TINY:
        return TINY[key]
    if key not in SIZES:
        raise ConfigError(f"unknown size {name!r}; valid sizes: {', '.join(SIZES)} (tests: {', '.join(TINY)})")
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    cfg = SIZES[key]
    if variant == "instruct":
        return cfg.replace(eos_token_id=151645, max_position_embeddings=32768)
    # Base checkpoints: eos = <|endoftext|>, 128K positions; 72B base uses rms eps 1e-5.
    return cfg.replace(eos_token_id=151643, max_position_embeddings=131072,
                       rms_norm_eps=1e-5 if key == "72b" else cfg.rms_norm_eps)


def size_of(cfg: ModelArgs) -> str | None:
    """The registry name whose architecture `cfg` has (ignoring variant fields), or None."""
    arch = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_experts", "moe_intermediate_size")
    for name, ref in SIZES.items():
        if all(getattr(ref, a) == getattr(cfg, a) for a in arch):
            return name
    return None


def from_gguf_metadata(meta: Mapping[str, Any], vocab_size: int, has_output: bool) -> ModelArgs:
    """Build from GGUF key/values (llama.cpp's `qwen2` / `qwen2moe` architectures).

    `vocab_size` comes from the `token_embd` tensor; `has_output` says whether an `output.weight` head is stored
    (then the head is untied even if the original model tied it).
    """
    arch = meta.get("general.architecture")
    if arch not in ("qwen2", "qwen2moe"):
        raise ConfigError(f"GGUF general.architecture is {arch!r}; expected 'qwen2' or 'qwen2moe'")

    def get(key: str, default: Any = None, typ: type = int) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ConfigError(f"GGUF metadata lacks {arch}.{key}")
        return _typed(f"GGUF metadata {arch}.{key}", v.item() if hasattr(v, "item") else v, typ)

    def tok(key: str, default: int) -> int:
        v = meta.get(f"tokenizer.ggml.{key}", default)
        return _typed(f"GGUF metadata tokenizer.ggml.{key}", v.item() if hasattr(v, "item") else v, int)

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=get("embedding_length"),
        intermediate_size=get("feed_forward_length", 0) or 1,
        num_hidden_layers=get("block_count"), num_attention_heads=get("attention.head_count"),
        num_key_value_heads=get("attention.head_count_kv", meta.get(f"{arch}.attention.head_count")),
        max_position_embeddings=get("context_length"), rope_theta=get("rope.freq_base", 1e6, float),
        # GGUF stores eps as float32: 1e-6 reads back as 9.99999997e-07; round to the value it was written from.
        rms_norm_eps=float(f"{get('attention.layer_norm_rms_epsilon', None, float):.6g}"),
        tie_word_embeddings=not has_output,
        bos_token_id=tok("bos_token_id", 151643), eos_token_id=tok("eos_token_id", 151645),
    )
    if meta.get(f"{arch}.rope.scaling.type") == "yarn":
        kw["rope_scaling"] = RopeScaling("yarn", get("rope.scaling.factor", None, float),
                                         get("rope.scaling.original_context_length"))
    if arch == "qwen2moe":
        kw.update(num_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
                  moe_intermediate_size=get("expert_feed_forward_length"),
                  shared_expert_intermediate_size=get("expert_shared_feed_forward_length", 0),
                  norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", False)))
    return ModelArgs(**kw)
