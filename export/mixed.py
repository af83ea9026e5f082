"""The mixed 4-bit recipe (`--quantizer mixed`): per group of weights, 4-bit or its wider form, chosen by measured
sensitivity.

A GGUF's 5-, 6- and 8-bit tensors travel as 8-bit codes (on blocks of 128 where that divides the row, as
`--quantizer reblock` writes them: about twice the bytes of 4-bit); a float checkpoint's weights go as 8-bit
round-to-nearest. Decode on a CPU reads every weight once per token, so each tensor moved to 4-bit saves about half
its bytes and costs some quality. Which ones: measured on the model itself.

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

`--quantizer head` (`scope="head"`): the same choice for one group, the LM head, the rest as `--quantizer reblock`,
without the model in memory. Steps 2-3 come from the GPTQ pass itself: the sensitivity and aside tokens, as one
sequence, ride along through each layer as it is built (`calibrate.calibrate_carrying`), and the head's KL and the
aside perplexity change are computed from their final-norm outputs, a slice of vocabulary rows at a time
(`_compare_heads`). A tied head takes a second streamed pass from its 4-bit table's rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from qwen2_ref.progress import console, status

from .calibrate import (CALIBRATION_TOKENS, MAX_REFERENCE_BYTES, MIN_TOKENS, SEQUENCE, Calibrated,
                        StreamedReference, _forward_context, _Resident, calibrate_carrying, calibrates,
                        calibration_tokens, gptq_group)
from .quant import (GGUF_EXACT, WIDE_BLOCK, Quantized, QuantSpec, carried_spec, output_error, quantize_reblocked,
                    quantize_rtn)

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
    return sum(math.prod(s) * (1 if name == "B" or (name == "zero_points" and not spec.stores_float_zp) else 4)
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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shape(self._name(name)))


def wide_spec(source, name: str) -> QuantSpec | None:
    """The form a weight takes when not 4-bit: a GGUF tensor's 8-bit codes, re-blocked (None when its blocks are
    4-bit already: nothing to choose), a float checkpoint's 8-bit round-to-nearest."""
    if getattr(source, "raw", None) is None:
        return WIDE_FLOAT
    gtype = source.tensor_type(name)
    if gtype in GGUF_EXACT:
        spec = carried_spec(gtype, reblock=True, row=source.shape(name)[-1])
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
        self.model, self.ids = model, ids
        self.ref: torch.Tensor | None = None
        self.ctx = _forward_context(_Resident(model), *ids.shape)
        self.empty = model.empty_past(ids.shape[0])
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


def _low_forms(reference: StreamedReference, ids: list[int], cand: set[str], source,
               carry: list[int] | None = None) -> tuple[dict, dict, torch.Tensor | None]:
    """One calibration forward (`calibrate.calibrate`'s hooks, a layer at a time in fp32): every candidate's 4-bit
    form by GPTQ against its own inputs' H = E[x xᵀ], as Calibrated (q/k/v and gate/up, which read one input, in one
    sweep); the wide forms that are not the file's own values (a float checkpoint's 8-bit round-to-nearest, a
    GGUF's re-blocked 8-bit codes), their error measured against the same H, so that the choice is measured
    against what is written; and
    the final-norm outputs of the `carry` tokens (not fitted on) run along, or None."""
    wide: dict[str, Calibrated] = {}
    gptq = gptq_group(LOW)

    def quantize(members: list[tuple[str, torch.Tensor]], h: torch.Tensor) -> dict[str, Calibrated]:
        for name, w in members:
            spec = wide_spec(source, name)
            if spec is WIDE_FLOAT or (spec is not None and spec.block == WIDE_BLOCK):  # not the file's own values
                w = w if isinstance(w, torch.Tensor) else w.whole()  # a head's rows: read once
                q = quantize_rtn(w, WIDE_FLOAT) if spec is WIDE_FLOAT else quantize_reblocked(w, spec)
                wide[name] = Calibrated(q, output_error(w, q, h))
        return gptq(members, h)

    low, final = calibrate_carrying(reference, ids, quantize, cand, carry)
    return low, wide, final


class _Embedded(StreamedReference):
    """A StreamedReference whose embedding rows come from a quantized table (a tied head's 4-bit form)."""

    def __init__(self, reference: StreamedReference, table):
        super().__init__(reference.config, reference.source)
        self.table = table

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        t, at = self.table, ids.reshape(-1).numpy()
        rows = Quantized(t.codes[at], t.scales[at], t.zero_points[at], t.spec).dequantize()
        return torch.from_numpy(rows).reshape(*ids.shape, -1)


