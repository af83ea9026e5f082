"""Which 4-bit recipe keeps the real 0.5B's quality: each recipe's weights, dequantized, in the fp32 PyTorch
reference (so only the weight rounding is measured, not the runtime's), perplexity on held-out text.
A benchmark: prints one table, asserts nothing.

    python bench/quant_quality.py [--recipes rtn32,gptq32,...] [--tokens 1000]

Held out: calibration uses export/data/calibration.txt (CPython's textwrap.py + fractions.py); perplexity is
measured on the first 1000 tokens of CPython 3.11's heapq.py (export/evaluate.py), chosen before any tuning.
Recipes: rtn = round-to-nearest with a per-block clipping search (the old --requantize); weighted = the same
search weighting each column's error by its calibration inputs' mean square; gptq = GPTQ, gptqa = GPTQ with act-order
(static blocks), gptqm = GPTQ with each block's range its min and max (no clipping search); the number is the block.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export import quant  # noqa: E402
from export.calibrate import calibrate, calibration_ids, gptq_group  # noqa: E402
from export.evaluate import fixed_text, perplexity  # noqa: E402
from export.gate import reference_step  # noqa: E402
from qwen2_ref.checkpoint import open_checkpoint  # noqa: E402
from qwen2_ref.hub import fetch_real_model  # noqa: E402


def recipe_fn(recipe: str):
    method, block = recipe.rstrip("0123456789"), int(recipe[len(recipe.rstrip("0123456789")):])
    spec = quant.QuantSpec(4, block)

    if method in ("gptq", "gptqa", "gptqm"):
        run = gptq_group(spec, act_order=method == "gptqa", **({"shrinks": (1.0,)} if method == "gptqm" else {}))
        return lambda members, h: {n: c.quantized for n, c in run(members, h).items()}
    one = {"rtn": lambda w, h: quant.quantize_rtn(w, spec),
           "weighted": lambda w, h: quant.quantize_weighted(w, spec, torch.diagonal(h))}[method]
    return lambda members, h: {n: one(w, h) for n, w in members}


@click.command()
@click.option("--recipes", default="rtn32,weighted32,gptq32,rtn128,gptq128")
@click.option("--tokens", default=1000, help="evaluation tokens (heapq.py)")
@click.option("--calibration-tokens", default=1024, help="calibration tokens (export/data/calibration.txt)")
@click.option("--skip", default="", help="comma-separated name fragments kept in fp32 (e.g. lm_head)")
@click.option("--ablate", default="", help="after each recipe, also the perplexity with each of these ;-separated "
              "groups of name fragments kept in fp32 (e.g. 'lm_head;down_proj;q_proj,k_proj,v_proj')")
def main(recipes, tokens, calibration_tokens, skip, ablate):
    torch.set_num_threads(2)
    ck = open_checkpoint(fetch_real_model())
    tok = ck.tokenizer()
    eval_ids = tok.encode(fixed_text())[:tokens]
    cal_ids = calibration_ids(tok, tokens=calibration_tokens)
    model = ck.load_model(progress=False)
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
             and not any(s and s in n for s in skip.split(","))}
    base = perplexity(reference_step(model), eval_ids)
    print(f"fp32 perplexity {base:.4f} ({len(eval_ids)} tokens of heapq.py); calibration {len(cal_ids)} tokens",
          flush=True)
    print("| recipe | perplexity | vs fp32 | quantize s |\n|---|---|---|---|", flush=True)
    for recipe in recipes.split(","):
        t0 = time.perf_counter()
        res = calibrate(model, cal_ids, recipe_fn(recipe), names)
        dt = time.perf_counter() - t0
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, q in res.items():
                params[n].copy_(torch.from_numpy(q.dequantize()))
        ppl = perplexity(reference_step(model), eval_ids)
        print(f"| {recipe} | {ppl:.4f} | {(ppl / base - 1) * 100:+.2f}% | {dt:.0f} |", flush=True)
        for group in filter(None, ablate.split(";")):
            keep = [n for n in res if any(f in n for f in group.split(","))]
            with torch.no_grad():
                for n in keep:
                    params[n].copy_(fp32[n])
            ppl = perplexity(reference_step(model), eval_ids)
            print(f"| {recipe}, {group} fp32 | {ppl:.4f} | {(ppl / base - 1) * 100:+.2f}% | |", flush=True)
            with torch.no_grad():
                for n in keep:
                    params[n].copy_(torch.from_numpy(res[n].dequantize()))
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(fp32[n])


if __name__ == "__main__":
    main()
