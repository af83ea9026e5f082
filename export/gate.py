"""The parity gate, one for every target: an export runs a fixed prompt (prefill + decode steps) against the fp32
PyTorch reference, teacher-forced, and must stay within its precision's tolerance before it is published.

A target supplies a *step function* over its saved output; the reference is one too. A step function is stateful
(it keeps its own KV cache, starting empty) and maps the new tokens of one step to their logits:

    step(input_ids (B, T) int64, attention_mask (B, past + T) int64, position_ids (B, T) int64) -> logits (B, T, V)

The gate runs in two phases so that the reference and the export never sit in memory together: the reference's
steps are recorded first (inputs, logits, its greedy tokens), the reference is released, then the export replays the
same inputs. Both see the reference's greedy tokens, so every step compares like with like; the export's own arg-max
gives the greedy agreement.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from qwen2_ref.errors import Qwen2Error
from qwen2_ref.generate import left_pad
from qwen2_ref.memory import available_memory_bytes, release_freed_memory
from qwen2_ref.progress import status

from .tolerances import Tolerance

GATE_PROMPT = "def quicksort(items):\n    if len(items) <= 1:\n        return items\n"
GATE_DECODE_STEPS = 4
RANDOM_PROMPT_TOKENS = 24  # a checkpoint without a tokenizer: this many fixed pseudo-random ids

Step = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class ParityError(Qwen2Error):
    """The export does not compute what the reference does, beyond its precision's tolerance."""


@dataclass
class Parity:
    max_abs_logits: float  # over every compared position of every step
    per_step_max_abs: list[float]  # prefill first, then each decode step
    top1_agreement: float  # fraction of compared positions whose arg-max matches
    greedy_agreement: float  # the export's own greedy tokens equal the reference's: fraction of steps before divergence
    batch: int
    prompt_tokens: int
    decode_steps: int
    backend: str  # what ran the export ("onnxruntime CPUExecutionProvider", "MIL executor (numpy, Linux)", ...)
    tolerance: dict = field(default_factory=dict)
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReferenceRun:
    """The reference's teacher-forced steps: each step's inputs and logits (float32)."""

    prompts: list[list[int]]
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # (ids, mask, pos, logits)

    @property
    def decode_steps(self) -> int:
        return len(self.steps) - 1


def reference_step(model) -> Step:
    """A `qwen2_ref` Qwen2ForCausalLM (cache as a value) as a step function."""
    cache = [None]

    @torch.no_grad()
    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        logits, cache[0] = model(torch.from_numpy(ids), position_ids=torch.from_numpy(pos),
                                 attention_mask=torch.from_numpy(mask), past=cache[0])
        return logits.float().numpy()

    return step


def record(reference: Step, prompts: Sequence[Sequence[int]], decode_steps: int) -> ReferenceRun:
    """Run the reference over the prompts (left-padded) and `decode_steps` greedy steps, keeping every step."""
    ids, mask = left_pad(prompts)
    ids, mask = ids.numpy(), mask.numpy()
    pos = np.where(mask == 0, 1, mask.cumsum(-1) - 1)
    steps = []
    for _ in range(decode_steps + 1):
        logits = reference(ids, mask, pos)
        steps.append((ids, mask, pos, logits))
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        pos = mask.sum(-1, keepdims=True) - 1
    return ReferenceRun([list(p) for p in prompts], steps)


def compare(target: Step, run: ReferenceRun, tolerance: Tolerance, backend: str, require_top1: bool = True
            ) -> Parity:
    """Replay the reference's inputs through `target`; padded positions are not compared."""
    per_step, top1, greedy_ok, diverged = [], [], 0, False
    for ids, mask, pos, want in run.steps:
        got = np.asarray(target(ids, mask, pos), dtype=np.float32)
        real = mask[:, -ids.shape[1]:].astype(bool)
        per_step.append(float(np.abs(got - want)[real].max()))
        top1.extend((got.argmax(-1) == want.argmax(-1))[real].tolist())
        if not diverged and bool((got[:, -1].argmax(-1) == want[:, -1].argmax(-1)).all()):
            greedy_ok += 1
        else:
            diverged = True
    p = Parity(max(per_step), per_step, float(np.mean(top1)), greedy_ok / len(run.steps), len(run.prompts),
               max(len(x) for x in run.prompts), run.decode_steps, backend, asdict(tolerance))
    p.passed = p.max_abs_logits <= tolerance.max_abs_logits and (
        not require_top1 or p.top1_agreement >= tolerance.min_top1_agreement)
    return p


