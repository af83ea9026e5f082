"""The export plan: every choice an export makes, resolved once from the flags, the device profile and the
checkpoint, then handed to the exporter as one frozen value.

Precedence: an explicit flag, else the device profile's value, else the target's default. A flag that overrides the
profile is said out loud (`overrides`, printed by the CLI and kept in the report), never silently. The library and
the CLI share these defaults: `make_plan("onnx", ckpt)` is what `python -m export onnx --checkpoint …` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import devices
from qwen2_ref.checkpoint import Checkpoint
from qwen2_ref.config import ModelArgs, from_name
from qwen2_ref.errors import Qwen2Error

from . import precision as precisions
from . import sizing
from .precision import Precision
from .tolerances import Tolerance

LOWERINGS = ("fused", "function")
# How the fused lowering's attention sees a padded batch (export/onnx/fused.py): "bias" = left padding and a padding
# bias (optimum's convention), "seqlens" = per-row lengths and no bias (onnxruntime-genai's; ORT's fast CUDA paths)
ATTENTION = ("bias", "seqlens")
# ONNX 4-bit quantizers (--quantizer) and the recipe each one puts in the plan
QUANTIZERS = {"calibrated": "calibrated", "exact": "gguf-exact", "head": "head", "mixed": "mixed",
              "reblock": "gguf-reblock", "rtn": "requantize"}
CALIBRATED_RECIPES = ("calibrated", "head", "mixed")  # the recipes that run the model on a calibration text
CHOOSING_RECIPES = ("head", "mixed")  # 4-bit or wide per group, by measured sensitivity (--max-kl)
# ONNX only, and each writes a GGUF's 8-bit codes (Q5_0, Q8_0, Q6_K) on blocks of 128 instead of the file's 32 or
# 16 and folds its float zero points (Q4_K, Q4_1) into their matmuls (quant.carried_spec; a gathered Q4_K table
# as 8-bit codes, quant.gathered_spec): reblock, and the recipes that choose between 4-bit and those codes
# (calibrated keeps a GGUF's blocks exactly where it keeps them, as on Core ML)
REBLOCKING_RECIPES = ("gguf-reblock",) + CHOOSING_RECIPES
# ONNX int4's default from a GGUF, reblock: its 4-bit codes as they are (Q4_K's float zero points folded into the
# same matmul), its 5/6/8-bit ones as 8-bit codes on blocks of 128, which ORT's CPU kernel runs ~1.3x faster than
# the file's 32 or 16. On the real 0.5B GGUF (README, AMD EPYC, 2026-12-07): perplexity +0.40% over fp32 (exact
# +0.21%; the difference is int8-activation rounding noise, README), export 23 s / 1.6 GiB, decode and prefill
# ahead of exact (README tables). head (a 4-bit LM head by GPTQ) measured no faster once the rest was re-blocked,
# and less exact; mixed needs the fp32 model in memory. exact where it does not apply (`_default_quantizer`).
DEFAULT_QUANTIZER = "reblock"
DEFAULTS = {  # the target's own defaults, where neither a flag nor a profile says
    "onnx": {"device": None, "dtype": "fp32", "lowering": "fused"},
    "coreml": {"device": "iphone-15-pro", "dtype": "int4", "context": 4096},
}
CONTEXT_FLAG = {"onnx": "--max-context", "coreml": "--context"}
COMMAND = {"onnx": "python -m export onnx", "coreml": "python -m export coreml"}
RUNTIME_NAME = precisions.RUNTIME


@dataclass(frozen=True)
class GateSettings:
    """The parity gate: on or off, the tolerance it holds (None: the precision's) and its batch (a second, shorter
    row exercises left padding; ONNX only)."""

    enabled: bool = True
    tolerance: Tolerance | None = None
    batch: int = 1


@dataclass(frozen=True)
class ExportPlan:
    target: str  # "onnx" | "coreml"
    precision: Precision
    recipe: str | None  # quantized precisions: "calibrated" (GPTQ against the reference's inputs on a calibration
    # text; a GGUF keeps its exact blocks where they are worth their bits), "mixed" (per group 4-bit or its wide
    # form, by measured sensitivity: export/mixed.py), "head" (the same choice for the LM head alone, the rest
    # as "gguf-reblock"), "gguf-exact" (a GGUF keeps its blocks where the target can run them), "gguf-reblock"
    # (the same with 8-bit codes on blocks of 128), "requantize" (plain round-to-nearest from floats) or
    # "palettize" (Core ML k-means tables); None for floats
    lowering: str | None  # ONNX: "fused" | "function"; Core ML: None
    context: int  # positions the export is made for (Core ML: before padding to the profile's state multiple)
    profile: devices.DeviceProfile | None
    gate: GateSettings
    out: Path
    overwrite: bool = False
    overrides: tuple[str, ...] = field(default=())  # "--dtype fp16 overrides device profile l4's int4", ...
    calibration: Path | None = None  # the calibrated recipe's text (None: the one shipped in export/data)
    attention: str = "bias"  # ONNX fused lowering: "bias" | "seqlens" (ATTENTION)
    max_kl: float | None = None  # the head and mixed recipes' budget (None: export/mixed.py's MIXED_BUDGET)

    @property
    def tolerance(self) -> Tolerance:
        return self.gate.tolerance or self.precision.tolerance

    def describe(self) -> dict:
        """The plan as the export report records it."""
        return {"format": self.target, "dtype": self.precision.name, "activations": self.precision.activations,
                "recipe": self.recipe,
                "lowering": self.lowering, "attention": self.attention if self.lowering == "fused" else None,
                "context": self.context,
                "calibration": (str(self.calibration) if self.calibration else "export/data/calibration.txt")
                if self.recipe in CALIBRATED_RECIPES else None,
                "device_profile": self.profile.name if self.profile else None,
                "gate": "on" if self.gate.enabled else "skipped (--no-verify)", "overrides": list(self.overrides)}


def settle(flag: str, given, profile_value, profile: devices.DeviceProfile | None, notes: list[str]):
    """An explicit flag wins over the profile; a disagreement goes into `notes`."""
    if given is None:
        return profile_value
    if profile is not None and profile_value is not None and given != profile_value:
        notes.append(f"{flag} {given} overrides device profile {profile.name}'s {profile_value}")
    return given


def target_profile(target: str, device: str | devices.DeviceProfile | None) -> devices.DeviceProfile | None:
    """The device profile for `target` (its default when None; a profile object is taken as it is); refuses a
    profile of the other runtime."""
    device = device if device is not None else DEFAULTS[target]["device"]
    if device is None:
        return None
    prof = device if isinstance(device, devices.DeviceProfile) else devices.get(device)
    device = prof.name
    if prof.runtime != target:
        raise Qwen2Error(f"--device {device} runs {RUNTIME_NAME[prof.runtime]}, not {RUNTIME_NAME[target]}; use "
                         f"`{COMMAND[prof.runtime]} --device {device}`")
    return prof


def _precision(target: str, cfg, prof: devices.DeviceProfile | None, dtype: str | None, activations: str | None,
               context: int, lowering: str | None, notes: list[str]) -> Precision:
    """--dtype and --activations, else the profile's (default_dtype "auto": the best that fits), else the
    target's default."""
    if prof is None:
        return precisions.get(target, dtype or DEFAULTS[target]["dtype"]).with_activations(activations)
    if dtype is None and prof.default_dtype == "auto":
        return choose(cfg, prof, context, lowering, activations)
    name = dtype if prof.default_dtype == "auto" else settle("--dtype", dtype, prof.default_dtype, prof, notes)
    what = "--dtype" if dtype is not None else f"device profile {prof.name}'s default_dtype"
    return precision_for(prof, name, activations, what, notes)


