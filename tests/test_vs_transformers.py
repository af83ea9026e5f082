"""The reference against Hugging Face transformers 4.57.6 (eager, fp32), through our own checkpoint loader.

Each case: a tiny random checkpoint written by `save_pretrained` (biases and norm weights randomized), loaded by
`qwen2_ref.checkpoint.open_checkpoint`; prefill then several decode steps with the KV cache; max |Δ logits| <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from qwen2_ref.checkpoint import open_checkpoint
from qwen2_ref.config import from_name
from qwen2_ref.generate import left_pad

from .conftest import FP32_ATOL

DECODE_STEPS = 5


def run_both(folder, hf, prompts, decode_steps=DECODE_STEPS, seed=0):
    """Prefill + decode on both models with the same inputs; returns the max |Δ| over real (non-pad) positions."""
    ours = open_checkpoint(folder).load_model(progress=False)
    ids, mask = left_pad(prompts)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    past, cache = None, DynamicCache()
    with torch.no_grad():
        for step in range(decode_steps + 1):
            a, past = ours(ids, position_ids=pos, attention_mask=mask, past=past)
            b = hf(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            real = mask[:, -ids.shape[1]:].bool()
            assert torch.isfinite(a).all()
            worst = max(worst, (a - b).abs()[real].max().item())
            # next step: one random token per row (feeds decode with logits-independent inputs)
            ids = torch.randint(0, ours.config.vocab_size, (ids.shape[0], 1), generator=g)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1
    return worst


def prompts_for(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["tiny", "tiny-untied"])
def test_dense_matches_transformers(make_hf_checkpoint, name):
    folder, hf = make_hf_checkpoint(name)
    assert run_both(folder, hf, prompts_for(512, [12])) <= FP32_ATOL


def test_tied_checkpoint_has_no_head_tensor(make_hf_checkpoint):
    folder, _ = make_hf_checkpoint("tiny")
    ckpt = open_checkpoint(folder)
    assert "lm_head.weight" not in ckpt.source.names()
    m = ckpt.load_model(progress=False)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_batch_left_padding_matches_transformers(make_hf_checkpoint):
    folder, hf = make_hf_checkpoint("tiny-untied")
    assert run_both(folder, hf, prompts_for(512, [13, 7])) <= FP32_ATOL


def test_yarn_past_original_context(make_hf_checkpoint):
    cfg = from_name("tiny-yarn")
    assert cfg.rope_scaling.original_max_position_embeddings == 64
    folder, hf = make_hf_checkpoint(cfg)
    # 100 prompt tokens + decode: positions well past original_max_position_embeddings.
    assert run_both(folder, hf, prompts_for(512, [100, 90])) <= FP32_ATOL


def test_yarn_changes_the_output(make_hf_checkpoint):
    """Guard: the YaRN case must not pass merely because scaling is ignored on both sides."""
    cfg = from_name("tiny-yarn")
    folder, _ = make_hf_checkpoint(cfg)
    yarn = open_checkpoint(folder).load_model(progress=False)
    plain = open_checkpoint(folder).load_model(progress=False)
    plain.config = cfg.replace(rope_scaling=None)
    from qwen2_ref.rope import inv_freq_and_scale
    plain.rope_inv_freq, plain._rope_scale = inv_freq_and_scale(plain.config)
    ids = torch.tensor([prompts_for(512, [80])[0]])
    assert (yarn(ids)[0] - plain(ids)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_matches_transformers(make_hf_checkpoint, norm_topk_prob):
    cfg = from_name("tiny-moe").replace(norm_topk_prob=norm_topk_prob)
    folder, hf = make_hf_checkpoint(cfg)
    assert run_both(folder, hf, prompts_for(512, [11, 6])) <= FP32_ATOL


def test_moe_sparse_step_and_mlp_only_layers(make_hf_checkpoint):
    cfg = from_name("tiny-moe").replace(decoder_sparse_step=2, mlp_only_layers=(3,), norm_topk_prob=True)
    # layers 0 and 2 dense (step), 1 sparse, 3 dense (mlp_only)
    assert [cfg.is_sparse_layer(i) for i in range(4)] == [False, True, False, False]
    folder, hf = make_hf_checkpoint(cfg)
    assert run_both(folder, hf, prompts_for(512, [9])) <= FP32_ATOL
