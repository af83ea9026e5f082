"""The parity gate: run an export in ONNX Runtime against the PyTorch reference, prefill plus decode steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qwen2_ref.generate import left_pad
from qwen2_ref.model import Qwen2ForCausalLM

from ..tolerances import Tolerance

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Parity:
    max_abs_logits: float
    per_step_max_abs: list[float]
    top1_agreement: float
    greedy_agreement: float  # ORT's own greedy tokens equal the reference's, as a fraction of steps before divergence
    batch: int
    prompt_tokens: int
    decode_steps: int
    providers: list[str]
    tolerance: dict = field(default_factory=dict)
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


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


@torch.no_grad()
def check_parity(sess, reference: Qwen2ForCausalLM, prompts: Sequence[Sequence[int]], decode_steps: int,
                 tolerance: Tolerance, require_top1: bool = True) -> Parity:
    """Teacher-forced comparison: both runtimes see the reference's greedy tokens, so every step compares the
    same inputs; ORT's own arg-max is tracked for greedy agreement."""
    ids, mask = left_pad(prompts)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    past_ref, past_ort = None, empty_past(sess, ids.shape[0])
    steps, top1, greedy_ok, diverged = [], [], 0, False
    for step in range(decode_steps + 1):
        ref, past_ref = reference(ids, position_ids=pos, attention_mask=mask, past=past_ref)
        got, past_ort = ort_step(sess, ids.numpy(), mask.numpy(), pos.numpy(), past_ort)
        real = mask[:, -ids.shape[1]:].bool().numpy()
        r = ref.float().numpy()
        steps.append(float(np.abs(got.astype(np.float32) - r)[real].max()))
        top1.extend((got.argmax(-1) == r.argmax(-1))[real].tolist())
        nxt = ref[:, -1].argmax(-1)
        if not diverged and bool((torch.from_numpy(got[:, -1].argmax(-1)) == nxt).all()):
            greedy_ok += 1
        else:
            diverged = True
        ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1
    p = Parity(max(steps), steps, float(np.mean(top1)), greedy_ok / (decode_steps + 1), len(prompts),
               max(len(x) for x in prompts), decode_steps, list(sess.get_providers()), asdict(tolerance))
    p.passed = p.max_abs_logits <= tolerance.max_abs_logits and (
        not require_top1 or p.top1_agreement >= tolerance.min_top1_agreement)
    return p
