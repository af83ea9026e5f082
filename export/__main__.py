"""`python -m export onnx|coreml|plan ...` — a thin click CLI; each command body is one call into the library."""

from __future__ import annotations

from pathlib import Path

import click

from qwen2_ref.__main__ import run_cli
from qwen2_ref.config import SIZES
from qwen2_ref.errors import Qwen2Error

import devices

DTYPE_CHOICES = ["fp32", "fp16", "int4"]


def _settle(flag: str, given, profile_value, profile_name: str | None):
    """An explicit flag wins over the profile; a disagreement is said out loud, never silent."""
    if given is None:
        return profile_value
    if profile_name and profile_value is not None and given != profile_value:
        click.echo(f"note: {flag} {given} overrides device profile {profile_name}'s {profile_value}", err=True)
    return given


@click.group()
def cli() -> None:
    """Export Qwen2 models, proved equivalent to the PyTorch reference."""


@cli.command()
@click.option("--size", type=click.Choice(list(SIZES)), help="Model size (inferred from --checkpoint if given).")
@click.option("--checkpoint", type=click.Path(), help="Hugging Face folder or .gguf file.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Weights: fp32, fp16 or int4 (MatMulNBits). Default: the device profile's, else fp32.")
@click.option("--device", "device", type=click.Choice(list(devices.profiles())), default=None,
              help="Device profile that sets the defaults.")
@click.option("--out", type=click.Path(), default=None, help="Output folder (default ./exports/qwen2-SIZE-DTYPE).")
@click.option("--max-context", type=click.IntRange(1), default=None, help="Context length recorded for runtimes.")
@click.option("--random-weights", is_flag=True, help="Random weights: architecture-only work, no checkpoint.")
@click.option("--requantize", is_flag=True,
              help="int4 from a GGUF: re-quantize every weight to 4 bits instead of carrying its blocks over.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-verify", is_flag=True, help="Skip the parity gate (the report says so).")
@click.option("--lowering", type=click.Choice(["fused", "function"]), default=None,
              help="fused: ONNX Runtime's kernels (GroupQueryAttention with rotary, MoE, SkipSimplifiedLayerNorm); "
                   "function: standard ops plus the qwen2 domain's function bodies, for any runtime. "
                   "Default: the device profile's, else fused.")
def onnx(size, checkpoint, dtype, device, out, max_context, random_weights, requantize, overwrite, no_verify,
         lowering):
    """Export to ONNX (ONNX Runtime CPU/CUDA)."""
    from qwen2_ref.checkpoint import resolve_checkpoint

    from .onnx import export_onnx

    prof = devices.get(device) if device else None
    if prof is not None and prof.runtime != "onnx":
        raise Qwen2Error(f"--device {device} runs Core ML, not ONNX; use `python -m export coreml --device {device}`")
    dtype = _settle("--dtype", dtype, prof.default_dtype if prof else None, device) or "fp32"
    context = _settle("--max-context", max_context, prof.default_context if prof else None, device)
    lowering = _settle("--lowering", lowering, prof.onnx_lowering if prof else None, device) or "fused"
    if checkpoint is None and size is None:
        raise click.UsageError("pass --size or --checkpoint")
    ckpt = resolve_checkpoint(size, checkpoint, random_weights)
    name = ckpt.size or Path(str(checkpoint or size)).stem
    out = Path(out) if out else Path("exports") / f"qwen2-{name}-{dtype}"
    export_onnx(ckpt, out, dtype, context=context, verify=not no_verify, overwrite=overwrite,
                requantize=requantize, device_profile=device, lowering=lowering)


COREML_SIZES = ["0.5b", "1.5b"]  # the phone-class sizes
COREML_DTYPES = ["int4", "int8", "fp16", "palettize4"]


@cli.command()
@click.option("--size", type=click.Choice(COREML_SIZES), help="Model size (inferred from --checkpoint if given).")
@click.option("--checkpoint", type=click.Path(), help="Hugging Face folder or .gguf file.")
@click.option("--dtype", type=click.Choice(COREML_DTYPES), default=None,
              help="Weights: int4 (per-block 32), int8, fp16 or palettize4. Default: the device profile's.")
@click.option("--context", type=click.IntRange(1), default=None,
              help="KV-cache length (padded to the profile's state multiple). Default: the device profile's.")
@click.option("--device", "device", type=click.Choice(list(devices.profiles())), default="iphone-15-pro",
              show_default=True, help="Device profile that sets the defaults and the Neural Engine options.")
@click.option("--out", type=click.Path(), default=None, help="Output folder (default ./exports/qwen2-SIZE-coreml-DTYPE).")
@click.option("--random-weights", is_flag=True, help="Random weights: architecture-only work, no checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-verify", is_flag=True, help="Skip the parity gate (the report says so).")
def coreml(size, checkpoint, dtype, context, device, out, random_weights, overwrite, no_verify):
    """Export to a stateful Core ML ML Program (iOS 18 / macOS 15)."""
    from qwen2_ref.checkpoint import resolve_checkpoint

    from .coreml import export_coreml

    prof = devices.get(device)
    if prof.runtime != "coreml":
        raise Qwen2Error(f"--device {device} runs ONNX, not Core ML; use `python -m export onnx --device {device}`")
    dtype = _settle("--dtype", dtype, prof.default_dtype, device)
    context = _settle("--context", context, prof.default_context, device)
    if checkpoint is None and size is None:
        raise click.UsageError("pass --size or --checkpoint")
    ckpt = resolve_checkpoint(size, checkpoint, random_weights)
    name = ckpt.size or Path(str(checkpoint or size)).stem
    out = Path(out) if out else Path("exports") / f"qwen2-{name}-coreml-{dtype}"
    export_coreml(ckpt, out, dtype, context=context, profile=prof, verify_package=not no_verify, overwrite=overwrite)


@cli.command()
@click.option("--size", type=click.Choice(list(SIZES)), required=True)
@click.option("--device", "device", type=click.Choice(list(devices.profiles())), required=True)
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None)
@click.option("--max-context", type=click.IntRange(1), default=None)
def plan(size, device, dtype, max_context):
    """Will it fit, and how fast can it decode? Memory and bandwidth bounds for a size on a device."""
    from rich.console import Console
    from rich.table import Table

    from qwen2_ref.config import from_name

    prof = devices.get(device)
    dtype = _settle("--dtype", dtype, prof.default_dtype, device)
    context = _settle("--max-context", max_context, prof.default_context, device)
    cfg = from_name(size)
    p = devices.plan(cfg, prof, dtype, context)
    t = Table(title=f"Qwen2 {size} on {device} ({prof.description})")
    for col in ("dtype", "context", "weights GiB", "KV cache GiB", "total GiB", "budget GiB", "fits",
                "decode tok/s ≤ (short)", "decode tok/s ≤ (full ctx)"):
        t.add_column(col, justify="right")
    t.add_row(dtype, str(context), f"{p['weights_gib']:.2f}", f"{p['kv_cache_gib']:.2f}", f"{p['total_gib']:.2f}",
              f"{p['budget_gib']:.1f}", "yes" if p["fits"] else "NO", f"{p['decode_bound_short_tok_s']:.1f}",
              f"{p['decode_bound_full_context_tok_s']:.1f}")
    Console(width=160).print(t)


if __name__ == "__main__":
    run_cli(cli)
