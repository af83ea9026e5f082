"""What a user sees on stderr when optimum loads an export and generates: nothing but ONNX Runtime's one note about
the optional `logits_to_keep` input, which no model can avoid (export/onnx/graph.py: add_logits_to_keep).

Measured in a fresh interpreter with every library's default log settings and `python -W always`, as a user's script
runs: ORT's C++ logger writes to the process's stderr, and transformers' logger and Python warnings do too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("transformers")

from export.onnx.metadata import TRANSFORMERS_VERSION  # noqa: E402
from qwen2_ref.tokenizer import QWEN2_SPLIT, Tokenizer  # noqa: E402

# The one note left, once per session (why it cannot go: export/onnx/graph.py, add_logits_to_keep).
ORT_LOGITS_TO_KEEP = ("Initializer logits_to_keep appears in graph inputs and will not be treated as constant "
                      "value/weight")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PROMPT = [5, 9, 200, 31]

# A user's script: load the folder's tokenizer, then the model twice (optimum's IO binding, its default on CUDA,
# sizes outputs from the graph's dim names; plain run does not), 4 greedy tokens each.
SCRIPT = f"""
import json, sys, torch
from transformers import AutoTokenizer
from optimum.onnxruntime import ORTModelForCausalLM
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
out = {{"vocab": tok.vocab_size}}
for io in (False, True):
    m = ORTModelForCausalLM.from_pretrained(folder, use_io_binding=io)
    ids = torch.tensor([{PROMPT}])
    gen = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    out[f"io={{io}}"] = gen[0].tolist()
print("RESULT " + json.dumps(out))
"""


def _large_vocab_tokenizer(folder, size: int = 100_001) -> None:
    """A Qwen2-shaped tokenizer (byte-level BPE, Qwen2's split regex, saved as the export saves one) with over 100k
    tokens: transformers checks only tokenizers that large for Mistral's regex. Random-weight exports carry no
    tokenizer, so the test brings this one."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    Tokenizer(tk, {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "unk_token": None, "model_max_length": 4096}).save(folder)


def run_user_script(folder) -> tuple[int, list[str], dict | None]:
    """SCRIPT over `folder` in a fresh interpreter with the libraries' default log settings: (exit status, stderr's
    non-blank lines without colour codes, its RESULT or None)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRANSFORMERS_", "ORT_", "PYTHONWARNINGS")) and k != "QWEN2_QUIET"}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-W", "always", "-c", SCRIPT, str(folder)], capture_output=True, text=True,
                       env=env, timeout=300)
    err = [ANSI.sub("", line).strip() for line in r.stderr.splitlines() if line.strip()]
    result = next((json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")), None)
    return r.returncode, err, result


def test_optimum_load_and_generate_print_only_the_logits_to_keep_note(tiny_export, tmp_path):
    _, export, _ = tiny_export("tiny")
    folder = tmp_path / "export"
    shutil.copytree(export, folder)  # the shared export stays as built
    _large_vocab_tokenizer(folder)
    assert json.loads((folder / "config.json").read_text())["transformers_version"] == TRANSFORMERS_VERSION

    rc, err, result = run_user_script(folder)
    assert rc == 0 and result is not None, "\n".join(err[-30:])
    assert result["vocab"] > 100_000  # transformers' Mistral-regex check did run on this tokenizer
    assert result["io=False"][:4] == PROMPT and len(result["io=False"]) == 8
    assert result["io=True"] == result["io=False"]
    others = [line for line in err if ORT_LOGITS_TO_KEEP not in line]
    assert not others, "unexpected output on stderr:\n" + "\n".join(others)
    assert sum(ORT_LOGITS_TO_KEEP in line for line in err) == 2  # once per session: the note that cannot go
