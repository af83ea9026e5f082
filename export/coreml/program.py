"""The Core ML program built with coremltools' MIL builder straight from the config and the checkpoint's tensors.

No fp32 model is traced: each weight is read from the checkpoint once, put into its stored format (fp16, or codes
with per-block scales and offsets for `constexpr_blockwise_shift_scale`) and dropped in float form, so the export
holds about the stored bytes of the weights rather than several float copies of them. The program is the same
function as `model.StatefulQwen2` (which stays the readable fp32 statement of this math and is tested against the
reference): the same I/O contract (inputIds, causalMask, keyCache/valueCache states, logits), RMSNorm as LayerNorm
over [x, -x], constant RoPE tables, fused attention, the LM head split below the Neural Engine's width.

Weights (`Weights.linear`), by precision:
- fp16: fp16 constants;
- int8: 8-bit symmetric codes, one fp16 scale per output channel;
- int4: a GGUF tensor keeps its own blocks where the op can express them (Q4_0, Q4_1, Q4_K as 4-bit codes with an
  fp16 scale and offset per 32; Q5_0, Q8_0 per 32 and Q6_K per 16 as 8-bit codes), exactly as llama.cpp
  dequantizes them up to fp16 rounding; float weights (and other GGUF types, and everything with --requantize) get
  asymmetric 4-bit per block of 32 with a clipping search (export/quant.py); --quantizer calibrated gives every
  linear weight GPTQ 4-bit against the reference's own activations (export/calibrate.py). What each tensor got
  goes into the report.
A tied embedding is one table: the embedding's gather and the LM head read the same constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qwen2_ref import rope
from qwen2_ref.config import ModelArgs
from qwen2_ref.progress import counter
from qwen2_ref.weights import WeightSource

from ..precision import Precision
from ..quant import GGUF_EXACT, QuantSpec, quantize_from_gguf, quantize_rtn
from .model import head_slices, padded

ROWS = 8192  # rows of a weight quantized at once (the 151,936-row embedding in 19 blocks)


def const_name(param: str) -> str:
    """The package's name for a parameter's weight (the names `verify.dequantized_wrapper` matches)."""
    return "ref_" + param.replace(".", "_")


@dataclass
class Weights:
    """Reads checkpoint tensors and returns them as MIL constants in the precision's stored format."""

    source: WeightSource
    precision: Precision
    requantize: bool = False  # int4: never carry a GGUF's blocks over
    calibrated: dict = field(default_factory=dict)  # int4: parameter -> Quantized by GPTQ (export/calibrate.py)
    report: dict = field(default_factory=dict)  # parameter -> what was stored
    stored_bytes: float = 0.0  # the weights' bytes in their stored format (4-bit codes count half a byte)

    @property
    def palette(self) -> bool:
        """Palettized after the build (coremltools' k-means pass over fp16 constants)."""
        return self.precision.weights is not None and self.precision.weights.scheme == "palette"

    def has(self, param: str) -> bool:
        if not hasattr(self, "_names"):
            self._names = set(self.source.names())
        return param in self._names

    def float16(self, param: str) -> np.ndarray:
        a = self.source.get(param).to(torch.float16).numpy()
        self.stored_bytes += a.nbytes
        return a

    def linear(self, mb, param: str):
        """A (N, K) weight as a MIL value: an fp16 const or a constexpr_blockwise_shift_scale. Quantized in blocks
        of ROWS rows, so no more than that many rows exist in float32 at once."""
        from coremltools.converters.mil.mil import types

        fmt = self.precision.weights
        if fmt is None or fmt.scheme != "affine":
            self.report[param] = {"format": "fp16"}
            return mb.const(val=self.float16(param), name=const_name(param))
        n, k = self.source.shape(param)
        if fmt.bits == 8:  # symmetric per output channel
            codes, scales = np.empty((n, k), dtype=np.int8), np.empty((n, 1), dtype=np.float16)
            for a in range(0, n, ROWS):
                w = self.source.get_rows(param, a, min(n, a + ROWS)).to(torch.float32)
                s = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8)
                codes[a:a + len(w)] = torch.round(w / s).clamp(-127, 127).to(torch.int8).numpy()
                scales[a:a + len(w)] = s.numpy()
            self.report[param] = {"format": "int8 per channel"}
            return self._constexpr(mb, param, codes, scales, None)
        how, spec, quantize = self._int4(param, k, fmt.block)
        if spec is None:
            self.report[param] = {"format": "fp16", "why": how}
            return mb.const(val=self.float16(param), name=const_name(param))
        data_dt = types.np_uint4_dtype if spec.bits == 4 else np.uint8
        nb = k // spec.block
        codes, scales = np.empty((n, k), dtype=data_dt), np.empty((n, nb), dtype=np.float16)
        offsets = np.empty((n, nb), dtype=np.float16 if spec.float_zp else data_dt)
        for a in range(0, n, ROWS):
            q = quantize(a, min(n, a + ROWS))
            codes[a:a + len(q.codes)] = q.codes.astype(data_dt)
            scales[a:a + len(q.codes)] = q.scales
            offsets[a:a + len(q.codes)] = q.zero_points.astype(offsets.dtype)
        self.report[param] = {"format": how, "bits": spec.bits, "block": spec.block}
        return self._constexpr(mb, param, codes, scales, offsets, spec.bits)

    def _int4(self, param: str, k: int, block: int):
        """(what is stored, its QuantSpec or None for fp16, rows -> Quantized)."""
        if param in self.calibrated:
            q = self.calibrated.pop(param)  # used once
            return (f"GPTQ 4-bit per {q.spec.block} (calibrated)", q.spec, q.rows)
        raw = getattr(self.source, "raw", None)
        gtype = self.source.tensor_type(param) if raw is not None else None
        if gtype in GGUF_EXACT and not self.requantize:
            spec = GGUF_EXACT[gtype][2]
            if k % spec.block == 0:
                blocks = raw(param)[1]
                kind = "4-bit codes" if spec.bits == 4 else "8-bit codes"
                zp = "fp16 offset" if spec.float_zp else "offset"
                return (f"GGUF {gtype} blocks kept ({kind}, fp16 scale and {zp} per {spec.block})", spec,
                        lambda a, b: quantize_from_gguf(gtype, blocks[a:b], self._rows(param, a, b).numpy()))
        if k % block:
            return f"K = {k} is not a multiple of the block ({block})", None, None
        src = f"GGUF {gtype}, re-quantized" if gtype else "float"
        spec = QuantSpec(4, block)
        return (f"4-bit per {block}, clip-searched ({src})", spec,
                lambda a, b: quantize_rtn(self._rows(param, a, b), spec))

    def _rows(self, param: str, a: int, b: int) -> torch.Tensor:
        return self.source.get_rows(param, a, b).to(torch.float32)

    def _constexpr(self, mb, param: str, data: np.ndarray, scales: np.ndarray, offset: np.ndarray | None,
                   bits: int = 8):
        """`bits`: of the codes (and of integer offsets); 4-bit ones are stored two to a byte."""
        kw = {"offset": offset} if offset is not None else {}
        for a in (data, scales, offset):
            if a is not None:
                self.stored_bytes += a.size * bits / 8 if a.dtype.kind in "iu" else a.nbytes
        return mb.constexpr_blockwise_shift_scale(data=data, scale=scales.astype(np.float16), name=const_name(param),
                                                  **kw)


