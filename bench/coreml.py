"""Core ML packages' quality, one table: perplexity on held-out text and greedy text, each saved package run by
the numpy MIL executor (Core ML's own runtime on macOS), beside its export report's size, time and memory.
A benchmark: prints a table, asserts nothing.

    python bench/coreml.py exports/qwen2-0.5b-coreml-int4 exports/qwen2-0.5b-coreml-fp16 [--tokens 1000]

Perplexity: the first 1000 tokens of CPython 3.11's heapq.py (export/evaluate.py), against the fp32 PyTorch
reference on the same checkpoint, computed in the same run. Greedy: 64 tokens from `def fibonacci(n):`, compared
with the fp32 reference's greedy tokens (the count of leading tokens that agree).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.coreml import PACKAGE, verify  # noqa: E402
from export.evaluate import export_reports, fixed_text, greedy, perplexity  # noqa: E402
from export.gate import reference_step  # noqa: E402

PROMPT = "def fibonacci(n):"


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--tokens", default=1000, show_default=True, help="evaluation tokens of heapq.py")
@click.option("--greedy-tokens", default=64, show_default=True)
def main(folders, tokens, greedy_tokens):
    reports, ckpt = export_reports(folders)
    tok = ckpt.tokenizer()
    ids = tok.encode(fixed_text())[:tokens]
    prompt = tok.encode(PROMPT)
    ref = ckpt.load_model(progress=False)
    base = perplexity(reference_step(ref), ids)
    ref_greedy = greedy(reference_step(ref), prompt, greedy_tokens)
    del ref
    rows = []
    for f in folders:
        rep = reports[f]
        model, backend = verify.open_package(Path(f) / PACKAGE)
        ppl = perplexity(verify.package_step(model), ids)
        got = greedy(verify.package_step(model), prompt, greedy_tokens)
        agree = next((i for i, (a, b) in enumerate(zip(got, ref_greedy)) if a != b), len(got))
        rows.append((rep, ppl, agree, backend))
        del model
    print(f"\n{len(ids)} tokens of heapq.py; fp32 reference perplexity {base:.4f}; greedy: {greedy_tokens} tokens "
          f"from {PROMPT!r}; {platform.processor() or platform.machine()}\n")
    print("| dtype (recipe) | package MiB | export s (build, convert) | peak RSS GiB (export / with gate) | "
          "gate max abs dlogits, top-1 | perplexity | vs fp32 | greedy tokens equal to fp32's |\n"
          "|---|---|---|---|---|---|---|---|")
    for rep, ppl, agree, backend in rows:
        par = rep.get("parity", {})
        gate = f"{par['max_abs_logits']:.3f}, {par['top1_agreement']:.3f}" if "max_abs_logits" in par else "skipped"
        recipe = rep["plan"].get("recipe")
        print(f"| {rep['dtype']}{f' ({recipe})' if recipe else ''} | {rep['files_mib'][PACKAGE]:.0f} | "
              f"{rep['wall_s']:.0f} ({rep.get('build_s', 0):.0f}, {rep.get('convert_s', 0):.0f}) | {rep['export_peak_rss_mib'] / 1024:.2f} / "
              f"{rep['peak_rss_mib'] / 1024:.2f} | {gate} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | "
              f"{agree}/{greedy_tokens} |")
    print(f"\nrun by: {rows[0][3] if rows else '-'}")


if __name__ == "__main__":
    main()
