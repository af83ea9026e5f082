"""Tokenizer: Hugging Face `tokenizer.json` when a checkpoint has one, otherwise rebuilt from GGUF metadata.

Qwen2 uses byte-level BPE with a regex pre-tokenizer; GGUF stores the vocabulary, merges, token types and chat
template, which is everything `tokenizers` needs to rebuild the same tokenizer. Saved as `tokenizer.json` +
`tokenizer_config.json`, the format transformers' `AutoTokenizer` and swift-transformers read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, \
    processors

from .errors import CheckpointError, read_json

# The split regex of Qwen2's tokenizer.json (llama.cpp `pre=qwen2`).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF token types (llama.cpp `gguf.TokenType`)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


class Tokenizer:
    def __init__(self, tk: HFTokenizer, config: dict[str, Any]):
        self.tk = tk
        self.config = config

    # ---- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise CheckpointError(f"{path}: no tokenizer.json")
        try:
            tk = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise CheckpointError(f"{tj}: not a readable tokenizer.json ({e})") from None
        cfg_path = path / "tokenizer_config.json"
        config = read_json(cfg_path) if cfg_path.exists() else {}
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object")
        return cls(tk, config)

    @classmethod
    def from_gguf(cls, src) -> "Tokenizer":
        """From a `GGUFSource` whose `tokenizer.ggml.model` is `gpt2` (byte-level BPE)."""
        model = src.field("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{src.path}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) "
                                  "tokenizers can be rebuilt")
        tokens, types, merges = (src.field(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
        if not (isinstance(tokens, list) and isinstance(types, list) and isinstance(merges, list)
                and len(tokens) == len(types) and all(isinstance(t, str) for t in tokens)
                and all(isinstance(t, int) for t in types) and all(isinstance(m, str) for m in merges)):
            raise CheckpointError(f"{src.path}: GGUF tokenizer metadata is damaged (tokenizer.ggml.tokens, "
                                  "token_type and merges must be lists of strings / ints of matching length)")
        try:
            return cls._from_gguf_lists(src, tokens, types, merges)
        except CheckpointError:
            raise
        except Exception as e:  # damaged metadata surfaces as index/type errors from the lists or tokenizers
            raise CheckpointError(f"{src.path}: GGUF tokenizer metadata is damaged ({type(e).__name__}: "
                                  f"{str(e)[:80]})") from None

    @classmethod
    def _from_gguf_lists(cls, src, tokens: list[str], types: list[int], merges_text: list[str]) -> "Tokenizer":
        merges = [tuple(m.split(" ", 1)) for m in merges_text]
        vocab = {t: i for i, t in enumerate(tokens) if types[i] == _NORMAL}
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                                    byte_fallback=False, dropout=None))
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        tk.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        added: dict[str, Any] = {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty not in (_CONTROL, _USER_DEFINED):
                continue
            special = ty == _CONTROL
            tok = AddedToken(t, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            (tk.add_special_tokens if special else tk.add_tokens)([tok])
            got = tk.token_to_id(t)
            if got != i:
                raise CheckpointError(f"{src.path}: added token {t!r} got id {got}, GGUF says {i}")
            added[str(i)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": special}

        def tok(key: str) -> str | None:
            i = src.field(key)
            return None if i is None else tokens[int(i)]

        config = {
            "add_bos_token": bool(src.field("tokenizer.ggml.add_bos_token") or False),
            "add_prefix_space": False, "added_tokens_decoder": added,
            "bos_token": None, "eos_token": tok("tokenizer.ggml.eos_token_id"),
            "pad_token": tok("tokenizer.ggml.padding_token_id"), "unk_token": None,
            "chat_template": src.field("tokenizer.chat_template"),
            "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
            "model_max_length": int(src.field(f"{src.field('general.architecture')}.context_length") or 32768),
            "tokenizer_class": "Qwen2Tokenizer",
        }
        return cls(tk, config)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")

    # ---- use --------------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end generation: the configured eos plus <|endoftext|> / <|im_end|> when present."""
        ids = []
        for t in (self.config.get("eos_token"), "<|im_end|>", "<|endoftext|>"):
            if isinstance(t, dict):
                t = t.get("content")
            i = self.tk.token_to_id(t) if t else None
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        template = self.config.get("chat_template")
        if not template:
            raise CheckpointError("this tokenizer has no chat template; drop --chat or use an Instruct checkpoint")
        return render_chat(template, messages, add_generation_prompt,
                           eos_token=self.config.get("eos_token"), bos_token=self.config.get("bos_token"))


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool, **special: Any) -> str:
    """Render a Hugging Face chat template with the same Jinja settings transformers uses."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            tools=None, **special)
