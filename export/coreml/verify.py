"""Run a saved package against the reference: prefill plus decode steps, greedy generation, perplexity.

The package runs in Core ML itself on macOS and in the numpy MIL executor (`mil_exec`) everywhere else; both expose
`make_state()` / `predict(inputs, state)`, so everything here is written once.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..tolerances import Tolerance
from .model import StatefulQwen2, causal_mask

# One step of a model: (new token ids (1, T), tokens already cached) -> logits (1, T, vocab) as float32 numpy.
Step = Callable[[Sequence[int], int], np.ndarray]


@dataclass
class Parity:
    """The fields of the ONNX gate's record (export/onnx/verify.py), batch 1, `backend` for its providers."""

    max_abs_logits: float
    per_step_max_abs: list[float]
    top1_agreement: float
    greedy_agreement: float  # the package's own greedy tokens equal the reference's, fraction of steps before divergence
    prompt_tokens: int
    decode_steps: int
    backend: str
    tolerance: dict = field(default_factory=dict)
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def open_package(package: Path, backend: str = "auto"):
    """(model, backend name): Core ML on macOS ("auto" or "coreml"), the numpy MIL executor elsewhere."""
    if backend == "coreml" or (backend == "auto" and sys.platform == "darwin"):
        import coremltools as ct

        return ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY), "coreml (CPU_ONLY)"
    from .mil_exec import MILModel

    return MILModel(package), "MIL executor (numpy, Linux)"


def package_step(model) -> Step:
    """A stepping function over a fresh state of the package."""
    state = model.make_state()

    def step(ids: Sequence[int], past: int) -> np.ndarray:
        feeds = {"inputIds": np.array([list(ids)], dtype=np.int32),
                 "causalMask": causal_mask(past, len(ids)).numpy().astype(np.float16)}
        return np.asarray(model.predict(feeds, state=state)["logits"], dtype=np.float32)

    return step


def reference_step(reference) -> Step:
    """The fp32 PyTorch reference (`Qwen2ForCausalLM`, cache as a value) or a `StatefulQwen2` wrapper."""
    if isinstance(reference, StatefulQwen2):
        reference.keyCache.zero_()
        reference.valueCache.zero_()

        @torch.no_grad()
        def wrapped(ids, past):
            x = torch.tensor([list(ids)], dtype=torch.int32)
            return reference(x, causal_mask(past, len(ids))).float().numpy()

        return wrapped
    cache = [None]

    @torch.no_grad()
    def step(ids, past):
        x = torch.tensor([list(ids)])
        pos = torch.arange(past, past + len(ids))[None]
        logits, cache[0] = reference(x, position_ids=pos, past=cache[0])
        return logits.float().numpy()

    return step


def check_parity(got: Step, ref: Step, prompt: Sequence[int], decode_steps: int, tolerance: Tolerance,
                 backend: str, require_top1: bool = True) -> Parity:
    """Teacher-forced: both see the reference's greedy tokens; the package's own arg-max gives greedy agreement."""
    ids, past = list(prompt), 0
    steps, top1, greedy_ok, diverged = [], [], 0, False
    for _ in range(decode_steps + 1):
        r, g = ref(ids, past), got(ids, past)
        steps.append(float(np.abs(g - r).max()))
        top1.extend((g.argmax(-1) == r.argmax(-1)).ravel().tolist())
        nxt = int(r[0, -1].argmax())
        if not diverged and int(g[0, -1].argmax()) == nxt:
            greedy_ok += 1
        else:
            diverged = True
        past += len(ids)
        ids = [nxt]
    p = Parity(max(steps), steps, float(np.mean(top1)), greedy_ok / (decode_steps + 1), len(prompt),
               decode_steps, backend, asdict(tolerance))
    p.passed = p.max_abs_logits <= tolerance.max_abs_logits and (
        not require_top1 or p.top1_agreement >= tolerance.min_top1_agreement)
    return p


def greedy(step: Step, prompt: Sequence[int], n: int, stop: Sequence[int] = ()) -> list[int]:
    ids, past, out = list(prompt), 0, []
    for _ in range(n):
        t = int(step(ids, past)[0, -1].argmax())
        out.append(t)
        if t in stop:
            break
        past += len(ids)
        ids = [t]
    return out


def perplexity(step: Step, ids: Sequence[int]) -> float:
    """exp(mean NLL) of ids[1:] given the prefix, in one prefill."""
    logits = step(list(ids), 0)[0, :-1].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return float(np.exp(-lp[np.arange(len(ids) - 1), np.array(ids[1:])].mean()))


def dequantized_wrapper(wrapper: StatefulQwen2, package_model) -> StatefulQwen2:
    """`wrapper` (fp32) with every weight the package compressed replaced by its dequantized value: what the
    package computes, up to fp16 activation rounding. Matches package consts to parameters by their traced names."""
    from .mil_exec import MILModel

    if not isinstance(package_model, MILModel):
        raise TypeError("the dequantized weights are read through the MIL executor")
    weights = package_model.dequantized_weights()
    params = dict(wrapper.named_parameters())
    original = {n: p.detach().clone() for n, p in params.items()}
    matched: dict[str, np.ndarray] = {}
    for name, p in params.items():
        key = name.replace(".", "_")
        hits = [k for k in weights if k == key or k.startswith(key + "_")]
        if len(hits) == 1 and weights[hits[0]].shape == tuple(p.shape):
            matched[name] = weights[hits[0]]
    if len({id(v) for v in matched.values()}) != len(weights):
        raise AssertionError(f"matched {len(matched)} of {len(weights)} compressed weights to parameters")
    # coremltools stores equal consts once: a tied embedding equal to the (single) head slice is the head's const.
    for name in set(params) - set(matched):
        twin = next((m for m in matched if torch.equal(original[name], original[m])), None)
        if twin is not None:
            matched[name] = matched[twin]
    with torch.no_grad():
        for name, p in params.items():
            p.data = torch.from_numpy(matched[name].astype(np.float32)) if name in matched else p.data.clone()
    return wrapper