def _compare_heads(h_wide: torch.Tensor, h_low: torch.Tensor, wide_rows, low_rows, vocab: int,
                   targets: torch.Tensor, rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position (T,): KL(wide ‖ low) of the next-token distributions logits = h · Wᵀ, and the NLL of
    `targets` (−1: none) under each, the vocabulary a slice of `rows` head rows at a time (the whole logits of a
    large vocabulary are never held, nor a whole fp32 head). KL = Σ p (a − b) − lse(a) + lse(b), with a, b the
    wide and low logits and p = softmax(a), accumulated with running maxima."""
    T = h_wide.shape[0]
    m_a, z_a, s, m_b, z_b = (torch.full((T,), -math.inf), torch.zeros(T), torch.zeros(T),
                             torch.full((T,), -math.inf), torch.zeros(T))
    t_a, t_b = torch.zeros(T), torch.zeros(T)
    for r in range(0, vocab, rows):
        r1 = min(r + rows, vocab)
        a, b = h_wide @ wide_rows(r, r1).T, h_low @ low_rows(r, r1).T  # (T, n)
        new_a, new_b = torch.maximum(m_a, a.max(1).values), torch.maximum(m_b, b.max(1).values)
        e_a, keep_a = torch.exp(a - new_a[:, None]), torch.exp(m_a - new_a)
        z_a, s = z_a * keep_a + e_a.sum(1), s * keep_a + (e_a * (a - b)).sum(1)
        z_b = z_b * torch.exp(m_b - new_b) + torch.exp(b - new_b[:, None]).sum(1)
        m_a, m_b = new_a, new_b
        hit = (targets >= r) & (targets < r1)
        pos = hit.nonzero()[:, 0]
        t_a[pos], t_b[pos] = a[pos, targets[pos] - r], b[pos, targets[pos] - r]
    lse_a, lse_b = m_a + torch.log(z_a), m_b + torch.log(z_b)
    return s / z_a - lse_a + lse_b, lse_a - t_a, lse_b - t_b


def _choose_head(reference: StreamedReference, group: Group, low: dict, out: dict, final: torch.Tensor,
                 sens: list[int], aside: list[int], allowed: float) -> float | None:
    """The head-only choice, from the streamed pass's final-norm outputs (no model in memory): the head's KL on the
    sensitivity tokens, its 4-bit form chosen when that is within `allowed`; returns the perplexity change on the
    aside tokens (None when not chosen or none are aside). The carried sequence is the sensitivity tokens and then
    the aside ones, so each aside token is predicted with the sensitivity tokens before it as context. A tied head
    is also the export's embedding: its low side runs a second streamed pass from the 4-bit table's rows (and its
    wide side, when that is a written 8-bit table rather than the reference's own values)."""
    p = group.params[0]
    n = len(sens)
    carried = sens + aside
    wide = out[p].quantized if p in out else None  # the written 8-bit form; None: the file's own blocks
    tied = group.layer < 0
    h_wide = _final_hidden(_Embedded(reference, wide), carried)[0] if tied and wide is not None else final[0]
    h_low = _final_hidden(_Embedded(reference, low[p].quantized), carried)[0] if tied else h_wide
    head = reference.head()
    targets = torch.tensor(carried[1:] + [-1])
    targets[:n - 1] = -1  # NLL only where an aside token is predicted

    def wide_rows(r0: int, r1: int) -> torch.Tensor:
        return head[r0:r1] if wide is None else torch.from_numpy(wide.rows(r0, r1).dequantize())

    def low_rows(r0: int, r1: int) -> torch.Tensor:
        return torch.from_numpy(low[p].quantized.rows(r0, r1).dequantize())

    status(f"  measuring the 4-bit head against the wide one on {len(carried)} calibration tokens ...")
    kl, nll_wide, nll_low = _compare_heads(h_wide, h_low, wide_rows, low_rows, head.shape[0], targets)
    group.kl = float(kl[:n].mean())
    group.chosen = group.kl <= allowed
    if not group.chosen or not aside:
        return None
    sel = targets >= 0
    return math.expm1(float(nll_low[sel].mean() - nll_wide[sel].mean()))


@torch.no_grad()
def _final_hidden(reference, ids: list[int]) -> torch.Tensor:
    """The final norm's output (1, T, hidden) over `ids`, one sequence, a layer at a time."""
    _, final = calibrate_carrying(reference, [], None, set(), ids)
    return final


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
                  text=None, max_kl: float | None = None, scope: str = "all") -> tuple[dict[str, Calibrated], dict]:
    """{param: Calibrated} for every weight written in a form other than the recipe-less default (4-bit where
    chosen; a float checkpoint's wide weights as 8-bit), and the report's account of the choice. GPTQ runs on
    `reference` (the fp32 reference a layer at a time). `scope` "all": every group is a candidate, the sensitivities
    measured on `load_model()`, loaded after GPTQ; "head": the LM head alone, measured from the streamed pass's
    final-norm outputs (no model in memory: `_choose_head`)."""
    from qwen2_ref.memory import release_freed_memory

    cfg = reference.config  # a gate's truncation: its first layers, quantized as the whole model's export is
    if not calibrates(ckpt.config):  # the whole model's size decides, as in the export
        gib = ckpt.config.num_parameters() * 4 / 2**30
        status(f"note: the {'mixed' if scope == 'all' else 'head'} recipe runs on models whose fp32 reference is "
               f"{MAX_REFERENCE_BYTES / 2**30:.0f} GiB or less (this one: {gib:.0f} GiB); this size is written as "
               "--quantizer reblock (a GGUF's blocks, else round-to-nearest)")
        return {}, {"method": "none: the fp32 reference is too large to measure on (written as --quantizer reblock)"}
    t0 = time.perf_counter()
    source = _HeadAsTable(ckpt.source) if cfg.tie_word_embeddings else ckpt.source
    groups = [g for g in _groups(cfg, names, source) if scope == "all" or g.name == "head"]
    method = {"all": "mixed: per group 4-bit (GPTQ) or its wide form, by measured sensitivity",
              "head": "head: the LM head 4-bit (GPTQ) or its wide form, by measured sensitivity; every other "
                      "weight as --quantizer reblock"}[scope]
    if not groups:
        status("note: no weight has a wider form than 4-bit to choose from: written as --quantizer reblock")
        return {}, {"method": method, "groups": {}}
    ids, what = calibration_tokens(ckpt.tokenizer(), text, cfg.vocab_size,
                                   CALIBRATION_TOKENS + SENSITIVITY_TOKENS + ASIDE_TOKENS)
    fit, sens, aside = _split(ids)
    overlap = len(ids) < len(fit) + SENSITIVITY_TOKENS
    if overlap:
        least, full = MIN_TOKENS + SENSITIVITY_TOKENS, CALIBRATION_TOKENS + SENSITIVITY_TOKENS + ASIDE_TOKENS
        status(f"note: the calibration text has {len(ids)} tokens: each group's KL is measured on tokens GPTQ fitted, "
               f"which understates it, and the choice is not checked on unseen ones ({least} tokens or more measure "
               f"on unseen ones; {full} give every part its full share)")
    cand = [p for g in groups for p in g.params]
    for g in groups:
        for p in g.params:
            n, k = source.shape(p)
            g.saved += _bytes(wide_spec(source, p), n, k) - _bytes(LOW, n, k)
    allowed = MIXED_BUDGET if max_kl is None else max_kl
    low, out, final = _low_forms(reference, fit, set(cand), source, sens + aside if scope == "head" else None)
    release_freed_memory()
    if scope == "head":
        checked = _choose_head(reference, groups[0], low, out, final, sens, aside, allowed)
        chosen = [g for g in groups if g.chosen]
        combined = sum(g.kl for g in chosen)
    else:
        chosen, combined, checked = _choose_groups(groups, low, out, source, load_model, sens, aside, allowed)
    for g in chosen:
        g.chosen = True
        for p in g.params:
            out[p] = low[p]
    saved = sum(g.saved for g in chosen)
    total_wide = sum(g.saved for g in groups)
    status(f"{'mixed' if scope == 'all' else 'head'} 4-bit: {sum(len(g.params) for g in chosen)} of {len(cand)} "
           f"weights to 4-bit ({saved / 2**20:.0f} of {total_wide / 2**20:.0f} MiB that could be saved), KL to the "
           f"wide weights {combined:.4f} nats/token on the calibration text (--max-kl {allowed:.4f}); "
           + (f"perplexity {checked * 100:+.2f}% on {len(aside)} calibration tokens held aside from the choice; "
              if checked is not None else "")
           + f"{time.perf_counter() - t0:.0f} s")
    info = {"method": method,
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


def _choose_groups(groups: list[Group], low: dict, out: dict, source, load_model, sens: list[int],
                   aside: list[int], allowed: float) -> tuple[list[Group], float, float | None]:
    """Every group's KL measured on the fp32 model in memory (`_Probe`), the choice by KL per byte saved within
    `allowed`, then checked together. Returns the chosen groups, their combined KL and the perplexity change on
    the aside tokens (None when there are none)."""
    from qwen2_ref.memory import release_freed_memory

    model = load_model()
    try:
        params = dict(model.named_parameters())
        params.setdefault("lm_head.weight", model.lm_head.weight)
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
                    else:  # a GGUF's own blocks, written as they are: what the reference was loaded with
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
    finally:
        del model
        release_freed_memory()
    return chosen, combined, checked
