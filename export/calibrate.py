"""Calibration for 4-bit weights: run the fp32 reference over a calibration text and quantize each linear layer
against the inputs it actually sees (GPTQ), instead of against the weights alone.

The default calibration text ships in the package (`export/data/calibration.txt`: CPython 3.11's `textwrap.py`
and `fractions.py`, PSF license). It never overlaps the text the README's and the tests' perplexity figures are
measured on (CPython's `heapq.py`, `export/evaluate.py`): quality is always reported on text the quantizer did
not see. `--calibration FILE` replaces it.

One forward pass: every linear's input statistics H = E[x xᵀ] are taken by a forward hook and the weight is
quantized right there (then H is dropped), so no more than one layer's H is held at a time. The LM head's inputs
are the final norm's outputs (the forward computes the last position's logits only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qwen2_ref.errors import Qwen2Error
from qwen2_ref.progress import console, status

from .quant import Quantized, QuantSpec, output_error, quantize_gptq

DEFAULT_TEXT = Path(__file__).with_name("data") / "calibration.txt"
CALIBRATION_TOKENS = 1024  # tokens the quantizer sees (in sequences of SEQUENCE)
SEQUENCE = 512
MIN_TOKENS = 256  # fewer is refused: H of a 4864-wide layer from a handful of tokens is mostly noise


class CalibrationError(Qwen2Error):
    pass


def calibration_ids(tokenizer, path: str | Path | None = None, tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """The first `tokens` token ids of the calibration text; one-line errors for a missing, empty or short file."""
    path = Path(path) if path is not None else DEFAULT_TEXT
    if not path.is_file():
        raise CalibrationError(f"--calibration {path}: no such file (expected a UTF-8 text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"--calibration {path}: cannot be read as UTF-8 text ({e.__class__.__name__})") from None
    if not text.strip():
        raise CalibrationError(f"--calibration {path}: the file is empty (expected at least {MIN_TOKENS} tokens of text)")
    ids = tokenizer.encode(text)
    if len(ids) < MIN_TOKENS:
        raise CalibrationError(f"--calibration {path}: {len(ids)} tokens, too short (at least {MIN_TOKENS} needed)")
    return ids[:tokens]


def calibration_tokens(tokenizer, text: str | Path | None, vocab_size: int,
                       tokens: int = CALIBRATION_TOKENS) -> tuple[list[int], str]:
    """Up to `tokens` token ids a calibrating recipe runs the model on, and how the report names them: the
    calibration text's (`calibration_ids`), or for a checkpoint without a tokenizer (random test models) seeded
    pseudo-random ids."""
    if tokenizer is not None:
        return calibration_ids(tokenizer, text, tokens), str(text) if text is not None else "export/data/calibration.txt"
    if text is not None:
        raise CalibrationError(f"--calibration {text}: the checkpoint has no tokenizer to encode it with")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (tokens,), generator=g).tolist()
    return ids, "pseudo-random token ids (the checkpoint has no tokenizer)"


@dataclass
class Calibrated:
    """A weight quantized against its inputs, and how much output error it leaves."""
    quantized: Quantized
    error: float  # E‖ΔW x‖² / E‖W x‖² on the calibration inputs


# quantize([(param name, weight (N, K)), ...] sharing one input, H (K, K)) -> {param name: result}
GroupQuantizer = Callable[[list[tuple[str, torch.Tensor]], torch.Tensor], dict]


@torch.no_grad()
def calibrate(model, ids: list[int], quantize: "GroupQuantizer", names: set[str]) -> dict[str, object]:
    """Run `model` (the fp32 reference) over `ids` in sequences of SEQUENCE tokens, batched into one forward.
    Linear weights in `names` that read the same input (q/k/v; gate/up) form a group; `quantize([(name,
    weight), ...], H)` is called once per group with H = E[x xᵀ] (K, K) of that input and returns {name: result}.
    Returns all results."""
    results: dict[str, object] = {}
    seqs = [ids[s:s + SEQUENCE] for s in range(0, len(ids) - SEQUENCE + 1, SEQUENCE)] or [ids]
    x = torch.tensor(seqs)  # (B, T)
    modules = dict(model.named_modules())
    head = "lm_head.weight"
    total = sum(1 for n in names if n.removesuffix(".weight") in modules)
    pending: list = []  # [input tensor, [(name, weight), ...]]: the group whose input was seen last
    hooks, done, t0 = [], [0], time.perf_counter()

    def flush() -> None:
        if not pending:
            return
        inputs, members = pending
        pending.clear()
        xs = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        h = xs.T @ xs / xs.shape[0]
        results.update(quantize(members, h))
        done[0] += len(members)
        el = time.perf_counter() - t0
        if console.is_terminal:
            console.print(f"  calibrated {done[0]}/{total} weights ({el:.0f} s, ETA "
                          f"{el / done[0] * (total - done[0]):.0f} s)", end="\r")

    def seen(pname: str, w: torch.Tensor, inputs: torch.Tensor) -> None:
        if pending and pending[0] is not inputs:
            flush()
        if not pending:
            pending.extend([inputs, []])
        pending[1].append((pname, w))

    for mname, mod in modules.items():
        pname = f"{mname}.weight"
        if pname in names and isinstance(mod, torch.nn.Linear) and pname != head:
            hooks.append(mod.register_forward_hook(lambda m, a, o, p=pname: seen(p, m.weight, a[0])))
    if head in names:  # the head sees the final norm's output; the forward keeps one position's logits only
        hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: seen(head, model.lm_head.weight, o)))
    status(f"calibrating {total} weights on {x.numel()} tokens ({x.shape[0]} x {x.shape[1]}) ...")
    try:
        model(x, logits_to_keep=1)
        flush()
    finally:
        for h in hooks:
            h.remove()
    return results


def gptq_group(spec: QuantSpec, act_order: bool = False, **kw) -> "GroupQuantizer":
    """GPTQ over a group's weights stacked along the output dimension (rows are independent, so one sweep serves
    q, k and v at the cost of one), split back per weight."""
    def run(members: list[tuple[str, torch.Tensor]], h: torch.Tensor) -> dict[str, Calibrated]:
        ws = [w for _, w in members]
        q = quantize_gptq(ws[0] if len(ws) == 1 else torch.cat(ws), spec, h, act_order, **kw)  # the head: no copy
        out, r = {}, 0
        for name, w in members:
            part = q.rows(r, r + w.shape[0])
            out[name] = Calibrated(part, output_error(w, part, h))
            r += w.shape[0]
        return out
    return run


GPTQ4 = QuantSpec(bits=4, block=32, source="gptq")


def calibrate_checkpoint(load_model: Callable[[], torch.nn.Module], tokenizer, names: set[str], vocab_size: int,
                         text: str | Path | None = None, spec: QuantSpec = GPTQ4) -> tuple[dict[str, Calibrated], dict]:
    """GPTQ for every linear weight in `names`, against the fp32 reference's own inputs on the calibration text.
    `load_model()` gives the reference; it is freed before return. Returns the results and what the report says
    about the calibration."""
    from qwen2_ref.memory import release_freed_memory

    ids, what = calibration_tokens(tokenizer, text, vocab_size)
    t0 = time.perf_counter()
    model = load_model()
    try:
        results = calibrate(model, ids, gptq_group(spec), names)
    finally:
        del model
        release_freed_memory()
    info = {"method": "gptq", "bits": spec.bits, "block": spec.block, "text": what, "tokens": len(ids),
            "seconds": round(time.perf_counter() - t0, 1)}
    return results, info


# A GGUF tensor keeps its own blocks (exact; 8-bit codes for Q5_0/Q8_0/Q6_K) instead of GPTQ 4-bit when GPTQ
# leaves more than this relative output error on the calibration inputs (E‖ΔW x‖² / E‖W x‖²). Off (inf) for now:
# on the real 0.5B this error ranks v_proj first (up to 3.8e-3) while keeping gate/up in fp32 is what recovers
# perplexity (+4.5% -> +2.2%, bench/quant_quality.py --ablate), so the per-layer error is not yet a usable
# sensitivity; the choice is recorded per tensor in the report's calibration section.
EXACT_ABOVE_ERROR = float("inf")


def keep_exact(results: dict[str, Calibrated], source, threshold: float | None = None) -> set[str]:
    """The weights of a GGUF source that keep their exact blocks: those GPTQ quantizes worst (measured output
    error above `threshold`), where the file's own grid can be carried over. Other sources: none."""
    threshold = EXACT_ABOVE_ERROR if threshold is None else threshold
    if getattr(source, "raw", None) is None:
        return set()
    from .quant import GGUF_EXACT

    return {n for n, c in results.items() if c.error > threshold and source.tensor_type(n) in GGUF_EXACT}


