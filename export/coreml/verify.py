"""A saved package as a step function for the parity gate (export/gate.py) and the quality checks
(export/evaluate.py), and the wrapper with the package's own dequantized weights.

The package runs in Core ML itself on macOS and in the numpy MIL executor (`mil_exec`) everywhere else; both expose
`make_state()` / `predict(inputs, state)`, so everything here is written once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..gate import Step
from .model import StatefulQwen2, causal_mask


def open_package(package: Path, backend: str = "auto"):
    """(model, backend name): Core ML on macOS ("auto" or "coreml"), the numpy MIL executor elsewhere."""
    if backend == "coreml" or (backend == "auto" and sys.platform == "darwin"):
        import coremltools as ct

        return ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY), "coreml (CPU_ONLY)"
    from .mil_exec import MILModel

    return MILModel(package), "MIL executor (numpy, Linux)"


def package_step(model) -> Step:
    """A step function over a fresh state of the package (batch 1, no padding: Core ML's I/O has neither)."""
    state = model.make_state()

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        _check_unpadded(ids, mask)
        past = mask.shape[1] - ids.shape[1]
        feeds = {"inputIds": ids.astype(np.int32),
                 "causalMask": causal_mask(past, ids.shape[1]).numpy().astype(np.float16)}
        return np.asarray(model.predict(feeds, state=state)["logits"], dtype=np.float32)

    return step


def wrapper_step(wrapper: StatefulQwen2) -> Step:
    """The conversion-friendly wrapper (cache buffers zeroed) as a step function, for checking it in fp32."""
    wrapper.keyCache.zero_()
    wrapper.valueCache.zero_()

    @torch.no_grad()
    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        _check_unpadded(ids, mask)
        past = mask.shape[1] - ids.shape[1]
        return wrapper(torch.from_numpy(ids.astype(np.int32)), causal_mask(past, ids.shape[1])).float().numpy()

    return step


def _check_unpadded(ids: np.ndarray, mask: np.ndarray) -> None:
    if ids.shape[0] != 1 or not mask.all():
        raise ValueError("a Core ML package runs one unpadded sequence (batch 1)")


def dequantized_wrapper(wrapper: StatefulQwen2, package_model) -> StatefulQwen2:
    """`wrapper` (fp32) with every weight the package compressed replaced by its dequantized value: what the
    package computes, up to fp16 activation rounding. Package weights are named after the parameters
    (program.const_name, a compression pass may add a suffix); the head's slices are rows of the package's one head
    table (the embedding's, when tied)."""
    from .mil_exec import MILModel

    if not isinstance(package_model, MILModel):
        raise TypeError("the dequantized weights are read through the MIL executor")
    weights = package_model.dequantized_weights()
    params = dict(wrapper.named_parameters())
    matched: dict[str, np.ndarray] = {}
    for name, p in params.items():
        key = name.replace(".", "_")
        hits = [k for k in weights if k == key or k.startswith(key + "_")]
        if len(hits) == 1 and weights[hits[0]].shape == tuple(p.shape):
            matched[name] = weights[hits[0]]
    if len({id(v) for v in matched.values()}) != len(weights):
        raise AssertionError(f"matched {len(matched)} of {len(weights)} compressed weights to parameters")
    head = matched.get("ref.lm_head.weight", matched.get("ref.model.embed_tokens.weight"))
    own_slices = any(op.op_type == "const" and op.name == "lm_head_0"  # palettize4: head slices of their own
                     for op in package_model.func.operations)
    if head is not None and not own_slices:
        start = 0
        for j, part in enumerate(wrapper.lm_head):
            matched[f"lm_head.{j}"] = head[start:start + part.shape[0]]
            start += part.shape[0]
    with torch.no_grad():
        for name, p in params.items():
            p.data = torch.from_numpy(matched[name].astype(np.float32)) if name in matched else p.data.clone()
    return wrapper