def _attention(cfg, prof: devices.DeviceProfile | None, attention: str | None, lowering: str,
               notes: list[str]) -> str:
    """--attention, else the profile's, else "bias". "seqlens" needs GroupQueryAttention in every layer (the fused
    lowering, no Dual Chunk Attention): asked for by flag otherwise, it is refused; by a profile, it is dropped."""
    if attention is not None and attention not in ATTENTION:
        raise Qwen2Error(f"--attention {attention!r} is not one of {', '.join(ATTENTION)}")
    layout = settle("--attention", attention, prof.attention if prof else None, prof, notes) or "bias"
    if layout == "seqlens" and (lowering != "fused" or cfg.dual_chunk_attention_config is not None):
        why = "Dual Chunk Attention layers" if lowering == "fused" else "--lowering function"
        if attention is not None:
            raise Qwen2Error(f"--attention seqlens needs GroupQueryAttention in every layer; {why} keep(s) "
                             "the padding bias: use --attention bias")
        notes.append(f"device profile {prof.name}'s attention seqlens does not apply to {why}: bias")
        layout = "bias"
    return layout


def _default_quantizer(target: str, ckpt: Checkpoint, prec: Precision) -> str:
    """reblock for ONNX int4 with fp32 activations from a GGUF, else exact. Not: Core ML (its own block formats);
    fp16/bf16 activations (the GPU layouts: the 8-bit kernel's speed on blocks of 128 was measured on CPU only);
    float checkpoints (no 8-bit codes to re-block: both write round-to-nearest 4-bit, under exact's name)."""
    return DEFAULT_QUANTIZER if target == "onnx" and prec.activations == "fp32" and ckpt.kind == "gguf" else "exact"


