"""`python -m export onnx|coreml|plan ...` — a thin click CLI: flags become an ExportPlan (export/plan.py), and each
command body is one call into the library."""

from __future__ import annotations

import click

from qwen2_ref.__main__ import CONTEXT, run_cli, version
from qwen2_ref.config import SIZES

import devices

from . import precision
from .plan import LOWERINGS


def _dtype_help(target: str, default: str) -> str:
    return "; ".join(f"{p.name}: {p.summary}" for p in precision.PRECISIONS[target].values()) + f". {default}"


def quantizer_options(f):
    """int4's recipe flags, the same for ONNX and Core ML."""
    f = click.option("--requantize", is_flag=True, help="Same as --quantizer rtn.")(f)
    f = click.option("--calibration", type=click.Path(), default=None,
                     help="Text file the calibrated, head and mixed quantizers run the model on (default: the one "
                          "shipped in export/data; never the text you evaluate on).")(f)
    return click.option(
        "--quantizer", default=None,
        type=click.Choice(["calibrated", "exact", "head", "mixed", "reblock", "rtn"]),
        help="int4: reblock (ONNX's default from a GGUF with fp32 activations; else exact) = a GGUF's 4-bit blocks as "
             "they are, its 5/6/8-bit ones as 8-bit codes on blocks of 128 (each weight within 1/510 of its block's "
             "range of the file's, fp32 scales; ONNX Runtime's CPU kernel runs them ~1.3x faster than the file's "
             "blocks of 32 or 16; ONNX only); exact (Core ML's default) = a GGUF's own blocks carried over bit for bit"
             " (5/6/8-bit ones as 8-bit codes; float checkpoints, for either: as rtn); head = as reblock, but the LM "
             "head 4-bit (GPTQ on a calibration text, the fp32 model streamed a layer at a time) when its measured "
             "effect on the model's outputs stays within --max-kl (ONNX only); calibrated = GPTQ 4-bit everywhere; "
             "mixed = per group of weights 4-bit or its wider form (reblock's 8-bit codes, else 8-bit): the most bytes"
             " to 4-bit whose measured effect stays within --max-kl (needs the fp32 model in memory; ONNX only); rtn ="
             " clip-searched round-to-nearest 4-bit everywhere (the smallest).")(f)


def _export(target: str, size, checkpoint, random_weights, **flags) -> None:
    from qwen2_ref.checkpoint import resolve_checkpoint

    from .output import check_destination
    from .plan import make_plan, target_profile

    if checkpoint is None and size is None:
        raise click.UsageError("pass --size or --checkpoint")
    target_profile(target, flags.get("device"))  # a profile of the other runtime is refused before any loading
    if flags.get("out") is not None:  # before the checkpoint is opened (or fetched); again with sizes in run_export
        check_destination(flags["out"], flags.get("overwrite", False), (checkpoint,) if checkpoint else ())
    ckpt = resolve_checkpoint(size, checkpoint, random_weights)
    plan = make_plan(target, ckpt, **flags)
    for note in plan.overrides:
        click.echo(f"note: {note}", err=True)
    if target == "onnx":
        from .onnx import export_onnx

        export_onnx(ckpt, plan)
    else:
        from .coreml import export_coreml

        export_coreml(ckpt, plan)


@click.group(context_settings=CONTEXT)
@click.version_option(version(), "--version", prog_name="qwen2-export")
def cli() -> None:
    """Export Qwen2 models to ONNX Runtime and Core ML, proved equivalent to the PyTorch reference."""


@cli.command()
@click.option("--size", type=click.Choice(list(SIZES)), help="Model size (inferred from --checkpoint if given).")
@click.option("--checkpoint", type=click.Path(), help="Hugging Face folder or .gguf file.")
@click.option("--dtype", type=click.Choice(precision.names("onnx")), default=None,
              help=_dtype_help("onnx", "Default: the device profile's, else fp32."))
@click.option("--activations", type=click.Choice(list(precision.ACTIVATIONS)), default=None,
              help="int4: the dtype the graph computes in and caches keys and values in. Default: the device "
                   "profile's (fp16 on CUDA profiles: ONNX Runtime's CUDA attention has no fp32 kernel), else fp32.")
@click.option("--attention", type=click.Choice(["bias", "seqlens"]), default=None,
              help="Fused lowering: how attention sees a padded batch. bias: left padding and a padding bias "
                   "(optimum's convention); seqlens: per-row lengths and no bias (onnxruntime-genai's; what ONNX "
                   "Runtime's fast CUDA attention takes; optimum must not batch it). Default: the device "
                   "profile's, else bias.")
@click.option("--device", "device", type=click.Choice(list(devices.profiles())), default=None,
              help="Device profile that sets the defaults (GPU profiles pick the best --dtype that fits).")