def build_program(cfg: ModelArgs, weights: Weights, context: int, state_multiple: int | None,
                  head_width: int | None):
    """The stateful MIL program (iOS 18) of `cfg` with `weights`; returns (program, context after padding)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    ctx = padded(context, state_multiple)
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    hkv, hd = cfg.num_key_value_heads, cfg.head_dim
    cache = (L, 1, hkv, ctx, hd)
    cos, sin = (t.to(torch.float16).numpy() for t in rope.rope_tables(cfg, ctx))  # (ctx, hd)
    T, E = get_new_symbol(), get_new_symbol()
    i32 = np.int32

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, T), dtype=types.int32),
                             mb.TensorSpec(shape=(1, 1, T, E), dtype=types.fp16),
                             mb.StateTensorSpec(shape=cache, dtype=types.fp16),
                             mb.StateTensorSpec(shape=cache, dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(inputIds, causalMask, keyCache, valueCache):  # noqa: N803 (swift-transformers' names)
        t = mb.slice_by_index(x=mb.shape(x=inputIds), begin=[1], end=[2], name="queryLength")
        end = mb.slice_by_index(x=mb.shape(x=causalMask), begin=[3], end=[4], name="endStep")
        past = mb.sub(x=end, y=t, name="pastLength")
        rows = ([mb.concat(values=[past, i32([0])], axis=0), mb.concat(values=[end, i32([hd])], axis=0)])
        cos_t = mb.slice_by_index(x=cos, begin=rows[0], end=rows[1], name="rope_cos")  # (T, hd)
        sin_t = mb.slice_by_index(x=sin, begin=rows[0], end=rows[1], name="rope_sin")
        embed = weights.linear(mb, "model.embed_tokens.weight")
        x = mb.gather(x=embed, indices=inputIds, axis=0, name="embed")  # (1, T, H)
        with counter("building the Core ML program", L, "layers") as meter:
            for i in range(L):
                p = f"model.layers.{i}."
                h = _rms(mb, x, weights.float16(p + "input_layernorm.weight"), cfg.rms_norm_eps, f"l{i}_norm1")
                x = mb.add(x=x, y=_attention(mb, weights, cfg, i, h, cos_t, sin_t, causalMask, past, end,
                                             keyCache, valueCache), name=f"l{i}_attn_residual")
                h = _rms(mb, x, weights.float16(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps,
                         f"l{i}_norm2")
                gate = mb.linear(x=h, weight=weights.linear(mb, p + "mlp.gate_proj.weight"), name=f"l{i}_gate")
                up = mb.linear(x=h, weight=weights.linear(mb, p + "mlp.up_proj.weight"), name=f"l{i}_up")
                act = mb.mul(x=mb.silu(x=gate, name=f"l{i}_silu"), y=up, name=f"l{i}_swiglu")
                down = mb.linear(x=act, weight=weights.linear(mb, p + "mlp.down_proj.weight"), name=f"l{i}_down")
                x = mb.add(x=x, y=down, name=f"l{i}_mlp_residual")
                meter.update(i + 1)
        x = _rms(mb, x, weights.float16("model.norm.weight"), cfg.rms_norm_eps, "final_norm")
        slices = head_slices(cfg.vocab_size, head_width)
        if weights.palette:  # slices of their own, each a const the palettization pass compresses (stored twice)
            head = weights.source.get("lm_head.weight" if weights.has("lm_head.weight") else
                                      "model.embed_tokens.weight").to(torch.float16).numpy()
            parts = [mb.linear(x=x, weight=mb.const(val=head[a:b], name=f"lm_head_{j}"), name=f"lm_head_{j}_out")
                     for j, (a, b) in enumerate(slices)]
        else:
            table = embed if cfg.tie_word_embeddings else weights.linear(mb, "lm_head.weight")
            if len(slices) == 1:
                return mb.matmul(x=x, y=table, transpose_y=True, name="logits")
            parts = [mb.matmul(x=x, y=mb.slice_by_index(x=table, begin=[a, 0], end=[b, H], name=f"lm_head_{j}_rows"),
                               transpose_y=True, name=f"lm_head_{j}")  # rows of the one table: stored once
                     for j, (a, b) in enumerate(slices)]
        return parts[0] if len(parts) == 1 else mb.concat(values=parts, axis=-1, name="logits")

    return prog, ctx


def convert_program(prog, context: int, fold_constants: bool = False):
    """The program as an ML Program model (iOS 18, fp16), its query and cache lengths flexible up to `context`.
    `fold_constants`: coremltools' constant folding, which palettization needs (it leaves no const with a consumer
    it has no config for)."""
    import coremltools as ct

    q_len = ct.RangeDim(1, context, default=1, symbol="queryLength")
    end = ct.RangeDim(1, context, default=1, symbol="endStep")
    # Without constant folding: it would turn the LM head's row slices of the (tied) table into constants of
    # their own, storing the table twice. The program has nothing else to fold (its constants are built final).
    passes = ct.PassPipeline.DEFAULT
    if not fold_constants:
        passes.remove_passes({"common::const_elimination"})
    return ct.convert(prog, inputs=[ct.TensorType("inputIds", shape=(1, q_len), dtype=np.int32),
                                    ct.TensorType("causalMask", shape=(1, 1, q_len, end), dtype=np.float16)],
                      outputs=[ct.TensorType("logits", dtype=np.float16)],
                      minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                      convert_to="mlprogram", skip_model_load=True, pass_pipeline=passes)


def _rms(mb, x, weight: np.ndarray, eps: float, name: str):
    """RMSNorm as LayerNorm over [x, -x] (mean 0, variance mean(x²)): fused, no fp16 squares."""
    H = weight.shape[0]
    both = mb.concat(values=[x, mb.mul(x=x, y=np.float16(-1), name=f"{name}_neg")], axis=-1, name=f"{name}_pm")
    y = mb.layer_norm(x=both, axes=[-1], epsilon=np.float16(eps), name=f"{name}_ln")
    y = mb.slice_by_index(x=y, begin=[0, 0, 0], end=[0, 0, H], end_mask=[True, True, False], name=f"{name}_half")
    return mb.mul(x=y, y=weight, name=name)


def _rotate(mb, q, hd: int, name: str):
    """q·cos + rotate_half(q)·sin is applied by the caller; this is rotate_half: [-q2, q1]."""
    half = hd // 2
    q1 = mb.slice_by_index(x=q, begin=[0, 0, 0, 0], end=[0, 0, 0, half], end_mask=[True, True, True, False],
                           name=f"{name}_lo")
    q2 = mb.slice_by_index(x=q, begin=[0, 0, 0, half], end=[0, 0, 0, hd], end_mask=[True, True, True, False],
                           name=f"{name}_hi")
    return mb.concat(values=[mb.mul(x=q2, y=np.float16(-1), name=f"{name}_neg"), q1], axis=-1, name=f"{name}_rot")


def _attention(mb, weights: Weights, cfg: ModelArgs, i: int, h, cos, sin, mask, past, end, key_state,
               value_state):
    p = f"model.layers.{i}.self_attn."
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    groups = hq // hkv

    def proj(name: str, heads: int):
        bias = weights.float16(p + f"{name}.bias") if weights.has(p + f"{name}.bias") else None
        kw = {"bias": bias} if bias is not None else {}
        y = mb.linear(x=h, weight=weights.linear(mb, p + f"{name}.weight"), name=f"l{i}_{name}", **kw)
        y = mb.reshape(x=y, shape=[1, -1, heads, hd], name=f"l{i}_{name}_heads")
        return mb.transpose(x=y, perm=[0, 2, 1, 3], name=f"l{i}_{name}_t")  # (1, heads, T, hd)

    def rotary(y, name: str):
        return mb.add(x=mb.mul(x=y, y=cos, name=f"{name}_cos"),
                      y=mb.mul(x=_rotate(mb, y, hd, name), y=sin, name=f"{name}_sin"), name=f"{name}_rope")

    q = rotary(proj("q_proj", hq), f"l{i}_q")
    k = rotary(proj("k_proj", hkv), f"l{i}_k")
    v = proj("v_proj", hkv)
    i32 = np.int32
    begin = mb.concat(values=[i32([i, 0, 0]), past, i32([0])], axis=0, name=f"l{i}_cache_begin")
    stop = mb.concat(values=[i32([i + 1, 1, hkv]), end, i32([hd])], axis=0, name=f"l{i}_cache_end")
    out = []
    for which, new, state in (("key", k, key_state), ("value", v, value_state)):
        cache = mb.read_state(input=state, name=f"l{i}_{which}_read")
        cache = mb.slice_update(x=cache, update=mb.expand_dims(x=new, axes=[0], name=f"l{i}_{which}_new"),
                                begin=begin, end=stop, name=f"l{i}_{which}_write")
        mb.coreml_update_state(state=state, value=cache, name=f"l{i}_{which}_state")
        seen = mb.slice_by_index(x=cache, begin=i32([i, 0, 0, 0, 0]), end=stop, name=f"l{i}_{which}_seen")
        seen = mb.reshape(x=seen, shape=[1, hkv, 1, -1, hd], name=f"l{i}_{which}_groups")
        seen = mb.tile(x=seen, reps=[1, 1, groups, 1, 1], name=f"l{i}_{which}_tiled")
        out.append(mb.reshape(x=seen, shape=[1, hq, -1, hd], name=f"l{i}_{which}s"))  # (1, hq, end, hd)
    att = mb.scaled_dot_product_attention(query=q, key=out[0], value=out[1], attn_mask=mask, name=f"l{i}_sdpa")
    att = mb.transpose(x=att, perm=[0, 2, 1, 3], name=f"l{i}_att_t")
    att = mb.reshape(x=att, shape=[1, -1, hq * hd], name=f"l{i}_att_flat")
    return mb.linear(x=att, weight=weights.linear(mb, p + "o_proj.weight"), name=f"l{i}_o_proj")