def make_plan(target: str, ckpt: Checkpoint, *, dtype: str | None = None,
              device: str | devices.DeviceProfile | None = None,
              context: int | None = None, lowering: str | None = None, requantize: bool = False,
              quantizer: str | None = None, calibration: str | Path | None = None,
              verify: bool = True, out: str | Path | None = None, overwrite: bool = False,
              tolerance: Tolerance | None = None, gate_batch: int = 1, activations: str | None = None,
              attention: str | None = None, max_kl: float | None = None) -> ExportPlan:
    if target not in precisions.TARGETS:
        raise ValueError(f"unknown target {target!r}")
    prof = target_profile(target, device)
    notes: list[str] = []
    defaults = DEFAULTS[target]
    cfg = ckpt.config
    flag = CONTEXT_FLAG[target]
    ctx = settle(flag, context, prof.default_context if prof else None, prof, notes)
    ctx = ctx or defaults.get("context") or cfg.max_position_embeddings
    longer_ok = target == "onnx" and (cfg.rope_scaling is not None or cfg.dual_chunk_attention_config is not None)
    if ctx > cfg.max_position_embeddings and not longer_ok:
        hint = "; configure YaRN or DCA for longer contexts" if target == "onnx" else ""
        raise Qwen2Error(f"{flag} {ctx} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}{hint}")
    if target == "onnx":
        low = settle("--lowering", lowering, prof.onnx_lowering if prof else None, prof, notes) \
            or defaults["lowering"]
        if low not in LOWERINGS:
            raise Qwen2Error(f"--lowering {low!r} is not one of {', '.join(LOWERINGS)}")
    elif lowering is not None or attention is not None:
        raise Qwen2Error(f"{'--lowering' if lowering is not None else '--attention'} applies to ONNX exports only")
    else:
        low = None
    layout = _attention(cfg, prof, attention, low, notes) if target == "onnx" else "bias"
    prec = _precision(target, cfg, prof, dtype, activations, int(ctx), low, notes)
    if requantize and not prec.quantized:
        raise Qwen2Error(f"--requantize applies to quantized precisions, not {prec.name}")
    if requantize and quantizer not in (None, "rtn"):
        raise Qwen2Error(f"--requantize is --quantizer rtn; it contradicts --quantizer {quantizer}")
    if requantize and target == "coreml" and prec.name != "int4":
        raise Qwen2Error(f"--requantize applies to Core ML int4 (Core ML {prec.name} is made from float weights "
                         "anyway)")
    quantizer = "rtn" if requantize else quantizer
    if quantizer is not None:
        if quantizer not in QUANTIZERS:
            raise Qwen2Error(f"--quantizer {quantizer!r} is not one of {', '.join(QUANTIZERS)}")
        if not prec.quantized or (target == "coreml" and prec.name != "int4"):
            raise Qwen2Error(f"--quantizer applies to ONNX int4 and Core ML int4, not {RUNTIME_NAME[target]} "
                             f"{prec.name}")
    if target == "coreml" and prec.quantized and prec.name != "int4":  # int8 per channel, palettize4: from floats
        recipe = "palettize" if prec.weights.scheme == "palette" else "requantize"
    else:
        recipe = QUANTIZERS[quantizer or _default_quantizer(target, ckpt, prec)] if prec.quantized else None
    if calibration is not None and recipe not in CALIBRATED_RECIPES:
        raise Qwen2Error("--calibration applies to the calibrated, head and mixed quantizers (int4, --quantizer "
                         "calibrated, head or mixed)")
    if recipe in REBLOCKING_RECIPES and target != "onnx":
        raise Qwen2Error(f"--quantizer {quantizer} applies to ONNX int4 (Core ML int4 takes exact, calibrated or "
                         "rtn)")
    if max_kl is not None and recipe not in CHOOSING_RECIPES:
        raise Qwen2Error("--max-kl applies to the head and mixed quantizers (ONNX int4, --quantizer head or mixed)")
    if max_kl is not None and not 0 <= max_kl < float("inf"):
        raise Qwen2Error(f"--max-kl {max_kl}: expected a finite number of nats per token, 0 or more")
    if calibration is not None and not Path(calibration).expanduser().is_file():  # before any work, not at build
        raise Qwen2Error(f"--calibration {calibration}: no such file (expected a UTF-8 text file)")
    if out is None:
        label = ckpt.size or (str(ckpt.path).strip("<>").removeprefix("random ") if ckpt.kind == "random"
                              else ckpt.path.stem)
        out = Path("exports") / (f"qwen2-{label}-{prec.slug}" if target == "onnx" else
                                 f"qwen2-{label}-coreml-{prec.name}")
    return ExportPlan(target, prec, recipe, low, int(ctx), prof, GateSettings(verify, tolerance, gate_batch),
                      Path(out), overwrite, tuple(notes), Path(calibration) if calibration is not None else None,
                      layout, max_kl)


