"""Calibration for 4-bit weights: run the fp32 reference over a calibration text and quantize each linear layer
against the inputs it actually sees (GPTQ), instead of against the weights alone.

The default calibration text ships in the package (`export/data/calibration.txt`: CPython 3.11's `textwrap.py`
and `fractions.py`, PSF license). It never overlaps the text the README's and the tests' perplexity figures are
measured on (CPython's `heapq.py`, `export/evaluate.py`): quality is always reported on text the quantizer did
not see. `--calibration FILE` replaces it.

One forward pass, a decoder layer at a time: every linear's input statistics H = E[x xᵀ] are taken by a forward
hook and the weight is quantized right there (then H is dropped), so no more than one group's H is held at a time.
The reference need not be in memory (`StreamedReference`: one fp32 layer at a time, from the checkpoint). The LM
head's inputs are the final norm's outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qwen2_ref.errors import Qwen2Error
from qwen2_ref.progress import console, status

from .quant import Quantized, QuantSpec, gptq

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


class StreamedReference:
    """The fp32 reference of a checkpoint, never whole in memory: the embedding rows, each decoder layer, the final
    norm and the LM head built from the checkpoint's own values (a GGUF's blocks dequantized exactly) when asked
    for and freed after. `calibrate` over it holds one layer's fp32 weights at a time."""

    def __init__(self, cfg, source):
        from qwen2_ref import rope

        self.config, self.source = cfg, source
        self.rope_inv_freq, self.rope_scale = rope.inv_freq_and_scale(cfg)

    def _get(self, name: str) -> torch.Tensor:
        return self.source.get(name).to(torch.float32)

    def embed(self, ids: torch.Tensor, block: int = 1024) -> torch.Tensor:
        """The embedding rows of `ids`, read a block of rows at a time (only blocks holding one of them)."""
        name = "model.embed_tokens.weight"
        out = torch.empty(*ids.shape, self.config.hidden_size)
        for b in sorted(set((ids // block).reshape(-1).tolist())):
            sel = (ids // block) == b
            out[sel] = self.source.get_rows(name, b * block, (b + 1) * block).to(torch.float32)[ids[sel] - b * block]
        return out

    def layer(self, i: int) -> torch.nn.Module:
        from qwen2_ref.model import DecoderLayer
        from qwen2_ref.weights import expected_tensors, param_slot

        with torch.device("meta"):
            layer = DecoderLayer(self.config, i)
        layer = layer.to_empty(device="cpu").to(torch.float32)
        params = dict(layer.named_parameters(remove_duplicate=False))
        prefix = f"model.layers.{i}."
        for name in expected_tensors(self.config):
            if name.startswith(prefix):
                pname, idx = param_slot(name)
                dst = params[pname.removeprefix(prefix)]
                (dst if idx is None else dst[idx]).copy_(self._get(name))
        return layer

    def norm(self) -> torch.nn.Module:
        from qwen2_ref.model import RMSNorm

        norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps)
        norm.weight.data = self._get("model.norm.weight")
        return norm

    def head(self) -> "SourceRows":
        return SourceRows(self.source, "model.embed_tokens.weight" if self.config.tie_word_embeddings
                          else "lm_head.weight")


class SourceRows:
    """A 2-D checkpoint tensor as GPTQ reads it, a slice of rows at a time (`w[r0:r1]`: fp32), so that it is never
    whole in fp32: the LM head is the largest tensor of a small model (0.5B: 544 MB in fp32). (A float checkpoint's
    8-bit wide form, in the mixed recipe, reads it whole.)"""

    def __init__(self, source, name: str):
        self.source, self.name = source, name
        self.shape = tuple(source.shape(name))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return self.source.get_rows(self.name, start, stop).to(torch.float32)

    def whole(self) -> torch.Tensor:
        return self[:]


class _Resident:
    """A reference model in memory, answering as StreamedReference does (its own modules and tensors)."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.rope_inv_freq, self.rope_scale = model.rope_inv_freq, model._rope_scale

    def embed(self, ids):
        return self.model.model.embed_tokens(ids)

    def layer(self, i):
        return self.model.model.layers[i]

    def norm(self):
        return self.model.model.norm

    def head(self):
        return self.model.lm_head.weight


def calibrate(reference, ids: list[int], quantize: "GroupQuantizer", names: set[str]) -> dict[str, object]:
    """Run the fp32 reference (a model in memory, or a StreamedReference) over `ids` in sequences of SEQUENCE
    tokens, batched, one decoder layer at a time. Linear weights in `names` that read the same input (q/k/v;
    gate/up) form a group; `quantize([(name, weight), ...], H)` is called once per group with H = E[x xᵀ] (K, K)
    of that input and returns {name: result}. The LM head's input is the final norm's output. Returns all
    results."""
    return calibrate_carrying(reference, ids, quantize, names, None)[0]


def _forward_context(ref, B: int, T: int):
    from qwen2_ref.model import _Context

    mask = torch.ones(B, T, dtype=torch.long)
    return _Context(ref.config, ref.rope_inv_freq, ref.rope_scale, torch.arange(T)[None].expand(B, T), mask, 0)


@torch.no_grad()
def calibrate_carrying(reference, ids: list[int], quantize: "GroupQuantizer", names: set[str],
                       carry: list[int] | None) -> tuple[dict[str, object], torch.Tensor | None]:
    """`calibrate`, and `carry` (token ids never fitted on, one sequence) run along through the same layers:
    returns the results and the carried tokens' final-norm outputs (1, len(carry), hidden), or None. A second
    sequence through each layer as it is built costs a fraction of a second pass, which would build every layer
    again. With no `ids` only the carried tokens run (a plain streamed forward)."""
    ref = reference if isinstance(reference, StreamedReference) else _Resident(reference)
    cfg = ref.config
    results: dict[str, object] = {}
    seqs = [ids[s:s + SEQUENCE] for s in range(0, len(ids) - SEQUENCE + 1, SEQUENCE)] or [ids]
    x_ids = torch.tensor(seqs)  # (B, T)
    B, T = x_ids.shape
    head = "lm_head.weight"
    layer_names = [f"model.layers.{i}." for i in range(cfg.num_hidden_layers)]
    total = sum(1 for n in names if n == head or n.startswith(tuple(layer_names)))
    done, t0 = [0], time.perf_counter()

    layers_done = [0]

    def progress() -> None:  # the layers pace the pass (a head-only calibration quantizes one weight, at the end)
        if console.is_terminal:
            el, n = time.perf_counter() - t0, len(layer_names)
            eta = el / max(layers_done[0], 1) * (n - layers_done[0])
            console.print(f"  calibration pass: layer {layers_done[0]}/{n}, {done[0]}/{total} weights quantized "
                          f"({el:.0f} s, ETA {eta:.0f} s)", end="\r")

    def flush(inputs: torch.Tensor, members: list) -> None:
        xs = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        h = xs.T @ xs / xs.shape[0]
        results.update(quantize(members, h))
        done[0] += len(members)
        progress()

    if ids:
        status(f"calibrating {total} weight{'s' if total != 1 else ''} on {x_ids.numel()} tokens ({B} x {T})"
               + (f", {len(carry)} more carried along" if carry else "") + " ...")
        ctx, x = _forward_context(ref, B, T), ref.embed(x_ids)
    kv = torch.zeros(B, cfg.num_key_value_heads, 0, cfg.head_dim)
    if carry is not None:
        c_ctx, c = _forward_context(ref, 1, len(carry)), ref.embed(torch.tensor([carry]))
    pending: list = []  # [input tensor, [(name, weight), ...]]: the group whose input was seen last

    def seen(pname: str, w: torch.Tensor, inputs: torch.Tensor) -> None:
        if pending and pending[0] is not inputs:
            flush(*pending)
            pending.clear()
        if not pending:
            pending.extend([inputs, []])
        pending[1].append((pname, w))

    for i, prefix in enumerate(layer_names):
        layer = ref.layer(i)
        if carry is not None:  # before the hooks: the carried tokens are never fitted on
            c, _ = layer(c, c_ctx, (kv[:1], kv[:1]))
        hooks = [mod.register_forward_hook(lambda m, a, o, p=f"{prefix}{mname}.weight": seen(p, m.weight, a[0]))
                 for mname, mod in layer.named_modules()
                 if isinstance(mod, torch.nn.Linear) and f"{prefix}{mname}.weight" in names]
        try:
            if ids:
                x, _ = layer(x, ctx, (kv, kv))
            if pending:
                flush(*pending)
        finally:
            pending.clear()
            for h in hooks:
                h.remove()
        del layer
        layers_done[0] += 1
        progress()
    norm = ref.norm()
    if head in names and ids:
        w = ref.head()
        status(f"  quantizing the LM head ({' x '.join(map(str, w.shape))}) ...")
        flush(norm(x), [(head, w)])
    return results, (norm(c) if carry is not None else None)


def gptq_group(spec: QuantSpec, act_order: bool = False, **kw) -> "GroupQuantizer":
    """GPTQ over a group's weights stacked along the output dimension (rows are independent, so one sweep serves
    q, k and v at the cost of one), split back per weight."""
    def run(members: list[tuple[str, torch.Tensor]], h: torch.Tensor) -> dict[str, Calibrated]:
        ws = [w for _, w in members]
        q, err, power = gptq(ws[0] if len(ws) == 1 else torch.cat(ws), spec, h, act_order, **kw)  # head: no copy
        out, r = {}, 0
        for name, w in members:
            r1 = r + w.shape[0]
            out[name] = Calibrated(q.rows(r, r1), float(err[r:r1].sum()) / max(float(power[r:r1].sum()), 1e-30))
            r = r1
        return out
    return run


GPTQ4 = QuantSpec(bits=4, block=32, source="gptq")


def calibrate_checkpoint(reference: StreamedReference, tokenizer, names: set[str], text: str | Path | None = None,
                         spec: QuantSpec = GPTQ4) -> tuple[dict[str, Calibrated], dict]:
    """GPTQ for every linear weight in `names`, against the fp32 reference's own inputs on the calibration text.
    Returns the results and what the report says about the calibration."""
    from qwen2_ref.memory import release_freed_memory

    ids, what = calibration_tokens(tokenizer, text, reference.config.vocab_size)
    t0 = time.perf_counter()
    try:
        results = calibrate(reference, ids, gptq_group(spec), names)
    finally:
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


# Models whose fp32 reference is bigger than this are quantized without calibration: the mixed recipe holds the
# fp32 reference in memory to measure on; the others stream it a layer at a time, but its forward over the
# calibration text grows with the model (the real 0.5B: the head recipe's whole pass, 36 s on 2 cores).
MAX_REFERENCE_BYTES = 6 * 2**30


def calibrates(cfg) -> bool:
    """Whether a model of this config is small enough to calibrate (its fp32 reference <= MAX_REFERENCE_BYTES)."""
    return cfg.num_parameters() * 4 <= MAX_REFERENCE_BYTES


def calibrated_weights(ckpt, names: set[str], reference: StreamedReference | None = None,
                       text: str | Path | None = None) -> tuple[dict[str, "Calibrated"], dict]:
    """The calibrated recipe for an export, any target: GPTQ results for the linear weights `names` (those a GGUF
    keeps exactly, by `keep_exact`, left out), and what the report says. GPTQ runs on the fp32 reference a layer at
    a time; models whose fp32 reference is over MAX_REFERENCE_BYTES are quantized without it (said in the report)."""
    from qwen2_ref.progress import status

    cfg = ckpt.config
    if not calibrates(cfg):
        status(f"note: calibration runs on models whose fp32 reference is {MAX_REFERENCE_BYTES / 2**30:.0f} GiB or "
               f"less (this one: {cfg.num_parameters() * 4 / 2**30:.0f} GiB); this size is quantized without it (a "
               "GGUF's exact blocks, else round-to-nearest)")
        return {}, {"method": "none: the fp32 reference is too large to calibrate on (GGUF blocks kept exactly "
                              "where possible, else round-to-nearest)"}
    reference = reference or StreamedReference(cfg, ckpt.source)
    results, info = calibrate_checkpoint(reference, ckpt.tokenizer(), names, text)
    exact = keep_exact(results, ckpt.source)
    info["kept_exact"] = {n: ckpt.source.tensor_type(n) for n in sorted(exact)}
    info["gptq_output_error"] = {n: round(c.error, 6) for n, c in sorted(results.items())}
    return {n: c for n, c in results.items() if n not in exact}, info
