"""`python -m qwen2_ref generate ...`: reference generation from a checkpoint, streamed to stdout."""

from __future__ import annotations

import sys
import time

import click

from .config import SIZES
from .errors import Qwen2Error


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("qwen2-export")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def run_cli(group: click.Group, args: list[str] | None = None, prog_name: str | None = None) -> None:
    """Run a click group, turning user errors into one line on stderr instead of a traceback: `error: ...` with
    exit status 2 for bad input, 1 for the machine refusing (disk, permissions, memory), 130 for Ctrl-C."""
    try:
        group.main(args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # one line, like every other error: what was wrong and where help is
        hint = f" (see '{e.ctx.command_path} -h')" if e.ctx is not None else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except Qwen2Error as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:  # the machine said no: a full disk, a permission, a path too long; never our own bug
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(1)
    except MemoryError:
        click.echo("error: out of memory; close other programs, or pick a smaller size or precision", err=True)
        sys.exit(1)


def text_option(name: str, value: str | None, allow_empty: bool = False) -> str | None:
    """A text flag as the user typed it: refused with one line if empty (unless allowed) or not valid UTF-8."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Qwen2Error(f"{name} is not valid UTF-8 text") from None
    if not value and not allow_empty:
        raise Qwen2Error(f"{name} is empty; pass the text to use")
    return value


@click.group(context_settings=CONTEXT)
@click.version_option(version(), "--version", prog_name="qwen2_ref")
def cli() -> None:
    """The Qwen2 PyTorch reference."""


@cli.command()
@click.option("--checkpoint", type=click.Path(), help="Hugging Face folder or .gguf file.")
@click.option("--size", type=click.Choice(list(SIZES)), help="Use the default checkpoint for this size.")
@click.option("--random-weights", is_flag=True, help="Random weights (architecture only; needs a tokenizer).")
@click.option("--prompt", required=True, help="Text to continue (or the user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the checkpoint's chat template.")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("--max-new-tokens", type=click.IntRange(0), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
def generate(checkpoint, size, random_weights, prompt, chat, system, max_new_tokens, temperature, top_k, top_p,
             seed) -> None:
    """Generate text with the reference model, streamed as it is produced."""
    from .checkpoint import resolve_checkpoint
    from .generate import SamplingParams, TextStream, generate_one

    prompt, system = text_option("--prompt", prompt), text_option("--system", system)
    if checkpoint is None and size is None:
        size = "0.5b"
    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(size, checkpoint, random_weights)
    tok = ckpt.tokenizer()
    if tok is None:
        raise Qwen2Error(f"{ckpt.path}: no tokenizer.json; the checkpoint needs one to generate text")
    model = ckpt.load_model()
    load_s = time.perf_counter() - t0
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs)
    else:
        text = prompt
    ids = tok.encode(text)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_token_ids=tuple(tok.eos_token_ids))
    stream = TextStream(tok)
    if not chat:
        sys.stdout.write(prompt)
    t1 = time.perf_counter()
    n, t_first = 0, None
    for t in generate_one(model, ids, params):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        sys.stdout.write(stream.push(t))
        sys.stdout.flush()
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    decode_s = (t2 - t_first) if t_first else 0.0
    click.echo(f"[load {load_s:.1f} s | prompt {len(ids)} tok, first token {((t_first or t2) - t1):.2f} s | "
               f"{n} new tok, decode {((n - 1) / decode_s) if n > 1 and decode_s > 0 else 0:.1f} tok/s]", err=True)


def main() -> None:
    run_cli(cli, prog_name="qwen2-ref")


if __name__ == "__main__":
    run_cli(cli)
