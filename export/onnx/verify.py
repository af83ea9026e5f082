"""Running an ONNX export in ONNX Runtime: a session, one forward step, an empty cache, and the export as a step
function for the parity gate (export/gate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..gate import Step
from ..quant import unfolded_blocks

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


def seqlens_step(sess) -> Step:
    """A session of a "seqlens"-layout graph (per-row lengths, no padding bias) as a step function over the gate's
    left-padded steps, run the way a runner must run that layout: a step with several tokens (a prompt) row by
    row at batch 1 on the row's real tokens only, a one-token step (decode) for the whole batch with each row's
    keys from position 0 and an attention mask of its own length. Logits come back where the left-padded layout
    has them (padded positions are zeros; the gate does not compare them)."""
    state: dict = {}

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        B, T = ids.shape
        real = mask[:, -T:].astype(bool)
        if not state:
            state["lens"] = np.zeros(B, dtype=np.int64)
            state["past"] = empty_past(sess, B)
        lens, past = state["lens"], state["past"]
        if T == 1 and real.all():  # decode: the batch together, mask rows as long as each row's keys + 1
            width = int(lens.max()) + 1
            m = (np.arange(width)[None, :] < (lens + 1)[:, None]).astype(np.int64)
            logits, present = ort_step(sess, ids, m, lens[:, None], [p[:, :, :width - 1] for p in past])
            state["past"], state["lens"] = present, lens + 1
            return logits.astype(np.float32)
        out, rows = None, []
        for b in range(B):
            n = int(lens[b])
            logits, present = ort_step(sess, ids[b:b + 1, real[b]], np.ones((1, n + int(real[b].sum()))),
                                       pos[b:b + 1, real[b]], [p[b:b + 1, :, :n] for p in past])
            if out is None:
                out = np.zeros((B, T, logits.shape[-1]), dtype=np.float32)
            out[b, real[b]] = logits[0]
            rows.append(present)
        state["lens"] = lens + real.sum(-1)
        width = int(state["lens"].max())
        state["past"] = [np.stack([np.pad(r[i][0], ((0, 0), (0, width - r[i].shape[2]), (0, 0))) for r in rows])
                         for i in range(len(past))]
        return out

    return step


def backend(sess) -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} {', '.join(sess.get_providers())}"


def read_dequantized(folder: Path, report: dict, cfg) -> dict[str, np.ndarray]:
    """The values an export's MatMulNBits weights stand for, read back from its files: {parameter name: (N, K)}.
    Packed Q/K/V rows are split back into q, k and v. (QMoE experts are not read here.)"""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(Path(folder) / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    rows = {"q_proj": (0, q_rows), "k_proj": (q_rows, q_rows + kv_rows), "v_proj": (q_rows + kv_rows, None)}
    out = {}
    for name, q in report["quantized"].items():
        base, lo, hi = name, 0, None
        if f"{name}.q{q['bits']}" not in inits:
            proj = next((p for p in rows if f".{p}." in name), None)
            if proj is None:
                continue
            base, (lo, hi) = name.replace(proj, "qkv_proj"), rows[proj]
        arr = {k: numpy_helper.to_array(inits[f"{base}.{k}"]) for k in (f"q{q['bits']}", "scales", "zero_points",
                                                                         "zero_points_int", "offsets")
               if f"{base}.{k}" in inits}
        out[name] = _dequantize_nbits(arr, q["bits"], q["block"], q.get("folded", False))[lo:hi]
    return out


def _dequantize_nbits(arr: dict[str, np.ndarray], bits: int, block: int, folded: bool = False) -> np.ndarray:
    """MatMulNBits' (B, scales, zero_points | offsets) -> float weights (N, K·blocks). `folded`: the row's last
    2·G blocks are its remainders' low and high digits (quant.Quantized._pack_folded), added back per block."""
    b = arr[f"q{bits}"]
    n = b.shape[0]
    nb = arr["scales"].size // n
    b = b.reshape(n, nb, -1)  # a GatherBlockQuantized table stores (N, nb·blob)
    if bits == 4:
        codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(n, nb, block)  # low nibble first
    else:
        codes = b.reshape(n, nb, block)
    scales = arr["scales"].reshape(n, nb)
    half = float(1 << (bits - 1))  # the zero point when none is stored
    # float zero points: integer zero points (or none: 2^(bits-1), exports before 2026-12-03) + per-block offsets
    zp = arr.get("zero_points_int", arr.get("zero_points"))
    if zp is None:
        z = np.full((n, nb), half, dtype=np.float32)
    elif zp.dtype.kind == "f":  # float zero points as stored (a tied float-zero-point table: the head reads them)
        z = zp.reshape(n, nb).astype(np.float32)
    elif bits == 4:
        z = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
    else:
        z = zp.reshape(n, nb).astype(np.float32)
    w = (codes - z[..., None]) * scales[..., None]
    if folded:
        main = unfolded_blocks(nb, block)
        g = (nb - main) // 2
        rest = w[:, main:main + g] + w[:, main + g:]  # σ·(c_lo − Z_lo) + 16·σ·(c_hi − Z_hi), per group
        w = w[:, :main] + rest.reshape(n, -1)[:, :main, None]
        nb = main
    if "offsets" in arr:
        w = w + arr["offsets"].T[..., None]
    return w.reshape(n, nb * block).astype(np.float32)
