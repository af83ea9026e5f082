"""Long-context DCA + YaRN through ONNX Runtime with chunked prefill: does memory follow the prefill chunk or the
context length? A benchmark: prints a table, asserts nothing.

A tiny-width model (hidden 64, 2 layers, 4/2 heads of 16) with the long-context settings of a 128K model (YaRN
factor 4 over 32K, DCA chunk 8192 / local 512) is exported once (fp32, function lowering: DualChunkAttention with
its key-blocked online softmax). Each prompt length then runs in a fresh process: chunked prefill through ORT, the
last chunk's logits and 4 greedy decode steps checked against the PyTorch reference run the same way (chunked,
so the reference fits too), and the process's peak RSS recorded.

    python bench/long_context.py [--lengths 8192,32768,131072] [--chunk 512]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2_ref.config import DualChunkConfig, RopeScaling, from_name  # noqa: E402
from qwen2_ref.memory import peak_rss_mib  # noqa: E402

CFG = from_name("tiny").replace(
    max_position_embeddings=131072, rope_scaling=RopeScaling("yarn", 4.0, 32768),
    dual_chunk_attention_config=DualChunkConfig(chunk_size=8192, local_size=512))


def one(folder: Path, n: int, chunk: int, check: bool) -> dict:
    import torch

    from export.onnx import reference_model
    from export.onnx.verify import empty_past, ort_step, session
    from qwen2_ref.checkpoint import Checkpoint
    from qwen2_ref.weights import RandomSource

    ids = np.random.default_rng(n).integers(0, CFG.vocab_size, n)
    sess = session(folder, threads=2)
    base = peak_rss_mib()
    past, t0 = empty_past(sess, 1), time.perf_counter()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        logits, past = ort_step(sess, ids[None, s:e], np.ones((1, e), np.int64), np.arange(s, e)[None], past,
                                logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    got = [logits[0, -1]]
    toks = [int(logits[0, -1].argmax())]
    for i in range(4):
        logits, past = ort_step(sess, np.array([[toks[-1]]]), np.ones((1, n + i + 1), np.int64),
                                np.array([[n + i]]), past)
        got.append(logits[0, -1])
        toks.append(int(logits[0, -1].argmax()))
    out = {"tokens": n, "chunk": chunk, "prefill_s": round(prefill_s, 1), "session_rss_mib": round(base),
           "peak_rss_mib": round(peak_rss_mib()),
           "kv_cache_mib": round(sum(p.nbytes for p in past) / 2**20, 1)}
    if check:
        ckpt = Checkpoint(Path("<random>"), CFG, RandomSource(CFG), "random", random_weights=True)
        ref = reference_model(ckpt)
        with torch.no_grad():
            kv = ref.empty_past(1)
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                lg, kv = ref(torch.from_numpy(ids[None, s:e]), position_ids=torch.arange(s, e)[None],
                             attention_mask=torch.ones(1, e, dtype=torch.long), past=kv, logits_to_keep=1)
            want = [lg[0, -1]]
            for i in range(4):
                lg, kv = ref(torch.tensor([[toks[i]]]), position_ids=torch.tensor([[n + i]]),
                             attention_mask=torch.ones(1, n + i + 1, dtype=torch.long), past=kv)
                want.append(lg[0, -1])
        out["max_abs_dlogits"] = float(max(np.abs(g - w.numpy()).max() for g, w in zip(got, want)))
    return out


@click.command()
@click.option("--lengths", default="8192,32768,131072")
@click.option("--chunk", default=512)
@click.option("--check-up-to", default=32768, help="compare with the reference for lengths up to this")
@click.option("--one-run", nargs=3, type=(str, int, int), default=None, hidden=True)
def main(lengths, chunk, check_up_to, one_run):
    if one_run:
        folder, n, check = one_run
        print(json.dumps(one(Path(folder), n, chunk, bool(check))))
        return
    from export.onnx import export_onnx
    from export.plan import make_plan
    from qwen2_ref.checkpoint import Checkpoint
    from qwen2_ref.weights import RandomSource

    os.environ.setdefault("QWEN2_QUIET", "1")
    with tempfile.TemporaryDirectory() as td:
        folder = Path(td) / "dca"
        ckpt = Checkpoint(Path("<random>"), CFG, RandomSource(CFG), "random", random_weights=True)
        export_onnx(ckpt, make_plan("onnx", ckpt, dtype="fp32", context=131072, lowering="function", out=folder))
        print("| prompt tokens | DCA chunks | prefill chunk | prefill s | KV cache MiB | RSS after load MiB "
              "| peak RSS MiB | max abs dlogits vs reference (last chunk + 4 decode) |\n|---|---|---|---|---|---|---|---|")
        for n in (int(x) for x in lengths.split(",")):
            r = subprocess.run([sys.executable, __file__, "--chunk", str(chunk), "--one-run", str(folder), str(n),
                                str(int(n <= check_up_to))], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:])
                continue
            d = json.loads(r.stdout.strip().splitlines()[-1])
            dl = f"{d['max_abs_dlogits']:.2e}" if "max_abs_dlogits" in d else "not checked"
            print(f"| {n} | {n / CFG.dual_chunk_attention_config.chunk_len:.1f} | {chunk} | {d['prefill_s']} "
                  f"| {d['kv_cache_mib']} | {d['session_rss_mib']} | {d['peak_rss_mib']} | {dl} |", flush=True)


if __name__ == "__main__":
    main()
