"""The mixed 4-bit recipe (`--quantizer mixed`): per group of weights, 4-bit or its wider form, chosen by measured
sensitivity.

A GGUF's 5-, 6- and 8-bit tensors travel as 8-bit codes (exact, but about twice the bytes of 4-bit); a float
checkpoint's weights go as 8-bit round-to-nearest. Decode on a CPU reads every weight once per token, so each
tensor moved to 4-bit saves about half its bytes and costs some quality. Which ones: measured on the model itself.

The calibration text (the shipped one unless --calibration: never the text perplexity is reported on) is split
three ways (`_split`): CALIBRATION_TOKENS that GPTQ fits on, the next SENSITIVITY_TOKENS that each group's KL is
measured on, the next ASIDE_TOKENS that the final choice is checked on. KL measured on tokens GPTQ fitted
understates what a group does to new text (tried: the choice then took 188 MiB at +0.3% on the aside tokens and
+2.5% on the evaluation text).

1. One forward of the fp32 reference over the fitting tokens gives every candidate its 4-bit form: GPTQ against the
   inputs the layer sees (`calibrate.calibrate`, the calibrated recipe's hooks and quantizer). GPTQ, not an
   input-weighted clipping search: on the real 0.5B GGUF it leaves each group about half the KL (README), so more
   bytes fit one budget.
2. The hidden state entering every layer on the sensitivity tokens is cached, and the wide model's next-token
   distributions there kept.
3. Sensitivity of each group (per layer: attention q/k/v/o, MLP gate/up, MLP down; and the LM head): the mean KL
   divergence of the next-token distributions from the wide model's when that group alone is 4-bit (the forward
   runs from its layer's cached input; a head tied to the embedding from the embedding, which gathers from the
   head's blocks in the export). KL, not the change in perplexity: a per-group perplexity change on a few hundred
   tokens is mostly sign noise (tried: the choice then overfits those tokens).
4. Groups go to 4-bit in order of KL per byte saved while the summed KL stays within the budget (--max-kl); then
   all the chosen groups are applied together and measured, and the last ones dropped until that fits too
   (interactions are measured, not assumed). The perplexity change is then measured on the aside tokens.

The report's `calibration` section records each group's KL, bytes saved and choice; `quantized` the form each
tensor was written in (`"from": "mixed"` for the chosen 4-bit ones).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from qwen2_ref.progress import console, status

from .calibrate import (CALIBRATION_TOKENS, MAX_REFERENCE_BYTES, MIN_TOKENS, SEQUENCE, Calibrated,
                        StreamedReference, calibrate, calibration_tokens, gptq_group)
from .quant import GGUF_EXACT, QuantSpec, output_error, quantize_rtn

# How far the chosen 4-bit groups together may move the model's next-token distributions: mean KL divergence from
# the wide weights, nats per token, on calibration tokens GPTQ did not fit (--max-kl). Chosen on the calibration
# text's held-aside tokens (real 0.5B GGUF, README): 0.005 -> +1.0% there, 0.01 -> +1.4%, 0.015 -> +2.2%, 0.02 ->
# +2.8%; 0.01 is the largest that leaves a margin under +2%. It moves 136 of 225 MiB to 4-bit.
MIXED_BUDGET = 0.01
SENSITIVITY_TOKENS = 256  # tokens each group's sensitivity is measured on (a forward from its layer per group)
ASIDE_TOKENS = 512  # calibration tokens after those, never used to choose: the choice's perplexity checked on them
LOW = QuantSpec(bits=4, block=32, source="mixed")
WIDE_FLOAT = QuantSpec(bits=8, block=32, source="rtn8")  # the wide form of a float checkpoint's weight


@dataclass
class Group:
    name: str  # "head", "layers.3.attn", "layers.3.mlp_in", "layers.3.down"
    layer: int  # the layer whose input the measurement starts from (num_layers: after the final norm; -1: from the
    # embedding, for a head tied to it: the export's embedding gathers from the head's blocks, 4-bit ones too)
    params: list[str]
    saved: int = 0  # bytes saved per token read when 4-bit
    kl: float = 0.0  # measured KL from the wide model's next-token distributions (nats per token)
    chosen: bool = False


def _bytes(spec: QuantSpec, n: int, k: int) -> int:
    return sum(math.prod(s) * (1 if name == "B" or (name == "zero_points" and not spec.float_zp) else 4)
               for name, s in spec.shapes(n, k).items())


class _HeadAsTable:
    """A checkpoint source that answers for a tied head with its table (a tied checkpoint stores no lm_head)."""

    def __init__(self, source):
        self.source, self.raw = source, getattr(source, "raw", None)

    def _name(self, name: str) -> str:
        return "model.embed_tokens.weight" if name == "lm_head.weight" else name

    def tensor_type(self, name: str) -> str:
        return self.source.tensor_type(self._name(name))

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self._name(name))


def wide_spec(source, name: str) -> QuantSpec | None:
    """The form a weight takes when not 4-bit: a GGUF tensor's exact blocks when they are 8-bit codes (None when
    they are 4-bit already: nothing to choose), a float checkpoint's 8-bit round-to-nearest."""
    if getattr(source, "raw", None) is None:
        return WIDE_FLOAT
    gtype = source.tensor_type(name)
    if gtype in GGUF_EXACT:
        spec = GGUF_EXACT[gtype][2]
        return spec if spec.bits == 8 else None
    return WIDE_FLOAT


