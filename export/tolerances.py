"""Named parity tolerances: the exporters' gates and the tests import these, so both hold the same bar.

Logit differences are max |Δ| over every compared position (prefill and each decode step), ONNX Runtime vs the
fp32 PyTorch reference on the same weights. Greedy agreement is the fraction of positions whose arg-max matches.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    max_abs_logits: float  # ceiling on max |Δ logits|
    min_top1_agreement: float  # floor on arg-max agreement over compared positions


# Tiny random test models (logits of order 1).
TINY = {
    "fp32": Tolerance(1e-4, 1.0),
    "fp16": Tolerance(2e-2, 0.9),
    "int4": Tolerance(0.5, 0.6),
}

# Real checkpoints (logits of order 10-30; 24+ layers of accumulated rounding). The gate of every export.
GATE = {
    "fp32": Tolerance(5e-3, 1.0),
    "fp16": Tolerance(0.5, 0.9),
    "int4": Tolerance(4.0, 0.75),
}

# Real 0.5B int4 export: perplexity on a fixed text may rise at most this much over the fp32 export.
INT4_MAX_PERPLEXITY_INCREASE = 0.05