@click.option("--out", type=click.Path(), default=None, help="Output folder (default ./exports/qwen2-SIZE-DTYPE).")
@click.option("--max-context", "context", type=click.IntRange(1), default=None,
              help="Context length recorded for runtimes.")
@click.option("--random-weights", is_flag=True, help="Random weights: architecture-only work, no checkpoint.")
@quantizer_options
@click.option("--max-kl", type=float, default=None,
              help="--quantizer head and mixed: how far the 4-bit choice may move the model's next-token "
                   "distributions, "
                   "mean KL divergence in nats per token on the calibration text (default 0.01; 0: nothing "
                   "4-bit that costs anything; larger: smaller and faster, less exact).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-verify", is_flag=True, help="Skip the parity gate (the report says so).")
@click.option("--lowering", type=click.Choice(list(LOWERINGS)), default=None,
              help="fused: ONNX Runtime's kernels (GroupQueryAttention with rotary, MoE, SkipSimplifiedLayerNorm); "
                   "function: standard ops plus the qwen2 domain's function bodies, for any runtime. "
                   "Default: the device profile's, else fused.")
def onnx(size, checkpoint, random_weights, no_verify, **flags):
    """Export to ONNX (ONNX Runtime CPU/CUDA)."""
    _export("onnx", size, checkpoint, random_weights, verify=not no_verify, **flags)


COREML_SIZES = ["0.5b", "1.5b"]  # the phone-class sizes


@cli.command()
@click.option("--size", type=click.Choice(COREML_SIZES), help="Model size (inferred from --checkpoint if given).")
@click.option("--checkpoint", type=click.Path(), help="Hugging Face folder or .gguf file.")
@click.option("--dtype", type=click.Choice(precision.names("coreml")), default=None,
              help=_dtype_help("coreml", "Default: the device profile's."))
@click.option("--context", type=click.IntRange(1), default=None,
              help="KV-cache length (padded to the profile's state multiple). Default: the device profile's.")
@click.option("--device", "device", type=click.Choice(list(devices.profiles())), default="iphone-15-pro",
              show_default=True, help="Device profile that sets the defaults and the Neural Engine options.")
@click.option("--out", type=click.Path(), default=None, help="Output folder (default ./exports/qwen2-SIZE-coreml-DTYPE).")
@click.option("--random-weights", is_flag=True, help="Random weights: architecture-only work, no checkpoint.")
@quantizer_options
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-verify", is_flag=True, help="Skip the parity gate (the report says so).")
def coreml(size, checkpoint, random_weights, no_verify, **flags):
    """Export to a stateful Core ML ML Program (iOS 18 / macOS 15)."""
    _export("coreml", size, checkpoint, random_weights, verify=not no_verify, **flags)


@cli.command()
@click.option("--size", type=click.Choice(list(SIZES)), required=True)
@click.option("--device", "device", type=click.Choice(list(devices.profiles())), required=True)
@click.option("--dtype", type=click.Choice(sorted({n for t in precision.TARGETS for n in precision.names(t)})),
              default=None, help="The precision to mark as chosen. Default: the profile's (GPU profiles: the best "
                                 "that fits).")
@click.option("--activations", type=click.Choice(list(precision.ACTIVATIONS)), default=None,
              help="ONNX int4's activations. Default: the profile's.")
@click.option("--max-context", type=click.IntRange(1), default=None)
def plan(size, device, dtype, activations, max_context):
    """Will it fit, and how fast can it decode? Every precision of the device's runtime: weights, KV cache at the
    context, fits or not, and the decode bounds from memory bandwidth; `*` marks what `export` would make."""
    from rich.console import Console
    from rich.table import Table

    from .plan import plan_for

    rows, notes = plan_for(size, device, dtype, max_context, activations)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    prof = devices.get(device)
    t = Table(title=f"Qwen2 {size} on {device} ({prof.description}), context {rows[0]['context']}")
    for col in ("", "dtype", "weights GiB", "KV cache GiB", "total GiB", "budget GiB", "fits",
                "decode tok/s ≤ (short)", "decode tok/s ≤ (full ctx)"):
        t.add_column(col, justify="right")
    for p in rows:
        t.add_row("*" if p["chosen"] else "", p["dtype"], f"{p['weights_gib']:.2f}", f"{p['kv_cache_gib']:.2f}",
                  f"{p['total_gib']:.2f}", f"{p['budget_gib']:.1f}", "yes" if p["fits"] else "NO",
                  f"{p['decode_bound_short_tok_s']:.1f}", f"{p['decode_bound_full_context_tok_s']:.1f}")
    Console(width=160).print(t)


def main() -> None:
    """The `qwen2-export` console script (the same as `python -m export`)."""
    run_cli(cli, prog_name="qwen2-export")


if __name__ == "__main__":
    run_cli(cli)
