"""`python -m qwen2_ref generate ...`: reference generation from a checkpoint, streamed to stdout."""

from __future__ import annotations

import sys
import time

import click

from .config import SIZES
from .errors import Qwen2Error


def run_cli(group: click.Group) -> None:
    """Run a click group, turning user errors into one line on stderr (exit 2) instead of a traceback."""
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Qwen2Error as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


@click.group()
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


if __name__ == "__main__":
    run_cli(cli)
