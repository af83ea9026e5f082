"""Decode latency of one MoE layer: our qwen2::MoE function body (only chosen experts run) and ONNX Runtime's
com.microsoft MoE kernel (the fused lowering) vs a dense form that computes every expert and masks by the routing
weights. A benchmark: prints a table, asserts nothing.

    python bench/moe.py [--experts 64] [--top-k 8] [--hidden 1024] [--inter 512] [--tokens 1]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx.custom_ops import DOMAIN, MoE  # noqa: E402


def dense_moe_model(x_dim, e, inter, k, weights):
    """All experts computed: stack (E, N, I) then weight by a dense (N, E) routing matrix."""
    g, u, d = weights
    nodes = [
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("TopK", ["p", "k"], ["tv", "ti"], axis=-1),
        helper.make_node("Shape", ["p"], ["pshape"]),
        helper.make_node("ConstantOfShape", ["pshape"], ["zeros"]),
        helper.make_node("ScatterElements", ["zeros", "ti", "tv"], ["route"], axis=1),  # (N, E)
        helper.make_node("Unsqueeze", ["x", "ax0"], ["x3"]),  # (1, N, H)
        helper.make_node("Transpose", ["gate"], ["gT"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["up"], ["uT"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["down"], ["dT"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x3", "gT"], ["gx"]),  # (E, N, I)
        helper.make_node("MatMul", ["x3", "uT"], ["ux"]),
        helper.make_node("Sigmoid", ["gx"], ["sg"]),
        helper.make_node("Mul", ["gx", "sg"], ["silu"]),
        helper.make_node("Mul", ["silu", "ux"], ["h"]),
        helper.make_node("MatMul", ["h", "dT"], ["y"]),  # (E, N, H)
        helper.make_node("Transpose", ["route"], ["rT"], perm=[1, 0]),
        helper.make_node("Unsqueeze", ["rT", "ax2"], ["r3"]),  # (E, N, 1)
        helper.make_node("Mul", ["y", "r3"], ["yw"]),
        helper.make_node("ReduceSum", ["yw", "ax0"], ["out"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(g, "gate"), numpy_helper.from_array(u, "up"), numpy_helper.from_array(d, "down"),
             numpy_helper.from_array(np.array([k], dtype=np.int64), "k"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "ax0"),
             numpy_helper.from_array(np.array([2], dtype=np.int64), "ax2")]
    return _model(nodes, inits, x_dim, e)


def ours_model(x_dim, e, k, weights):
    g, u, d = weights
    nodes = [helper.make_node("MoE", ["x", "logits", "gate", "up", "down"], ["out"], domain=DOMAIN, top_k=k,
                              normalize=0)]
    inits = [numpy_helper.from_array(g, "gate"), numpy_helper.from_array(u, "up"), numpy_helper.from_array(d, "down")]
    m = _model(nodes, inits, x_dim, e)
    m.functions.append(MoE.to_function_proto())
    m.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return m


def ort_moe_model(x_dim, e, k, weights):
    """The fused lowering's node: fc1 = gate and up rows interleaved (E, 2I, H), SwiGLU fused."""
    g, u, d = weights
    fc1 = np.stack([g, u], axis=2).reshape(g.shape[0], 2 * g.shape[1], g.shape[2])
    nodes = [helper.make_node("MoE", ["x", "logits", "fc1", "", "down"], ["out"], domain="com.microsoft", k=k,
                              normalize_routing_weights=0, activation_type="swiglu", swiglu_fusion=1,
                              activation_alpha=1.0, activation_beta=0.0)]
    inits = [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(d, "down")]
    m = _model(nodes, inits, x_dim, e)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


def _model(nodes, inits, h, e):
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", h]),
                                             helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", e])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", h])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def time_it(sess, feeds, reps=30):
    for _ in range(3):
        sess.run(None, feeds)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


@click.command()
@click.option("--experts", default=64)
@click.option("--top-k", default=8)
@click.option("--hidden", default=1024)
@click.option("--inter", default=512)
@click.option("--tokens", default=1)
@click.option("--threads", default=2)
def main(experts, top_k, hidden, inter, tokens, threads):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((experts, inter, hidden), dtype=np.float32) * 0.02,
         rng.standard_normal((experts, inter, hidden), dtype=np.float32) * 0.02,
         rng.standard_normal((experts, hidden, inter), dtype=np.float32) * 0.02)
    feeds = {"x": rng.standard_normal((tokens, hidden), dtype=np.float32),
             "logits": rng.standard_normal((tokens, experts), dtype=np.float32)}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    rows = []
    outs = {}
    for name, m in (("dense all-experts", dense_moe_model(hidden, experts, inter, top_k, w)),
                    ("qwen2::MoE (function body)", ours_model(hidden, experts, top_k, w)),
                    ("com.microsoft MoE (fused lowering)", ort_moe_model(hidden, experts, top_k, w))):
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs[name] = sess.run(None, feeds)[0]
        rows.append((name, time_it(sess, feeds)))
    dense = outs[rows[0][0]]
    diff = max(float(np.abs(o - dense).max()) for o in outs.values())
    print(f"MoE layer: {experts} experts, top-{top_k}, hidden {hidden}, intermediate {inter}, {tokens} token(s), "
          f"{threads} threads (outputs agree with the dense form to {diff:.1e})")
    print("| form | median ms | vs dense |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {rows[0][1] / ms:.1f}x |")


if __name__ == "__main__":
    main()
