"""The Neural Engine options, the fp32 wrapper for checking the program's math, palettization, and the metadata.

One function with a flexible query length (see docs/coreml.md for why not a prefill/decode multifunction package):
  inputIds   (1, T)          int32    the new tokens, 1 <= T <= context
  causalMask (1, 1, T, end)  float16  additive: 0 = attend, a large finite negative = masked; end = past + T
  keyCache, valueCache       states   (layers, 1, kv_heads, context, head_dim) float16
  logits     (1, T, vocab)   float16
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import torch

from qwen2_ref.config import ModelArgs
from qwen2_ref.progress import status

from ..precision import Precision

from .model import StatefulQwen2

@dataclass(frozen=True)
class NeuralEngineOptions:
    """What a device profile asks of the graph (devices/profiles.toml)."""

    state_multiple: int | None = None  # pad the cache's context dimension to a multiple of this
    max_width: int | None = None  # split the LM head into slices at most this wide
    compute_units: str = "ALL"  # the MLComputeUnits an app should load it with (recorded, not enforced)


def wrap(ref: torch.nn.Module, context: int, ane: NeuralEngineOptions) -> StatefulQwen2:
    return StatefulQwen2(ref, context, ane.state_multiple, ane.max_width).eval()


def compress(mlmodel, precision: Precision):
    """Palette precisions: coremltools' k-means palettization of the built fp16 program's linear and embedding
    weights. The affine precisions (int4, int8) are built in their format (program.py) and pass through."""
    fmt = precision.weights
    if fmt is None or fmt.scheme != "palette":
        return mlmodel
    from coremltools.optimize import coreml as cto

    op = cto.OpPalettizerConfig(mode="kmeans", nbits=fmt.bits, granularity="per_grouped_channel",
                                group_size=fmt.group)
    # Only the weights of linear layers, the head (matmul) and the embedding (a gather): a global config would also
    # compress the RoPE tables (context x head_dim, above the size threshold) and wreck every position.
    config = cto.OptimizationConfig(op_type_configs={"linear": op, "matmul": op, "gather": op})
    status(f"compressing weights ({precision.name}) ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cto.palettize_weights(mlmodel, config)


def describe(mlmodel, cfg: ModelArgs, dtype: str, context: int, source: str, license_: str) -> None:
    """Model metadata an app developer sees in Xcode, and the keys swift-transformers reads."""
    mlmodel.short_description = (f"Qwen2 causal language model ({cfg.num_hidden_layers} layers, hidden "
                                 f"{cfg.hidden_size}, vocab {cfg.vocab_size}), {dtype} weights, KV cache as state. "
                                 "Stateful: create one state per conversation with makeState().")
    mlmodel.author = "qwen2-export (weights: Qwen team, Alibaba Cloud)"
    mlmodel.license = license_
    mlmodel.version = "0.1.0"
    mlmodel.input_description["inputIds"] = ("Token ids of the new tokens, shape (1, T), 1 <= T <= "
                                             f"{context}: the whole prompt for prefill, one token per decode step.")
    mlmodel.input_description["causalMask"] = (
        "Additive attention mask (1, 1, T, end), end = tokens already in the cache + T: 0 where a new token may "
        "attend a cache slot, a large finite negative (e.g. -1e4) elsewhere. Its last dimension tells the model "
        "where to write: the new tokens occupy cache slots end-T .. end-1.")
    mlmodel.output_description["logits"] = "Next-token logits (1, T, vocab) for each new token, float16."
    meta = mlmodel.user_defined_metadata
    meta.update({
        "co.huggingface.exporters.architecture": "Qwen2ForCausalLM",
        "co.huggingface.exporters.framework": "pytorch",
        "co.huggingface.exporters.task": "text-generation",
        "qwen2_export.dtype": dtype,
        "qwen2_export.context": str(context),
        "qwen2_export.source": source,
        "qwen2_export.config": json.dumps(cfg.to_hf_config()),
    })
