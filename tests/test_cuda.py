"""On a GPU: the CUDA profiles' layout run by ONNX Runtime's CUDA provider (bench/gpu_check.sh runs these with
`-m cuda`). Without an NVIDIA GPU and onnxruntime-gpu every test here is skipped and says why; the same graphs
are proved on the CPU provider by the default run (test_export_onnx.py::test_gpu_layout_on_the_cpu_twin).

`QWEN2_GPU_EXPORTS=DIR` (set by bench/gpu_check.sh) adds the real 0.5B exports in DIR/int4 and DIR/fp16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from export.gate import check_parity, reference_step
from export.onnx import dequantized_reference, export_step, reference_model
from export.tolerances import GATE, GATE_ACTIVATIONS, TINY, TINY_DEQUANTIZED_ACTIVATIONS
from qwen2_ref.generate import SamplingParams
from runtime import Runner, SessionSettings
from runtime.session import cuda_unusable

CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
PROMPTS = [[5, 9, 200, 31, 77, 12, 400, 3, 3, 8, 51], [8, 1, 3, 99, 7], [301, 17, 45, 2, 260, 11, 90, 6]]


REASON = cuda_unusable()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=f"no GPU: {REASON}")]


def cuda_only_session(folder: Path):
    """A session that fails to load if any node would fall back to the CPU (no CUDA kernel for it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=list(CUDA))


@pytest.mark.parametrize("dtype,activations", [("int4", "fp16"), ("fp16", None)])
def test_gpu_layout_runs_wholly_on_cuda(tiny_export, dtype, activations):
    """Every node of the GPU layout has a CUDA kernel (GroupQueryAttention without a bias, MatMulNBits with fp16
    activations), and the export matches the reference on CUDA, batch 1 and a batch of 2."""
    kw = {"activations": activations} if activations else {}
    ckpt, out, report = tiny_export("tiny", dtype, "fused", attention="seqlens", **kw)
    cuda_only_session(out)
    tol = TINY[dtype]
    for batch in (PROMPTS[:1], PROMPTS[:2]):
        step, backend = export_step(out, CUDA, (report["activations"], "seqlens"))
        p = check_parity(step, reference_step(reference_model(ckpt)), batch, 4, tol, backend)
        assert "CUDAExecutionProvider" in backend and p.max_abs_logits <= tol.max_abs_logits, p
    if dtype == "int4":
        d_tol = TINY_DEQUANTIZED_ACTIVATIONS["fp16"]
        step, backend = export_step(out, CUDA, ("fp16", "seqlens"))
        d = check_parity(step, reference_step(dequantized_reference(ckpt, report, out)), PROMPTS[:2], 4, d_tol,
                         backend)
        assert d.max_abs_logits <= d_tol.max_abs_logits, d


def test_runner_keeps_the_cache_and_greedy_on_the_gpu(tiny_export):
    """On CUDA the runner's cache and logits stay on the device and greedy arg-max runs there; its tokens agree
    with the CPU twin's (same graph, the CPU provider) on a batch of three prompts of different lengths."""
    _, out, _ = tiny_export("tiny", "int4", "fused", activations="fp16", attention="seqlens")
    gpu = Runner(out, SessionSettings(providers=CUDA))
    cpu = Runner(out, SessionSettings())
    assert gpu.device == "cuda" and gpu.greedy_on_device and gpu.per_row and gpu.shared_kv
    params = SamplingParams(max_new_tokens=16)
    a = np.array(list(gpu.generate(PROMPTS, params)))
    b = np.array(list(cpu.generate(PROMPTS, params)))
    assert gpu.cache.bufs[0][0].host is None  # device memory
    assert (a == b).mean() >= 0.9, (a, b)  # fp16 kernels differ; tiny random logits have small margins


REAL = os.environ.get("QWEN2_GPU_EXPORTS")


@pytest.mark.skipif(REAL is None, reason="QWEN2_GPU_EXPORTS is not set (bench/gpu_check.sh sets it)")
@pytest.mark.parametrize("name", ["int4", "fp16"])
def test_real_export_parity_on_cuda(name, real_checkpoint):
    """The real 0.5B's GPU-layout exports, gated on the CPU at export time, hold their tolerance on CUDA too."""
    folder = Path(REAL) / name
    rep = json.loads((folder / "export_report.json").read_text())
    cuda_only_session(folder)
    tol = GATE_ACTIVATIONS[rep["activations"]] if name == "int4" else GATE["fp16"]
    step, backend = export_step(folder, CUDA, (rep["activations"], rep["plan"]["attention"]))
    prompts = [real_checkpoint.tokenizer().encode("def quicksort(items):\n")]
    p = check_parity(step, reference_step(reference_model(real_checkpoint)), prompts, 8, tol, backend)
    assert p.passed, p
