"""Reference generation: greedy and sampling over the explicit KV cache, batched with left padding, streamed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .model import KV, Qwen2ForCausalLM


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if p.greedy:
        return logits.to(torch.float32).argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, p), 1, generator=gen).squeeze(-1)


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, V) logits -> the (B, V) distribution `next_token` samples from: temperature, then top-k, then top-p."""
    logits = logits.to(torch.float32) / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids (B, T) and attention_mask (B, T), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


@torch.no_grad()
def prefill(model: Qwen2ForCausalLM, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 0
            ) -> tuple[torch.Tensor, tuple[KV, ...]]:
    """Run the prompt (optionally `chunk` tokens at a time); returns the last position's logits (B, V) and cache."""
    past = None
    T = ids.shape[1]
    step = chunk if chunk > 0 else T
    for s in range(0, T, step):
        e = min(T, s + step)
        logits, past = model(ids[:, s:e], attention_mask=mask[:, :e], past=past, logits_to_keep=1)
    return logits[:, -1], past


@torch.no_grad()
def generate(model: Qwen2ForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams,
             prefill_chunk: int = 0, pad_id: int = 0) -> Iterator[list[int | None]]:
    """Yield, per step, one new token per prompt (None once that prompt has stopped)."""
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    ids, mask = left_pad(prompts, pad_id)
    if params.max_new_tokens == 0:
        return
    logits, past = prefill(model, ids, mask, prefill_chunk)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    stops = torch.tensor(list(params.stop_token_ids), dtype=torch.long)
    for step in range(params.max_new_tokens):
        tok = next_token(logits, params, gen)
        yield [None if d else int(t) for t, d in zip(tok.tolist(), done.tolist())]
        done |= torch.isin(tok, stops)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1  # (B, 1)
        logits, past = model(tok[:, None], position_ids=pos, attention_mask=mask, past=past, logits_to_keep=1)
        logits = logits[:, -1]


def generate_one(model: Qwen2ForCausalLM, prompt: Sequence[int], params: SamplingParams,
                 prefill_chunk: int = 0) -> Iterator[int]:
    """Tokens for one prompt, stopping after (and including) a stop token."""
    for step in generate(model, [prompt], params, prefill_chunk):
        if step[0] is None:
            return
        yield step[0]


class TextStream:
    """Incremental detokenization: emit only complete characters (a token may end inside a UTF-8 sequence)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new