def _groups(cfg, names: set[str], source) -> list[Group]:
    L = cfg.num_hidden_layers
    out = []
    kinds = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
             "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
    for i in range(L):
        for kind, parts in kinds.items():
            ps = [f"model.layers.{i}.{p}.weight" for p in parts]
            ps = [p for p in ps if p in names and wide_spec(source, p) is not None]
            if ps:
                out.append(Group(f"layers.{i}.{kind}", i, ps))
    if "lm_head.weight" in names and wide_spec(source, "lm_head.weight") is not None:
        out.append(Group("head", -1 if cfg.tie_word_embeddings else L, ["lm_head.weight"]))
    return out


class _Probe:
    """The reference's forward from any layer's cached input to the next-token distributions of the calibration
    tokens, and their KL divergence from a reference set of them."""

    def __init__(self, model, ids: torch.Tensor):
        from qwen2_ref.model import _Context

        self.model, self.ids = model, ids
        self.ref: torch.Tensor | None = None
        B, T = ids.shape
        mask = torch.ones(B, T, dtype=torch.long)
        pos = torch.arange(T)[None].expand(B, T)
        self.ctx = _Context(model.config, model.rope_inv_freq, model._rope_scale, pos, mask, 0)
        self.empty = model.empty_past(B)
        self.hidden: list[torch.Tensor] = []  # input of layer i; [L]: the last layer's output
        x = model.model.embed_tokens(ids)
        for i, layer in enumerate(model.model.layers):
            self.hidden.append(x)
            x, _ = layer(x, self.ctx, self.empty[i])
        self.hidden.append(x)

    def logits(self, start: int) -> torch.Tensor:
        """From layer `start`'s cached input (-1: from the embedding of the current weights)."""
        x = self.model.model.embed_tokens(self.ids) if start < 0 else self.hidden[start]
        for i in range(max(start, 0), len(self.model.model.layers)):
            x, _ = self.model.model.layers[i](x, self.ctx, self.empty[i])
        return self.model.lm_head(self.model.model.norm(x))[0].float()  # (T, V)

    def reference(self) -> None:
        """Keep the current weights' next-token distributions as the reference KL is measured against."""
        self.ref = torch.log_softmax(self.logits(-1), dim=-1)

    def kl(self, start: int, rows: int = 64) -> float:
        """Mean KL(reference ‖ current weights) per token, the forward run from layer `start`'s cached input (-1: from
        the embedding)."""
        logits, total = self.logits(start), 0.0
        for r in range(0, logits.shape[0], rows):
            ref = self.ref[r:r + rows]
            total += float((ref.exp() * (ref - torch.log_softmax(logits[r:r + rows], dim=-1))).sum())
        return total / logits.shape[0]


