"""Running an ONNX export in ONNX Runtime: a session, one forward step, an empty cache, and the export as a step
function for the parity gate (export/gate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..gate import Step

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session(model_dir: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # the optional `logits_to_keep` input is an initializer: ORT warns about it
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(model_dir) / "model.onnx"), opts, providers=list(providers))


def ort_step(sess, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray],
             logits_to_keep: int = 0):
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
             "position_ids": pos.astype(np.int64)}
    if logits_to_keep:
        feeds["logits_to_keep"] = np.array(logits_to_keep, dtype=np.int64)
    names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    feeds.update(zip(names, past))
    out = sess.run(None, feeds)
    return out[0], out[1:]


def empty_past(sess, batch: int) -> list[np.ndarray]:
    past = []
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            _, kv, _, hd = i.shape
            past.append(np.zeros((batch, kv, 0, hd), dtype=ORT_TYPES[i.type]))
    return past


def onnx_step(sess) -> Step:
    """A session as a step function with a fresh cache (sized from the first step's batch)."""
    past: list = []

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        logits, past[:] = ort_step(sess, ids, mask, pos, past or empty_past(sess, ids.shape[0]))
        return logits.astype(np.float32)

    return step


def backend(sess) -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} {', '.join(sess.get_providers())}"
