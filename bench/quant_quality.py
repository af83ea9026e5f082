"""Which 4-bit recipe keeps the real 0.5B's quality: each recipe's weights, dequantized, in the fp32 PyTorch
reference (so only the weight rounding is measured, not the runtime's), perplexity on held-out text.
A benchmark: prints one table, asserts nothing.

    python bench/quant_quality.py [--recipes rtn32,gptq32,...] [--tokens 1000]

Held out: calibration uses export/data/calibration.txt (CPython's textwrap.py + fractions.py); perplexity is
measured on the first 1000 tokens of CPython 3.11's heapq.py (export/evaluate.py), chosen before any tuning.
Recipes: rtn = round-to-nearest with a per-block clipping search (the old --requantize); weighted = the same
search weighting each column's error by its calibration inputs' mean square; gptq = GPTQ, gptqa = GPTQ with act-order
(static blocks), gptqm = GPTQ with each block's range its min and max (no clipping search); the number is the block.
`--rotate hadamard|random` first rotates the residual stream (QuaRot, Ashkboos et al. 2024: RMSNorm weights folded
into the linears that read them, then every weight that reads the residual stream multiplied by an orthogonal Q on
its input side and every one that writes it by Qᵀ on its output side, the embedding by Q; the fp32 model computes the
same function, to rounding), which spreads outlier channels over whole blocks before the recipes quantize.
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


def rotate_residual(model, kind: str, seed: int = 0) -> None:
    """Rotate the residual stream in place (the model's function unchanged): RMSNorm weights folded into the
    linears after them, readers W -> W·Q, writers W -> Qᵀ·W, embedding E -> E·Q. `hadamard`: random signs times a
    block-diagonal Walsh-Hadamard matrix (blocks of the largest power of two dividing the width); `random`: a
    random orthogonal matrix."""
    emb = model.model.embed_tokens.weight
    d = emb.shape[1]
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        rot = q * torch.sign(torch.diagonal(r))
    else:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < (d & -d):
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
        rot = signs[:, None] * torch.block_diag(*[h / h.shape[0] ** 0.5] * (d // h.shape[0]))
    if model.lm_head.weight is emb:  # tied: the head gets the final norm folded in, the table does not
        model.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
    p = dict(model.named_parameters())
    with torch.no_grad():
        def fold(norm: str, readers: list[str]) -> None:
            for r in readers:
                p[r].copy_((p[r].double() * p[norm].double()[None, :] @ rot).float())
            p[norm].fill_(1.0)
        for i in range(len(model.model.layers)):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            fold(f"model.layers.{i}.input_layernorm.weight", [a + x + "_proj.weight" for x in "qkv"])
            fold(f"model.layers.{i}.post_attention_layernorm.weight", [m + "gate_proj.weight", m + "up_proj.weight"])
            for w in (a + "o_proj.weight", m + "down_proj.weight"):
                p[w].copy_((rot.T @ p[w].double()).float())
        fold("model.norm.weight", ["lm_head.weight"])
        emb.copy_((emb.double() @ rot).float())


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
@click.option("--rotate", type=click.Choice(["none", "hadamard", "random"]), default="none",
              help="rotate the residual stream first (QuaRot-style; above)")
def main(recipes, tokens, calibration_tokens, skip, ablate, rotate):
    torch.set_num_threads(2)
    ck = open_checkpoint(fetch_real_model())
    tok = ck.tokenizer()
    eval_ids = tok.encode(fixed_text())[:tokens]
    cal_ids = calibration_ids(tok, tokens=calibration_tokens)
    model = ck.load_model(progress=False)
    if rotate != "none":
        if getattr(model.model.layers[0], "mlp", None) is None or not hasattr(model.model.layers[0].mlp, "down_proj"):
            raise click.UsageError("--rotate handles dense Qwen2 layers only")
        rotate_residual(model, rotate)
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
             and not any(s and s in n for s in skip.split(","))}
    base = perplexity(reference_step(model), eval_ids)
    rotated = f", rotated: {rotate}" if rotate != "none" else ""
    print(f"fp32 perplexity {base:.4f} ({len(eval_ids)} tokens of heapq.py{rotated}); calibration {len(cal_ids)} "
          "tokens", flush=True)
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