# The fp32 reference bigger than this is not materialized: such models are quantized without calibration.
MAX_REFERENCE_BYTES = 6 * 2**30


def calibrated_weights(ckpt, names: set[str], load_model: Callable[[], torch.nn.Module],
                       text: str | Path | None = None) -> tuple[dict[str, "Calibrated"], dict]:
    """The calibrated recipe for an export, any target: GPTQ results for the linear weights `names` (those a GGUF
    keeps exactly, by `keep_exact`, left out), and what the report says. GPTQ runs on the fp32 reference, so it
    needs the whole reference in memory: bigger models are quantized without it (said in the report)."""
    from qwen2_ref.progress import status

    cfg = ckpt.config
    if cfg.num_parameters() * 4 > MAX_REFERENCE_BYTES:
        status(f"note: calibration needs the fp32 reference in memory ({cfg.num_parameters() * 4 / 2**30:.0f} GiB);"
               " this size is quantized without it (a GGUF's exact blocks, else round-to-nearest)")
        return {}, {"method": "none: the fp32 reference is too large to calibrate on (GGUF blocks kept exactly "
                              "where possible, else round-to-nearest)"}
    results, info = calibrate_checkpoint(load_model, ckpt.tokenizer(), names, cfg.vocab_size, text)
    exact = keep_exact(results, ckpt.source)
    info["kept_exact"] = {n: ckpt.source.tensor_type(n) for n in sorted(exact)}
    info["gptq_output_error"] = {n: round(c.error, 6) for n, c in sorted(results.items())}
    return {n: c for n, c in results.items() if n not in exact}, info
