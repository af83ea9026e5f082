"""Speculative decoding on the real model: decode tok/s with and without, acceptance, tokens per verify step, on
code-editing prompts (the model rewrites, renames or annotates code it is given) and on free generation (the
control). A benchmark: prints a table, asserts nothing. Greedy; each prompt runs plain and speculative back to back
(A/B interleaved), and the table says whether the two outputs are the same tokens.

    python bench/speculative.py --model exports/qwen2-0.5b-int4 [--fp32 exports/qwen2-0.5b-fp32] \
        [--lookup 16] [--draft-tokens 12] [--tokens 128]

Rows: prompt lookup on --model; prompt lookup on --fp32; --model drafting for --fp32 (when --fp32 is given).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import Runner, SessionSettings  # noqa: E402
from runtime.speculative import DraftModel, PromptLookup  # noqa: E402

CODE = {
    "stack": ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
              "        self.items.append(item)\n\n    def pop(self):\n        if not self.items:\n"
              "            raise IndexError(\"pop from an empty stack\")\n        return self.items.pop()\n\n"
              "    def peek(self):\n        return self.items[-1]\n\n    def __len__(self):\n"
              "        return len(self.items)\n"),
    "csv": ("import csv\n\n\ndef read_rows(path):\n    rows = []\n    with open(path) as f:\n"
            "        for row in csv.reader(f):\n            if row and not row[0].startswith('#'):\n"
            "                rows.append(row)\n    return rows\n\n\ndef column(rows, index):\n"
            "    return [row[index] for row in rows]\n\n\ndef total(rows, index):\n"
            "    return sum(float(x) for x in column(rows, index))\n"),
    "server": ("def handle(request):\n    user = request.get('user')\n    if user is None:\n"
               "        return {'status': 401, 'body': 'login required'}\n    items = request.get('items', [])\n"
               "    price = 0\n    for item in items:\n        price = price + item['price'] * item['count']\n"
               "    if price > 100:\n        price = price * 0.9\n    return {'status': 200, 'body': price}\n"),
}
EDITS = [
    ("Rename the method `peek` to `top` everywhere and return the whole class.", "stack"),
    ("Add type hints to every function and return the whole file.", "csv"),
    ("Add a docstring to every method. Return the complete code.", "stack"),
    ("Rename the variable `price` to `amount` and return the whole function.", "server"),
    ("Add a comment above each line of the function explaining it. Return the whole function.", "server"),
]
FREE = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain how a hash table works to a new programmer.",
        "Give me ten ideas for a weekend project with a Raspberry Pi."]


def prompts() -> dict[str, list[str]]:
    return {"code edit": [f"{ask}\n```python\n{CODE[name]}```" for ask, name in EDITS], "free": FREE}


def measure(target: Runner, proposer, ids: list[int], tokens: int) -> tuple[list[int], float, object]:
    target.speculator = proposer
    params = target.default_config(max_new_tokens=tokens)
    out = [s[0] for s in target.generate([ids], params)]
    target.speculator = None
    st = target.stats
    return out, st.decode_s, st


@click.command()
@click.option("--model", "folder", required=True, type=click.Path(exists=True, file_okay=False),
              help="The export to speed up with prompt lookup (e.g. the default int4); also the draft for --fp32.")
@click.option("--fp32", type=click.Path(exists=True, file_okay=False), default=None,
              help="An fp32 export of the same model: prompt lookup on it, and --model drafting for it.")
@click.option("--lookup", default=16, show_default=True, help="Prompt-lookup draft tokens.")
@click.option("--draft-tokens", default=12, show_default=True)
@click.option("--tokens", default=128, show_default=True, help="New tokens per prompt (greedy).")
@click.option("--threads", default=os.cpu_count() or 1, show_default=True)
@click.option("--sets", default="code edit,free", show_default=True, help="Prompt sets to run, comma-separated.")
def main(folder, fp32, lookup, draft_tokens, tokens, threads, sets):
    s = SessionSettings(threads=threads)
    load0 = os.getloadavg()[0]
    small = Runner(folder, s)
    if small.folder.tokenizer is None or (fp32 and not (Path(fp32) / "tokenizer.json").is_file()):
        raise click.ClickException("the prompts are text: --model and --fp32 need exports with a tokenizer "
                                   "(the real model's, not random weights)")
    cases = [(Path(folder).name, small, "prompt lookup", lambda t: PromptLookup(lookup))]
    if fp32:
        big = Runner(fp32, s)
        cases += [(Path(fp32).name, big, "prompt lookup", lambda t: PromptLookup(lookup)),
                  (Path(fp32).name, big, f"draft {Path(folder).name}", lambda t: DraftModel(small, draft_tokens, t))]
    rows = []
    chosen = [x.strip() for x in sets.split(",")]
    for set_name, texts in prompts().items():
        if set_name not in chosen:
            continue
        for name, target, how, make in cases:
            agg = {"plain_s": 0.0, "spec_s": 0.0, "plain_n": 0, "spec_n": 0, "drafted": 0, "accepted": 0,
                   "steps": 0, "same": 0}
            for text in texts:
                ids = target.encode_prompt(text, chat=True)
                base, t0, st0 = measure(target, None, ids, tokens)
                got, t1, st = measure(target, make(target), ids, tokens)
                agg["plain_s"] += t0
                agg["spec_s"] += t1
                agg["plain_n"] += st0.new_tokens - 1
                agg["spec_n"] += st.new_tokens - 1
                agg["drafted"] += st.drafted
                agg["accepted"] += st.accepted
                agg["steps"] += st.verify_steps
                agg["same"] += got == base
                click.echo(f"{set_name} | {name} | {how}: {st0.decode_tok_s:.1f} -> {st.decode_tok_s:.1f} tok/s, "
                           f"{st.acceptance:.0%} accepted", err=True)
            rows.append((set_name, name, how, agg, len(texts)))
    from peers import cpu_model  # bench/ is the script's folder, first on sys.path

    cpu = cpu_model()
    print(f"\n{cpu}, {os.cpu_count()} cores, {threads} threads, load average {load0:.2f} at the start; greedy, "
          f"{tokens} new tokens per prompt (fewer where the model stops); lookup {lookup}, draft {draft_tokens}\n")
    print("| prompts | target | speculation | plain decode tok/s | speculative tok/s | speed-up | accepted | "
          "tok/step | same output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for set_name, name, how, a, n in rows:
        plain, spec = a["plain_n"] / a["plain_s"], a["spec_n"] / a["spec_s"]
        acc = a["accepted"] / a["drafted"] if a["drafted"] else 0.0
        per = a["spec_n"] / a["steps"] if a["steps"] else 0.0
        print(f"| {set_name} ({n}) | {name} | {how} | {plain:.1f} | {spec:.1f} | {spec / plain:.2f}x | {acc:.0%} | "
              f"{per:.2f} | {a['same']}/{n} |")


if __name__ == "__main__":
    main()
