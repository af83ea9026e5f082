"""Reference -> Core ML ML Program: trace the stateful wrapper, convert for iOS 18, compress the weights, describe it.

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

import numpy as np
import torch

from qwen2_ref.config import ModelArgs
from qwen2_ref.progress import status

from ..precision import Precision

from .model import StatefulQwen2, causal_mask

# Example length for the trace: any T >= 2 works (the shapes it sees become symbolic); the past is empty.
_TRACE_T = 3


@dataclass(frozen=True)
class NeuralEngineOptions:
    """What a device profile asks of the graph (devices/profiles.toml)."""

    state_multiple: int | None = None  # pad the cache's context dimension to a multiple of this
    max_width: int | None = None  # split the LM head into slices at most this wide
    compute_units: str = "ALL"  # the MLComputeUnits an app should load it with (recorded, not enforced)


def wrap(ref: torch.nn.Module, context: int, ane: NeuralEngineOptions) -> StatefulQwen2:
    return StatefulQwen2(ref, context, ane.state_multiple, ane.max_width).eval()


def convert(wrapper: StatefulQwen2):
    """Trace and convert to an fp16 ML Program with the KV cache as states (not yet compressed, not saved)."""
    import coremltools as ct

    cfg, ctx = wrapper.cfg, wrapper.context
    ids = torch.zeros((1, _TRACE_T), dtype=torch.int32)
    status(f"tracing the stateful wrapper ({cfg.num_hidden_layers} layers, context {ctx}) ...")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (ids, causal_mask(0, _TRACE_T)))
    q_len = ct.RangeDim(1, ctx, default=1, symbol="queryLength")
    end = ct.RangeDim(1, ctx, default=1, symbol="endStep")
    cache = tuple(wrapper.keyCache.shape)
    status("converting to a Core ML ML Program (iOS 18, fp16) ...")
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType("inputIds", shape=(1, q_len), dtype=np.int32),
                ct.TensorType("causalMask", shape=(1, 1, q_len, end), dtype=np.float16)],
        outputs=[ct.TensorType("logits", dtype=np.float16)],
        states=[ct.StateType(ct.TensorType(shape=cache, dtype=np.float16), name="keyCache"),
                ct.StateType(ct.TensorType(shape=cache, dtype=np.float16), name="valueCache")],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram",
        skip_model_load=True,  # Linux has no Core ML runtime; macOS loads it in the tests
    )
    del traced
    return mlmodel


def compression_config(precision: Precision):
    """coremltools.optimize settings for a precision's weight format; None for float weights (no compression).
    affine: `linear` quantization (symmetric per channel, or with offsets per block); palette: k-means tables."""
    from coremltools.optimize import coreml as cto

    fmt = precision.weights
    if fmt is None:
        return None
    if fmt.scheme == "affine":
        granularity = {"granularity": "per_block", "block_size": fmt.block} if fmt.block else \
            {"granularity": "per_channel"}
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric" if fmt.symmetric else "linear",
                                         dtype=f"int{fmt.bits}", **granularity)
    elif fmt.scheme == "palette":
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=fmt.bits, granularity="per_grouped_channel",
                                    group_size=fmt.group)
    else:
        raise ValueError(f"{precision.name}: no Core ML compression for weight scheme {fmt.scheme!r}")
    # Only the weights of linear layers and the embedding (a gather): a global config would also compress the
    # RoPE tables (context x head_dim, above the size threshold) and wreck every position.
    return cto.OptimizationConfig(op_type_configs={"linear": op, "gather": op})


def compress(mlmodel, precision: Precision):
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.models.utils import _apply_graph_pass

    config = compression_config(precision)
    if config is None:
        return mlmodel
    fmt = precision.weights
    status(f"compressing weights ({precision.name}) ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt.scheme == "palette":
            return cto.palettize_weights(mlmodel, config)
        if not (fmt.bits == 4 and fmt.block and not fmt.symmetric):
            return cto.linear_quantize_weights(mlmodel, config)
        quantizer = _clip_searched_int4(fmt.block)
        quantizer.set_options([PassOption("config", config), PassOption("joint_compression", False)])
        return _apply_graph_pass(mlmodel, quantizer)


def _clip_searched_int4(block: int):
    """coremltools' linear quantization pass with its per-block arithmetic replaced by export/quant.py's: asymmetric
    round-to-nearest where each block (of 32 for int4) also searches a clipped [min, max] for the least squared error.
    coremltools' own (plain min/max, range forced to include 0) left the real 0.5B at max |Δ logits| 26.9 and top-1
    agreement 0.82; the same quantizer the ONNX int4 export uses is measured in docs/coreml.md."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize import _utils as optimize_utils
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    from ..quant import QuantSpec, quantize_rtn

    class ClipSearchedInt4(linear_quantize_weights):
        @classmethod
        def blockwise_compress_by_dtype(cls, data, dtype, mode, block_sizes):
            bt = types.string_to_builtin(dtype) if isinstance(dtype, str) else dtype
            if not (bt.get_bitwidth() == 4 and str(mode).upper() == "LINEAR" and data.ndim == 2
                    and list(block_sizes) == [1, block]):
                return super().blockwise_compress_by_dtype(data, dtype, mode, block_sizes)
            q = quantize_rtn(torch.from_numpy(np.asarray(data, dtype=np.float32)), QuantSpec(4, block))
            i4 = types.nptype_from_builtin(types.int4)  # signed codes: (code - 8) - (zero - 8) = code - zero
            return optimize_utils.QuantParams(
                data=(q.codes.astype(np.int16) - 8).astype(i4), scale=q.scales.astype(data.dtype),
                offset=(q.zero_points.astype(np.int16) - 8).astype(i4), nbits=np.uint8(4))

    return ClipSearchedInt4()


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