def precision_for(prof: devices.DeviceProfile, name: str, activations: str | None = None, what: str = "--dtype",
                  notes: list[str] | None = None) -> Precision:
    """A --dtype of the profile's runtime computing in `activations` (the flag, else the profile's; a profile's
    activations apply to the precisions that take them, quantized ONNX, and pass the others by)."""
    prec = precisions.get(prof.runtime, name, what)
    if activations is not None:
        settle("--activations", activations, prof.activations if prec.quantized else None, prof,
               notes if notes is not None else [])
        return prec.with_activations(activations)
    return prec.with_activations(prof.activations) if prec.quantized and prof.runtime == "onnx" else prec


def options(cfg: ModelArgs, prof: devices.DeviceProfile, context: int, lowering: str | None = "fused",
            activations: str | None = None) -> list[tuple[Precision, dict]]:
    """Every precision of the profile's runtime with its `fit`, in --dtype order (`activations` applied to those
    that take them)."""
    out = []
    for n in precisions.names(prof.runtime):
        p = precision_for(prof, n, activations if precisions.get(prof.runtime, n).quantized else None)
        out.append((p, sizing.fit(cfg, prof, p, context, lowering)))
    return out


def choose(cfg: ModelArgs, prof: devices.DeviceProfile, context: int, lowering: str | None = "fused",
           activations: str | None = None) -> Precision:
    """default_dtype "auto": the first of the profile's `auto_dtypes` whose weights and KV cache at `context`
    fit its memory; none fitting is a one-line error naming the smallest."""
    tried = [(p, sizing.fit(cfg, prof, p, context, lowering))
             for p in (precision_for(prof, n, activations) for n in prof.auto_dtypes)]
    for p, f in tried:
        if f["fits"]:
            return p
    p, f = min(tried, key=lambda t: t[1]["total_gib"])
    raise Qwen2Error(f"nothing fits device profile {prof.name} ({prof.memory_gib:g} GiB): the smallest, {p.label}, "
                     f"needs {f['total_gib']:.1f} GiB ({f['weights_gib']:.1f} weights + {f['kv_cache_gib']:.1f} KV "
                     f"cache at {context} tokens); pass a shorter --max-context or a device with more memory")


def plan_for(size: str, device: str, dtype: str | None = None, context: int | None = None,
             activations: str | None = None) -> tuple[list[dict], list[str]]:
    """`python -m export plan`: every precision of the profile's runtime for a size at the profile's context
    (unless overridden), one row each (`fit` plus dtype, context and `chosen`: the one `export` would make with
    the same flags; none when nothing fits). Returns the rows and the notes on overridden profile values."""
    prof = devices.get(device)
    notes: list[str] = []
    cfg = from_name(size)
    ctx = settle("--max-context", context, prof.default_context, prof, notes)
    lowering = prof.onnx_lowering if prof.runtime == "onnx" else None
    if dtype is not None:
        if prof.default_dtype != "auto":
            settle("--dtype", dtype, prof.default_dtype, prof, notes)
        chosen = precision_for(prof, dtype, activations, notes=notes)
    elif prof.default_dtype == "auto":
        try:
            chosen = choose(cfg, prof, ctx, lowering, activations)
        except Qwen2Error as e:
            chosen, notes = None, notes + [str(e)]
    else:
        chosen = precision_for(prof, prof.default_dtype, activations, f"device profile {prof.name}'s default_dtype",
                               notes)
    return [f | {"dtype": p.label, "context": ctx, "chosen": p == chosen}
            for p, f in options(cfg, prof, ctx, lowering, activations)], notes