def _low_forms(reference: StreamedReference, ids: list[int], cand: set[str], source) -> tuple[dict, dict]:
    """One calibration forward (`calibrate.calibrate`'s hooks, a layer at a time in fp32): every candidate's 4-bit
    form by GPTQ against its own inputs' H = E[x xᵀ], as Calibrated (q/k/v and gate/up, which read one input, in one
    sweep); and a float checkpoint's wide forms (8-bit round-to-nearest), their error measured against the same H."""
    wide: dict[str, Calibrated] = {}
    gptq = gptq_group(LOW)

    def quantize(members: list[tuple[str, torch.Tensor]], h: torch.Tensor) -> dict[str, Calibrated]:
        for name, w in members:
            if wide_spec(source, name) is WIDE_FLOAT:
                w = w if isinstance(w, torch.Tensor) else w.whole()  # a head's rows: read once
                q = quantize_rtn(w, WIDE_FLOAT)
                wide[name] = Calibrated(q, output_error(w, q, h))
        return gptq(members, h)

    return calibrate(reference, ids, quantize, cand), wide


def _load(param: torch.Tensor, q, rows: int = 8192) -> None:
    """param <- q's dequantized values, a slice of rows at a time (the LM head whole would be three fp32 copies)."""
    for r in range(0, param.shape[0], rows):
        param[r:r + rows].copy_(torch.from_numpy(q.rows(r, r + rows).dequantize()))


def _split(ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """The calibration tokens in three: those GPTQ fits on (CALIBRATION_TOKENS, fewer from a short text but at least
    MIN_TOKENS), the next SENSITIVITY_TOKENS each group's KL is measured on, and the next ASIDE_TOKENS the choice's
    perplexity is checked on. Measured on tokens GPTQ fitted, a group's KL understates what it does to new text (on
    the real 0.5B: +0.3% there, +2.5% on the evaluation text). A short text shares out what it has in that order of
    priority: under CALIBRATION_TOKENS + SENSITIVITY_TOKENS GPTQ fits on fewer tokens and the check is skipped;
    under MIN_TOKENS + SENSITIVITY_TOKENS the KL is measured on the last fitted tokens too (the report says so)."""
    n = max(MIN_TOKENS, min(CALIBRATION_TOKENS, len(ids) - SENSITIVITY_TOKENS))
    fit = ids[:n - n % SEQUENCE if n > SEQUENCE else n]  # `calibrate` runs whole sequences: no token left unused
    rest = ids[len(fit):]
    if len(rest) < SENSITIVITY_TOKENS:
        return fit, fit[-SENSITIVITY_TOKENS:], []
    return fit, rest[:SENSITIVITY_TOKENS], rest[SENSITIVITY_TOKENS:SENSITIVITY_TOKENS + ASIDE_TOKENS]


def _nll(model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    logits, _ = model(x)
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:]))


def _held_aside_increase(model, chosen: list[Group], apply, ids: list[int]) -> float:
    """exp(Δ mean NLL) − 1 of the chosen 4-bit groups over their wide forms, on calibration tokens the choice did
    not see (the model holds the chosen groups' 4-bit values on entry, and again on return)."""
    mixed = _nll(model, ids)
    apply(chosen, "wide")
    wide = _nll(model, ids)
    apply(chosen, "low")
    return math.expm1(mixed - wide)