def check_parity(target: Step, reference: Step, prompts: Sequence[Sequence[int]], decode_steps: int,
                 tolerance: Tolerance, backend: str = "", require_top1: bool = True) -> Parity:
    """Teacher-forced comparison of two fresh step functions."""
    return compare(target, record(reference, prompts, decode_steps), tolerance, backend, require_top1)


# ---- the gate of an export -------------------------------------------------------------------------------------
def gate_prompts(vocab_size: int, tokenizer, batch: int = 1) -> list[list[int]]:
    """The gate prompt (tokenized, or fixed random ids without a tokenizer); extra rows are shorter prefixes, so
    a batch exercises left padding."""
    if tokenizer is not None:
        ids = tokenizer.encode(GATE_PROMPT)
    else:
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, vocab_size, (RANDOM_PROMPT_TOKENS,), generator=g).tolist()
    return [ids] + [ids[: max(2, len(ids) // 2 - i)] for i in range(batch - 1)]


@dataclass
class GateSubject:
    """What a target hands the gate: how to build the reference and how to open its export, each on demand."""

    reference: Callable[[], Step]  # a fresh fp32 reference step (its model is freed when the step is dropped)
    target: Callable[[], tuple[Step, str]]  # a fresh step over the saved export, and the backend that runs it
    scope: str  # "full model", or which layers a truncated gate checks


def run_gate(subject: AbstractContextManager[GateSubject], prompts: list[list[int]], tolerance: Tolerance,
             require_top1: bool, what: str) -> dict:
    """Record the reference, release it, replay through the export; raise ParityError beyond the tolerance."""
    with subject as s:
        status(f"verifying {s.scope}: the reference's steps ...")
        run = record(s.reference(), prompts, GATE_DECODE_STEPS)  # the reference is freed on return
        release_freed_memory()
        status(f"verifying {s.scope}: the export's steps ...")
        step, backend = s.target()
        p = compare(step, run, tolerance, backend, require_top1)
        del step
    result = p.to_dict() | {"scope": s.scope, "top1_floor_applied": require_top1}
    verdict = parity_verdict(p, tolerance, require_top1, what, s.scope)
    if not p.passed:
        raise ParityError(f"parity gate failed for the {what}: {verdict}; nothing was written")
    status(f"parity: {verdict}")
    return result


def parity_verdict(p: Parity, tolerance: Tolerance, require_top1: bool, what: str, scope: str = "full model") -> str:
    """PASS or FAIL, each measure against its bound, and what ran: `PASS max |Δ logits| 1.23e-03 ≤ 5.0e-03, top-1
    agreement 1.000 ≥ 1.00, greedy agreement 1.00 (fp32 ONNX export, 19-token prefill + 4 decode steps)`. A top-1
    floor the gate does not apply (random weights) is said to be unchecked."""
    logits = "≤" if p.max_abs_logits <= tolerance.max_abs_logits else ">"
    text = (f"{'PASS' if p.passed else 'FAIL'} max |Δ logits| {p.max_abs_logits:.2e} {logits} "
            f"{tolerance.max_abs_logits:.1e}, top-1 agreement {p.top1_agreement:.3f} ")
    if require_top1:
        top1 = "≥" if p.top1_agreement >= tolerance.min_top1_agreement else "<"
        text += f"{top1} {tolerance.min_top1_agreement:.2f}"
    else:
        text += "(no floor: random weights)"
    where = "" if scope == "full model" else f"{scope}, "
    batch = f"batch {p.batch}, " if p.batch > 1 else ""
    return (f"{text}, greedy agreement {p.greedy_agreement:.2f} ({what}, {where}{batch}{p.prompt_tokens}-token "
            f"prefill + {p.decode_steps} decode steps)")


def require_memory(need: int, what: str, remedy: str) -> None:
    """Refuse before any work when the machine has less memory available than `need` bytes."""
    have = available_memory_bytes()
    if have is not None and need > have:
        raise Qwen2Error(f"{what} needs about {need / 2**30:.0f} GiB of memory, {have / 2**30:.0f} GiB is "
                         f"available; {remedy}")
