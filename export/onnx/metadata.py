"""The files beside `model.onnx` that users' tools read: config.json, generation_config.json, genai_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from qwen2_ref.config import ModelArgs

from ..precision import Precision

# The `transformers_version` config.json and generation_config.json carry. The files are what transformers 4.57
# reads (the tests load them with 4.57.6, pyproject's test extra), but 4.57.2, not 4.57.6: transformers 4.57.3 to
# 4.57.6 use this field to guess whether a local tokenizer was saved with Mistral's broken pre-tokenizer regex, and
# warn ("... with an incorrect regex pattern ... set `fix_mistral_regex=True`") for every large-vocab tokenizer
# whose config.json has no version or one in (4.57.2, 5.0.0), Qwen's own save_pretrained output included
# (huggingface/transformers#44031, fixed upstream by #45444). A non-Mistral model_type with 4.57.2 or earlier is
# trusted. Our tokenizer is Qwen's, converted from the checkpoint, never saved by an affected transformers: 4.57.2
# answers truly what transformers asks. (`fix_mistral_regex=True` would be wrong: it swaps in Mistral's regex.)
TRANSFORMERS_VERSION = "4.57.2"


def eos_ids(cfg: ModelArgs) -> list[int]:
    ids = [cfg.eos_token_id]
    if cfg.vocab_size > 151643 and 151643 not in ids:
        ids.append(151643)  # <|endoftext|> ends base-model text too
    return ids


def write_metadata(folder: Path, cfg: ModelArgs, precision: Precision, context: int) -> None:
    hf = cfg.to_hf_config() | {"torch_dtype": precision.hf_torch_dtype, "use_cache": True,
                               "transformers_version": TRANSFORMERS_VERSION}
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos_ids(cfg), "pad_token_id": cfg.bos_token_id,
           "do_sample": False, "transformers_version": TRANSFORMERS_VERSION}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (folder / "genai_config.json").write_text(json.dumps(genai_config(cfg, context), indent=2) + "\n")


def genai_config(cfg: ModelArgs, context: int) -> dict:
    """onnxruntime-genai's schema (model / decoder / search). The graph concatenates past and new keys, so
    past and present do not share a buffer."""
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id, "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx", "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos_ids(cfg), "pad_token_id": cfg.bos_token_id, "type": "qwen2",
            "vocab_size": cfg.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