@torch.no_grad()
def mixed_weights(ckpt, names: set[str], reference: StreamedReference, load_model: Callable[[], torch.nn.Module],
                  text=None, max_kl: float | None = None) -> tuple[dict[str, Calibrated], dict]:
    """{param: Calibrated} for every weight written in a form other than the recipe-less default (4-bit where
    chosen; a float checkpoint's wide weights as 8-bit), and the report's account of the choice. GPTQ runs on
    `reference` (the fp32 reference a layer at a time); the sensitivities on `load_model()`, loaded after it."""
    from qwen2_ref.memory import release_freed_memory

    cfg = reference.config  # a gate's truncation: its first layers, quantized as the whole model's export is
    if ckpt.config.num_parameters() * 4 > MAX_REFERENCE_BYTES:  # the whole model's size decides, as in the export
        gib = ckpt.config.num_parameters() * 4 / 2**30
        status(f"note: the mixed recipe measures on the fp32 reference in memory ({gib:.0f} GiB); "
               "this size is written as --quantizer exact (a GGUF's blocks, else round-to-nearest)")
        return {}, {"method": "none: the fp32 reference is too large to measure on (written as --quantizer exact)"}
    t0 = time.perf_counter()
    ids, what = calibration_tokens(ckpt.tokenizer(), text, cfg.vocab_size,
                                   CALIBRATION_TOKENS + SENSITIVITY_TOKENS + ASIDE_TOKENS)
    fit, sens, aside = _split(ids)
    overlap = len(ids) < len(fit) + SENSITIVITY_TOKENS
    if overlap:
        least, full = MIN_TOKENS + SENSITIVITY_TOKENS, CALIBRATION_TOKENS + SENSITIVITY_TOKENS + ASIDE_TOKENS
        status(f"note: the calibration text has {len(ids)} tokens: each group's KL is measured on tokens GPTQ fitted, "
               f"which understates it, and the choice is not checked on unseen ones ({least} tokens or more measure "
               f"on unseen ones; {full} give every part its full share)")
    source = _HeadAsTable(ckpt.source) if cfg.tie_word_embeddings else ckpt.source
    groups = _groups(cfg, names, source)
    cand = [p for g in groups for p in g.params]
    low, out = _low_forms(reference, fit, set(cand), source)
    release_freed_memory()
    model = load_model()
    try:
        params = dict(model.named_parameters())
        params.setdefault("lm_head.weight", model.lm_head.weight)
        for g in groups:
            for p in g.params:
                n, k = params[p].shape
                g.saved += _bytes(wide_spec(source, p), n, k) - _bytes(LOW, n, k)
        for p, c in out.items():
            _load(params[p], c.quantized)  # sensitivities are measured against the wide form
        probe = _Probe(model, torch.tensor([sens]))
        probe.reference()

        def apply(gs: list[Group], which: str) -> None:
            for g in gs:
                for p in g.params:
                    if which == "low":
                        _load(params[p], low[p].quantized)
                    elif p in out:
                        _load(params[p], out[p].quantized)
                    else:  # a GGUF's exact blocks: what the reference was loaded with
                        params[p].copy_(source.get(p).to(torch.float32))

        t1 = time.perf_counter()
        for j, g in enumerate(groups):
            apply([g], "low")
            g.kl = probe.kl(g.layer)
            apply([g], "wide")
            if console.is_terminal:
                el = time.perf_counter() - t1
                console.print(f"  measured {j + 1}/{len(groups)} groups ({el:.0f} s, ETA "
                              f"{el / (j + 1) * (len(groups) - j - 1):.0f} s)", end="\r")
        allowed = MIXED_BUDGET if max_kl is None else max_kl
        chosen, total = [], 0.0
        for g in sorted(groups, key=lambda g: g.kl / max(g.saved, 1)):
            if total + g.kl <= allowed:
                chosen.append(g)
                total += g.kl
        apply(chosen, "low")
        combined = probe.kl(-1)
        while chosen and combined > allowed:  # interactions: drop the costliest-per-byte groups until it fits
            apply([chosen.pop()], "wide")
            combined = probe.kl(-1)
        checked = _held_aside_increase(model, chosen, apply, aside) if len(aside) > 1 else None
        for g in chosen:
            g.chosen = True
            for p in g.params:
                out[p] = low[p]
        saved = sum(g.saved for g in chosen)
        total_wide = sum(g.saved for g in groups)
        status(f"mixed 4-bit: {sum(len(g.params) for g in chosen)} of {len(cand)} weights to 4-bit "
               f"({saved / 2**20:.0f} of {total_wide / 2**20:.0f} MiB that could be saved), KL to the wide "
               f"weights {combined:.4f} nats/token on the calibration text (--max-kl {allowed:.4f}); "
               + (f"perplexity {checked * 100:+.2f}% on {len(aside)} calibration tokens held aside from the choice"
                  if checked is not None else "")
               + f" in {time.perf_counter() - t0:.0f} s")
    finally:
        del model
        release_freed_memory()
    info = {"method": "mixed: per group 4-bit (GPTQ) or its wide form, by measured sensitivity",
            "bits": LOW.bits, "block": LOW.block, "text": what, "tokens": len(fit),
            "sensitivity_tokens": len(sens), "sensitivity_on_fitted_tokens": overlap,
            "max_kl": allowed,
            "kl": float(f"{combined:.6g}"),
            "saved_mib": round(saved / 2**20, 1),
            "groups": {g.name: {"weights": len(g.params), "kl": float(f"{g.kl:.6g}"),
                                "saved_mib": round(g.saved / 2**20, 2), "choice": "4-bit" if g.chosen else "wide"}
                       for g in groups},
            "held_aside_perplexity_increase": None if checked is None else round(checked, 6),
            "held_aside_tokens": len(aside), "seconds": round(time.perf_counter() - t0, 1)}
    return out, info
