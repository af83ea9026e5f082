"""What ONNX Runtime's CPU `MatMulNBits` costs per format: a chain of the real 0.5B's MLP shapes (24 layers of
(896 -> 4864) and (4864 -> 896), distinct random weights, ~200 MB, so the weights stream from memory as in a decode
step) at a few rows M (M = 1: decode; M > 1: a speculative verify step or a small batch). Formats alternate within
each round. A benchmark: prints a table, asserts nothing.

    python bench/matmulnbits.py [--formats 4/32,4/64,4/128,8/32] [--rows 1,2,4,8] [--rounds 5]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

HIDDEN, INTER, LAYERS = 896, 4864, 24


def chain(bits: int, block: int, threads: int, accuracy_level: int = 4):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "A"
    for layer in range(LAYERS):
        for name, (k, n) in (("up", (HIDDEN, INTER)), ("down", (INTER, HIDDEN))):
            nb = -(-k // block)
            b, s = f"B{layer}{name}", f"S{layer}{name}"
            inits += [numpy_helper.from_array(rng.integers(0, 256, (n, nb, block * bits // 8), dtype=np.uint8), b),
                      numpy_helper.from_array((rng.random(n * nb) * 2e-3).astype(np.float32), s)]
            nodes.append(helper.make_node("MatMulNBits", [x, b, s], [f"Y{layer}{name}"], domain="com.microsoft",
                                          K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level))
            x = f"Y{layer}{name}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", HIDDEN])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@click.command()
@click.option("--formats", default="4/32,4/64,4/128,8/32", show_default=True, help="bits/block, comma-separated.")
@click.option("--rows", default="1,2,4,8", show_default=True, help="Rows M of the input, comma-separated.")
@click.option("--rounds", default=5, show_default=True)
@click.option("--calls", default=10, show_default=True, help="Calls per measurement.")
@click.option("--threads", default=2, show_default=True)
def main(formats, rows, rounds, calls, threads):
    from peers import cpu_model

    fmts = [tuple(int(v) for v in f.split("/")) for f in formats.split(",")]
    ms = [int(m) for m in rows.split(",")]
    load0 = os.getloadavg()[0]
    sessions = {f: chain(*f, threads) for f in fmts}
    inputs = {m: (np.random.default_rng(m).random((m, HIDDEN)) * 0.1).astype(np.float32) for m in ms}
    times: dict = {(f, m): [] for f in fmts for m in ms}
    for sess in sessions.values():
        sess.run(None, {"A": inputs[ms[0]]})
    for _ in range(rounds):
        for m in ms:
            for f, sess in sessions.items():
                t = time.perf_counter()
                for _ in range(calls):
                    sess.run(None, {"A": inputs[m]})
                times[(f, m)].append((time.perf_counter() - t) / calls * 1e3)
    print(f"\n{cpu_model()}, {os.cpu_count()} cores, {threads} threads, load average {load0:.2f} at the start; "
          f"{LAYERS} x ({HIDDEN}->{INTER}, {INTER}->{HIDDEN}) MatMulNBits, accuracy level 4 (int8 compute); "
          f"median ms per chain over {rounds} rounds\n")
    print("| bits / block | MB of weights | " + " | ".join(f"M={m}" for m in ms) + " | M=1 vs 4/32 |")
    print("|---|---|" + "---|" * len(ms) + "---|")
    base = statistics.median(times[(fmts[0], ms[0])]) if fmts[0] == (4, 32) else None
    for bits, block in fmts:
        mb = LAYERS * 2 * HIDDEN * INTER * (bits / 8 + 4 / block) / 1e6
        med = [statistics.median(times[((bits, block), m)]) for m in ms]
        rel = f"{base / med[0]:.2f}x" if base else "-"
        print(f"| {bits} / {block} | {mb:.0f} | " + " | ".join(f"{v:.2f}" for v in med) + f" | {rel} |")


if __name__ == "__main__":
    main()
