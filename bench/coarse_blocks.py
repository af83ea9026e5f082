"""What a coarser 4-bit layout would buy: copy an int4 export with every `MatMulNBits` weight (whatever its bits,
block or folding) re-quantized to 4-bit blocks of `--block`, round-to-nearest with the per-block clipping search
(`export.quant.quantize_rtn`) from the values the export stands for. ORT's CPU kernel runs 4-bit blocks of 128 and
longer fastest (`bench/matmulnbits.py`; in the whole 0.5B 128 and 256 tie), so `--block 128` shows the decode speed
the kernel allows; time the copy with `bench/op_profile.py` or `bench/decode.py` beside the original and a peer,
and measure its perplexity. A benchmark tool: the copy is a what-if for measurement, not an export to ship (its
report still describes the source; the gathered embedding table is left as it was). Exports whose Q4_K/Q4_1
weights are in the offsets form (`--quantizer exact`, or any fp16/bf16 export of a GGUF) are refused.

    python bench/coarse_blocks.py exports/qwen2-0.5b-int4 /tmp/what-if-128 [--block 128] [--only lm_head]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.onnx.verify import _dequantize_nbits  # noqa: E402
from export.quant import QuantSpec, quantize_rtn, unfolded_blocks  # noqa: E402


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--block", default=128, show_default=True, type=click.Choice(["32", "64", "128", "256"]))
@click.option("--only", default="", help="Re-quantize only the MatMulNBits whose node name contains this "
              "(e.g. lm_head, mlp.down_proj); default: all.")
def main(src: Path, dst: Path, block: str, only: str):
    import onnx
    from onnx import numpy_helper

    if dst.exists():
        raise click.UsageError(f"{dst} exists; choose a new folder")
    spec = QuantSpec(4, int(block))
    m = onnx.load(str(src / "model.onnx"))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    nodes = [n for n in g.node if n.op_type == "MatMulNBits" and only in n.name]
    if not nodes:
        raise click.UsageError(f"{src / 'model.onnx'}: no MatMulNBits node{' named *' + only + '*' if only else ''}")
    done: dict[str, tuple[int, list[str]]] = {}  # source B -> (K, new initializer names): a weight read twice
    for i, nd in enumerate(nodes, 1):
        a = {x.name: onnx.helper.get_attribute_value(x) for x in nd.attribute}
        folded = nd.input[0].endswith("/folded/output")
        if folded:  # a folded float-zero-point weight: back to its own input (and K, below)
            nd.input[0] = producer[nd.input[0]].input[0]
        if nd.input[1] not in done:
            if len(nd.input) > 3 and nd.input[3].endswith(".zero_points_int"):
                raise click.UsageError(f"{src / 'model.onnx'}: {nd.name} is in the offsets form (float zero points "
                                       "plus a separate offsets matmul); re-export with fp32 activations and the "
                                       "default quantizer (reblock), or --quantizer rtn")
            arr = {f"q{a['bits']}": numpy_helper.to_array(inits[nd.input[1]])}
            scales = numpy_helper.to_array(inits[nd.input[2]])
            arr["scales"] = scales
            if len(nd.input) > 3 and nd.input[3]:
                arr["zero_points"] = numpy_helper.to_array(inits[nd.input[3]])
            k = unfolded_blocks(a["K"] // a["block_size"], a["block_size"]) * a["block_size"] if folded else a["K"]
            w = _dequantize_nbits(arr, a["bits"], a["block_size"], folded=folded)[:, :k]
            packed = quantize_rtn(torch.from_numpy(np.ascontiguousarray(w)), spec).pack()
            packed["scales"] = packed["scales"].astype(scales.dtype)  # fp16 exports keep fp16 scales
            names = []
            for key in ("B", "scales", "zero_points"):
                names.append(nd.input[1].rsplit(".", 1)[0] + f".coarse.{key}")
                g.initializer.append(numpy_helper.from_array(packed[key], names[-1]))
            done[nd.input[1]] = (k, names)
        k, names = done[nd.input[1]]
        for j, name in enumerate(names, 1):
            if j < len(nd.input):
                nd.input[j] = name
            else:
                nd.input.append(name)
        for x in nd.attribute:
            x.i = {"K": k, "bits": 4, "block_size": spec.block}.get(x.name, x.i)
        print(f"\r{i}/{len(nodes)} MatMulNBits re-quantized to 4/{block}", end="" if i < len(nodes) else "\n",
              flush=True)
    outputs = {o.name for o in g.output}
    while True:  # the folded inputs' block sums, now read by nothing
        used = {v for n in g.node for v in n.input} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    onnx.save(m, str(tmp / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    tmp.rename(dst)
    print(f"wrote {dst} ({sum(f.stat().st_size for f in dst.iterdir()) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
