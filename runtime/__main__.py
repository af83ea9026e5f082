"""`python -m runtime generate|bench|serve`: run an export folder through ONNX Runtime."""

from __future__ import annotations

import os
import sys

import click

import devices
from qwen2_ref.__main__ import CONTEXT, run_cli, text_option, version


def session_options(f):
    f = click.option("--device", type=click.Choice(list(devices.profiles())), default=None,
                     help="Device profile: providers, threads, prefill chunk.")(f)
    f = click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Execution provider (overrides the profile); cuda falls back to CPU loudly.")(f)
    f = click.option("--threads", type=click.IntRange(0), default=None, help="Intra-op threads (0: ORT's default).")(f)
    f = click.option("--prefill-chunk", type=click.IntRange(0), default=None,
                     help="Prompt tokens per forward step (0: the whole prompt).")(f)
    f = click.option("--trace", "profile_prefix", default=None, metavar="PREFIX",
                     help="Write ONNX Runtime's per-node timing trace (JSON) to PREFIX_<date>.json.")(f)
    return f


def settings_from(device, provider, threads, prefill_chunk, profile_prefix):
    from pathlib import Path

    from qwen2_ref.errors import Qwen2Error

    from .session import SessionSettings

    if profile_prefix is not None:  # ONNX Runtime writes PREFIX_<date>.json at the end: check the folder now
        where = Path(profile_prefix).expanduser().parent
        if not str(Path(profile_prefix).name) or not where.is_dir() or not os.access(where, os.W_OK):
            raise Qwen2Error(f"--trace {profile_prefix}: {where} is not a writable folder; ONNX Runtime could not "
                             "write its trace there")

    base = SessionSettings.from_profile(device) if device else SessionSettings()
    return base.with_(providers=provider, threads=threads, prefill_chunk=prefill_chunk, profile_prefix=profile_prefix)


@click.group(context_settings=CONTEXT)
@click.version_option(version(), "--version", prog_name="qwen2-run")
def cli() -> None:
    """ONNX Runtime runner for qwen2-export folders."""


@cli.command()
@click.option("--model", "model", required=True, type=click.Path(), help="Export folder (python -m export onnx).")
@click.option("--prompt", required=True, help="Text to continue (or the user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("--max-new-tokens", type=click.IntRange(0), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable); the output ends before it.")
@click.option("--lookup", type=click.IntRange(1), default=None, metavar="N",
              help="Speculative decoding by prompt lookup: drafts of up to N tokens copied from where the text so "
                   "far repeats itself (code edits, refactors); the output is unchanged.")
@click.option("--draft", type=click.Path(), default=None, metavar="DIR",
              help="Speculative decoding with a draft export of the same family (e.g. a 0.5B int4 for a 7B).")
@click.option("--draft-tokens", type=click.IntRange(1), default=None, metavar="K",
              help="Most tokens the draft proposes per step (default 12; fewer after rejections).")
@session_options
def generate(model, prompt, chat, system, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
             stop_strings, lookup, draft, draft_tokens, device, provider, threads, prefill_chunk,
             profile_prefix) -> None:
    """Generate text, streamed as it is produced, then one line of speeds on stderr."""
    import time

    from .folder import open_export, require_tokenizer
    from .runner import Runner

    prompt, system = text_option("--prompt", prompt), text_option("--system", system)
    stop_strings = [text_option("--stop", s) for s in stop_strings]
    settings = settings_from(device, provider, threads, prefill_chunk, profile_prefix)
    t0 = time.perf_counter()
    folder = open_export(model)
    require_tokenizer(folder)
    r = Runner(folder, settings)
    r.speculator = speculator(r, lookup, draft, draft_tokens, settings)
    load_s = time.perf_counter() - t0
    params = r.default_config(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop_strings))
    ids = r.encode_prompt(prompt, chat, system)
    r.check_prompt(len(ids))  # before anything is printed
    if not chat:
        sys.stdout.write(prompt)
    for piece in r.stream(ids, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    s = r.stats
    click.echo(f"[{', '.join(r.session.active)} | load {load_s:.1f} s | prefill {s.prompt_tokens} tok "
               f"{s.prefill_tok_s:.1f} tok/s (first token {s.prefill_s:.2f} s) | decode {s.new_tokens} tok "
               f"{s.decode_tok_s:.1f} tok/s{speculation(s) if r.speculator else ''} | "
               f"{s.finish[0] if s.finish else '-'}]", err=True)
    prof = r.end_profiling()
    if prof:
        click.echo(f"ONNX Runtime trace: {prof}", err=True)


def speculator(target, lookup, draft, draft_tokens, settings):
    """The --lookup / --draft proposer for `target`, or None."""
    from .speculative import DraftModel, PromptLookup

    if lookup and draft:
        raise click.UsageError("--lookup and --draft are two ways to speculate: give one")
    if draft_tokens and not draft:
        raise click.UsageError("--draft-tokens needs --draft")
    if lookup:
        return PromptLookup(lookup)
    if draft:
        from .runner import Runner

        return DraftModel(Runner(draft, settings), draft_tokens or 12, target)
    return None


def speculation(s) -> str:
    return f" ({s.acceptance:.0%} of {s.drafted} drafted accepted, {s.tokens_per_step:.2f} tok/step)"


@cli.command()
@click.option("--model", "model", required=True, type=click.Path(), help="Export folder.")
@click.option("--prompt-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=128, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Medians over this many runs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of key: value lines.")
@session_options
def bench(model, prompt_tokens, new_tokens, runs, as_json, device, provider, threads, prefill_chunk,
          profile_prefix) -> None:
    """Prefill tok/s (512-token prompt), decode tok/s (128 tokens), TTFT, peak RSS: `key: value` lines."""
    from .bench import print_result, run_bench

    print_result(run_bench(model, settings_from(device, provider, threads, prefill_chunk, profile_prefix),
                           prompt_tokens, new_tokens, runs), as_json)


@cli.command()
@click.option("--model", "model", required=True, type=click.Path(),
              help="Export folder made with --attention seqlens (the CUDA profiles' default).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (localhost unless told).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=4, show_default=True,
              help="Sequences decoded together (rows of the shared KV cache).")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="Requests waiting for a row; more are answered 429.")
@click.option("--context", type=click.IntRange(2), default=None,
              help="Prompt + output tokens per request (default: the export's context; the cache holds max-batch "
                   "of them).")
@click.option("--name", default=None, help="The model id clients send (default: the folder's name).")
@click.option("--request-timeout", type=click.FloatRange(0, min_open=True), default=None,
              help="Seconds a request may take; it then ends with what it has (finish_reason length).")
@click.option("--lookup", type=click.IntRange(0), default=0, metavar="N",
              help="Prompt-lookup speculative decoding (drafts of up to N tokens) while one stream decodes alone; "
                   "outputs are unchanged.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve through Ray Serve: replicas (each its own ONNX Runtime session) over a Ray cluster.")
@click.option("--replicas", type=click.IntRange(1), default=None, help="With --ray: this many replicas (default 1).")
@click.option("--autoscale", default=None, metavar="MIN,MAX",
              help="With --ray: let Ray Serve keep between MIN and MAX replicas, by requests in flight.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --ray: join this running cluster ('auto': the one on this machine); default: start Ray here.")
@click.option("--replica-cpus", type=click.FloatRange(0, min_open=True), default=1, show_default=True,
              help="With --ray: CPUs each replica asks Ray for (and its ONNX Runtime threads, unless --threads).")
@session_options
def serve(model, host, port, max_batch, max_queue, context, name, request_timeout, lookup, use_ray, replicas,
          autoscale, ray_address, replica_cpus, device, provider, threads, prefill_chunk, profile_prefix) -> None:
    """An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /health) with
    continuous batching; with --ray, replicas of it on Ray Serve."""
    from pathlib import Path

    if not use_ray and (replicas or autoscale or ray_address):
        raise click.UsageError("--replicas, --autoscale and --ray-address go with --ray")
    if use_ray:
        try:
            from . import ray_serve
        except ImportError:
            raise click.ClickException('--ray needs Ray Serve: pip install -e ".[ray]"') from None
        auto = None
        if autoscale:
            try:
                auto = tuple(int(x) for x in autoscale.split(","))
                assert len(auto) == 2
            except (ValueError, AssertionError):
                raise click.BadParameter(f"{autoscale!r}: expected MIN,MAX (two integers)",
                                         param_hint="--autoscale") from None
        settings = settings_from(device, provider, threads, prefill_chunk, profile_prefix)
        app = ray_serve.application(model, name or Path(model).resolve().name, replicas, auto, max_batch=max_batch,
                                    max_queue=max_queue, context=context, timeout_s=request_timeout,
                                    num_cpus=replica_cpus, threads=threads, prefill_chunk=settings.prefill_chunk or 256,
                                    lookup=lookup, settings=settings)
        ray_serve.run(app, host, port, ray_address)
        return

    from .batching import BatchEngine
    from .runner import Runner
    from .server import serve as run_server

    settings = settings_from(device, provider, threads, prefill_chunk, profile_prefix)
    engine = BatchEngine(Runner(model, settings), slots=max_batch, capacity=context,
                         chunk=settings.prefill_chunk or 256, max_queue=max_queue, lookup=lookup)
    run_server(engine, name or Path(model).resolve().name, host, port, request_timeout)


def main() -> None:
    """The `qwen2-run` console script (the same as `python -m runtime`)."""
    run_cli(cli, prog_name="qwen2-run")


if __name__ == "__main__":
    run_cli(cli)
