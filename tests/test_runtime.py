"""The ONNX Runtime runner (runtime/): generation against the PyTorch reference, batching, chunking, stop
conditions, the KV cache's IO binding, and the errors a user sees.

Tiny exports use a random checkpoint with random biases and norms (conftest.hf_model), exported once per module
without the parity gate: the tests here compare the runner's tokens with the reference's directly. The real-model
tests share the session's fp32 export of Qwen2.5-Coder-0.5B-Instruct (conftest.real_exports; its parity is
asserted in test_export_real.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys

import numpy as np
import pytest

from export.onnx import export_onnx, reference_model
from export.onnx.verify import empty_past, ort_step
from export.plan import make_plan
from qwen2_ref.checkpoint import open_checkpoint
from qwen2_ref.config import from_name
from qwen2_ref.errors import Qwen2Error
from qwen2_ref.generate import SamplingParams, generate as ref_generate
from runtime import GenerationConfig, Runner, SessionSettings
from runtime.__main__ import cli
from runtime.runner import _StopText, apply_repetition_penalty

from .conftest import hf_model
from .golden import LLAMA_CPP_GREEDY, PROMPT, PROMPT_IDS

PROMPTS = [[5, 9, 200, 31, 77, 12, 400, 3, 3, 8, 51], [8, 1, 3, 99, 7], [301, 17, 45, 2, 260, 11, 90, 6]]
CPU2 = SessionSettings(threads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, export folder, reference model) for the tiny untied config, fp32, the default (fused)
    lowering: GroupQueryAttention in every layer, so the runner shares one KV buffer for past and present."""
    root = tmp_path_factory.mktemp("runtime")
    hf_model(from_name("tiny-untied"), seed=3).save_pretrained(root / "ckpt", safe_serialization=True)
    ckpt = open_checkpoint(root / "ckpt")
    export_onnx(ckpt, make_plan("onnx", ckpt, dtype="fp32", out=root / "fp32", verify=False))
    return ckpt, root / "fp32", reference_model(ckpt)


@pytest.fixture(scope="module")
def runner(tiny):
    return Runner(tiny[1], CPU2)


@pytest.fixture(scope="module")
def copying(tiny):
    """The same export with the ping-pong KV cache (present = past + new copied each step) forced."""
    return Runner(tiny[1], CPU2, kv_share=False)


@pytest.fixture(scope="module")
def seqlens(tiny):
    """The same checkpoint exported with the CUDA profiles' "seqlens" attention (per-row lengths, no padding
    bias): the runner prefills a batch row by row into its rows of the shared cache and decodes it together."""
    ckpt, folder, _ = tiny
    out = folder.parent / "fp32-seqlens"
    export_onnx(ckpt, make_plan("onnx", ckpt, dtype="fp32", attention="seqlens", out=out, verify=False))
    return Runner(out, CPU2)


def tokens(runner_or_model, prompts, params, **kw):
    gen = runner_or_model.generate(prompts, params, **kw) if isinstance(runner_or_model, Runner) \
        else ref_generate(runner_or_model, prompts, params, **kw)
    return list(gen)


def test_greedy_equals_reference(tiny, runner):
    params = SamplingParams(max_new_tokens=24)
    for p in PROMPTS:
        assert tokens(runner, [p], params) == tokens(tiny[2], [p], params)
    assert runner.session.active == ("CPUExecutionProvider",) and runner.device == "cpu"


def test_seeded_sampling_is_reproducible_and_matches_reference(tiny, runner):
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    a = tokens(runner, PROMPTS[:1], params)
    assert a == tokens(runner, PROMPTS[:1], params)
    assert a == tokens(tiny[2], PROMPTS[:1], params)  # same logits, same sampler, same generator
    assert a != tokens(runner, PROMPTS[:1], dataclasses.replace(params, seed=8))


def test_padded_batch_equals_prompts_one_by_one(runner):
    params = SamplingParams(max_new_tokens=16)
    batch = tokens(runner, PROMPTS, params)
    for i, p in enumerate(PROMPTS):
        assert [step[i] for step in batch] == [step[0] for step in tokens(runner, [p], params)]
    assert runner.stats.batch == 1 and runner.stats.finish == ["length"]


SAMPLED = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=7)


GREEDY16 = SamplingParams(max_new_tokens=16)


@pytest.mark.parametrize("params, chunk", [(GREEDY16, 0), (GREEDY16, 3), (SAMPLED, 0)],
                         ids=["greedy", "chunked", "sampled"])
def test_seqlens_batch_equals_the_reference_row_by_row(tiny, runner, seqlens, params, chunk):
    """A batch of three prompts of different lengths through a seqlens export: each row equals the reference
    generating that prompt alone (greedy), and the whole batch equals the left-padded bias export's (sampled too:
    same logits, same generator)."""
    assert seqlens.per_row and seqlens.shared_kv and not runner.per_row
    batch = tokens(seqlens, PROMPTS, params, prefill_chunk=chunk)
    assert batch == tokens(runner, PROMPTS, params, prefill_chunk=chunk)
    if params.greedy:
        for i, p in enumerate(PROMPTS):
            assert [step[i] for step in batch] == [step[0] for step in tokens(tiny[2], [p], params)]
    assert list(seqlens.cache.lengths) == [len(p) + params.max_new_tokens - 1 for p in PROMPTS]


def test_greedy_argmax_where_the_logits_are(tiny, runner, seqlens):
    """greedy_on_device: the decode steps' arg-max runs in a one-node ONNX Runtime session on the logits'
    OrtValue (on CUDA only token ids cross to the host); on the CPU provider it must give the host's tokens."""
    params = SamplingParams(max_new_tokens=16)
    for r in (runner, seqlens):
        on = Runner(r.folder, CPU2, greedy_on_device=True)
        assert not r.greedy_on_device and on.greedy_on_device
        assert tokens(on, PROMPTS, params) == tokens(r, PROMPTS, params)
        assert tokens(on, PROMPTS[:1], SAMPLED) == tokens(r, PROMPTS[:1], SAMPLED)  # sampling stays on the host


def test_bias_export_on_onnxruntime_gpu_131_is_one_line(tiny, monkeypatch):
    """onnxruntime-gpu's newest (1.31.1) has no GroupQueryAttention `query_seqlens` input: loading a bias-layout
    export there fails with this message (seen with 1.31.1), which the runner turns into what to do."""
    import onnxruntime as ort

    def old_ort(*a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model failed:This is an invalid model. "
                           "Error Node(node_group_query_attention__2) with schema("
                           "com.microsoft::GroupQueryAttention:1) has input size 17 not in range [min=7, max=16].")

    monkeypatch.setattr(ort, "InferenceSession", old_ort)
    with pytest.raises(Qwen2Error, match=r"model.onnx: its attention \(--attention bias: a padding bias and "
                                         r"query_seqlens\) needs onnxruntime 1.32 or later; .* re-export it with "
                                         r"--attention seqlens"):
        Runner(tiny[1], CPU2)


def test_chunked_prefill_equals_one_shot(runner):
    ids = np.array([PROMPTS[0]])
    mask = np.ones_like(ids)
    runner._ensure_cache(1, ids.shape[1])
    one = runner.prefill(ids, mask, chunk=0).copy()
    runner._ensure_cache(1, ids.shape[1])
    chunked = runner.prefill(ids, mask, chunk=3).copy()
    np.testing.assert_allclose(chunked, one, atol=1e-5, rtol=0)
    params = SamplingParams(max_new_tokens=12)
    assert tokens(runner, PROMPTS, params, prefill_chunk=4) == tokens(runner, PROMPTS, params, prefill_chunk=0)


@pytest.mark.parametrize("mode", ["runner", "copying"])
def test_io_bound_cache_equals_plain_session_run(mode, request):
    """The shared and the ping-pong buffers hold exactly what ONNX Runtime's own outputs hold, and are reused
    across calls."""
    runner = request.getfixturevalue(mode)
    ids = np.array([PROMPTS[1]])
    for _ in runner.generate([PROMPTS[1]], SamplingParams(max_new_tokens=3)):
        pass
    cache = runner.cache
    for _ in runner.generate([PROMPTS[1]], SamplingParams(max_new_tokens=3)):
        pass
    assert runner.cache is cache  # allocated once, reused
    logits, past = ort_step(runner.sess, ids, np.ones_like(ids), np.arange(ids.shape[1])[None],
                            empty_past(runner.sess, 1))
    runner._ensure_cache(1, ids.shape[1])
    mine = runner.prefill(ids, np.ones_like(ids))
    np.testing.assert_array_equal(mine, logits[:, -1])
    for layer in range(2):
        np.testing.assert_array_equal(runner.cache.host_layer(layer, 0), past[2 * layer])
        np.testing.assert_array_equal(runner.cache.host_layer(layer, 1), past[2 * layer + 1])


def test_kv_mode_follows_the_graphs_attention(runner, copying, tiny_export):
    assert runner.shared_kv and not copying.shared_kv
    _, function, _ = tiny_export("tiny-untied", "fp32", "function")
    assert not Runner(function, CPU2).shared_kv  # present = Concat(past, new): past and present cannot share
    assert not Runner(dataclasses.replace(runner.folder, report={}), CPU2).shared_kv  # no report: the safe mode


GREEDY = SamplingParams(max_new_tokens=16)


@pytest.mark.parametrize("prompts, params, chunk", [
    (PROMPTS[:1], GREEDY, 0),
    (PROMPTS[:2], GREEDY, 0),  # left-padded
    (PROMPTS[:2], GREEDY, 3),  # chunked prefill: GroupQueryAttention appends a prompt chunk to the shared buffer
    (PROMPTS[:2], SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=7), 0),
], ids=["greedy", "padded-batch", "chunked", "sampled"])
def test_shared_kv_equals_copying(runner, copying, prompts, params, chunk):
    assert tokens(runner, prompts, params, prefill_chunk=chunk) == tokens(copying, prompts, params,
                                                                          prefill_chunk=chunk)
    shared, pair = runner.cache, copying.cache
    assert shared.shared and not pair.shared and shared.nbytes * 2 == pair.nbytes
    assert shared.length == pair.length == len(max(prompts, key=len)) + params.max_new_tokens - 1
    for layer in range(2):
        for which in (0, 1):
            np.testing.assert_array_equal(shared.host_layer(layer, which), pair.host_layer(layer, which))


def test_stop_tokens_and_max_new_tokens(runner):
    free = [s[0] for s in tokens(runner, PROMPTS[:1], SamplingParams(max_new_tokens=10))]
    stop = free[3]
    first = free.index(stop)
    got = [s[0] for s in tokens(runner, PROMPTS[:1], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))]
    assert got == free[:first + 1] and runner.stats.finish == ["stop"]
    assert len(tokens(runner, PROMPTS[:1], SamplingParams(max_new_tokens=5))) == 5
    assert runner.stats.finish == ["length"]
    assert tokens(runner, PROMPTS[:1], SamplingParams(max_new_tokens=0)) == []
    # in a batch, a stopped row yields None while the others go on
    batch = tokens(runner, PROMPTS[:2], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    row0 = [s[0] for s in batch]
    assert row0[:first + 1] == free[:first + 1] and all(t is None for t in row0[first + 1:])


def test_repetition_penalty_rule():
    import torch

    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_repetition_penalty_changes_a_repetitive_greedy_run(runner):
    plain = [s[0] for s in tokens(runner, PROMPTS[:1], GenerationConfig(max_new_tokens=24))]
    pen = [s[0] for s in tokens(runner, PROMPTS[:1], GenerationConfig(max_new_tokens=24, repetition_penalty=5.0))]
    assert len(set(pen)) >= len(set(plain))
    with pytest.raises(ValueError):
        GenerationConfig(repetition_penalty=0)


def test_generation_stops_at_the_context(tiny):
    short = dataclasses.replace(Runner(tiny[1], CPU2).folder, context=16)
    r = Runner(short, CPU2)
    out = tokens(r, [PROMPTS[0]], SamplingParams(max_new_tokens=50))  # 11 prompt tokens, context 16
    assert len(out) == 6 and r.stats.finish == ["context"]
    with pytest.raises(Qwen2Error, match="the prompt has 17 tokens but the export's context is 16"):
        tokens(r, [list(range(1, 18))], SamplingParams(max_new_tokens=1))


def test_cuda_requested_on_a_cpu_build_warns_and_runs_on_cpu(tiny, runner):
    r = Runner(tiny[1], SessionSettings(threads=2).with_(providers="cuda"))
    assert r.session.requested == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert r.device == "cpu" and r.session.active == ("CPUExecutionProvider",)
    assert any("CUDA WAS REQUESTED BUT IS NOT ACTIVE" in w for w in r.session.warnings)
    params = SamplingParams(max_new_tokens=8)
    assert tokens(r, PROMPTS[:1], params) == tokens(runner, PROMPTS[:1], params)


def test_device_profile_settings():
    s = SessionSettings.from_profile("x86-2core")
    assert s.threads == 2 and s.providers == ("CPUExecutionProvider",) and s.prefill_chunk == 1024
    g = SessionSettings.from_profile("a10g", threads=4)
    assert g.providers[0] == "CUDAExecutionProvider" and g.threads == 4 and g.gpu_mem_limit_gib == 22.0


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_hold_back_partial_matches():
    s = _StopText(FakeTokenizer(), ["END"])
    shown = ""
    for ch in "abcENxEND-tail":
        stopped = s.push(ord(ch))
        shown += s.take()
        if stopped:
            break
    shown += s.take(final=True)
    assert shown == "abcENx" and s.stopped
    t = _StopText(FakeTokenizer(), ["END"])
    for ch in "abE":
        t.push(ord(ch))
    assert t.take() == "ab" and t.take(final=True) == "E"


# ---- errors, through the CLI: one line, exit status 2 ----------------------------------------------------------------
def run_main(monkeypatch, capsys, *args):
    from qwen2_ref.__main__ import run_cli

    monkeypatch.setattr(sys, "argv", ["runtime", *args])
    try:
        run_cli(cli)
    except SystemExit as e:
        return e.code, capsys.readouterr()
    return 0, capsys.readouterr()


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    code, out = run_main(monkeypatch, capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and "no such folder" in out.err and "python -m export onnx" in out.err
    assert out.err.count("\n") == 1


def test_non_export_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, out = run_main(monkeypatch, capsys, "bench", "--model", str(tmp_path))
    assert code == 2 and "not an ONNX export folder (no model.onnx, config.json)" in out.err


def test_corrupt_export_is_a_clear_error(tiny, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny[1], bad)
    (bad / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    code, out = run_main(monkeypatch, capsys, "bench", "--model", str(bad), "--runs", "1")
    assert code == 2 and "ONNX Runtime cannot load it" in out.err and "re-export" in out.err
    shutil.copy(tiny[1] / "model.onnx", bad / "model.onnx")
    with open(bad / "model.onnx.data", "r+b") as f:  # weights cut short
        f.truncate(1000)
    code, out = run_main(monkeypatch, capsys, "bench", "--model", str(bad), "--runs", "1")
    assert code == 2 and "ONNX Runtime cannot load it" in out.err
    (bad / "config.json").write_text("{not json")
    code, out = run_main(monkeypatch, capsys, "bench", "--model", str(bad))
    assert code == 2 and "config.json: not valid JSON" in out.err


def test_random_export_has_no_tokenizer_for_text(tiny, monkeypatch, capsys):
    code, out = run_main(monkeypatch, capsys, "generate", "--model", str(tiny[1]), "--prompt", "hi")
    assert code == 2 and "no tokenizer.json" in out.err


def test_bench_prints_parseable_figures(tiny, monkeypatch, capsys):
    code, out = run_main(monkeypatch, capsys, "bench", "--model", str(tiny[1]), "--runs", "1",
                         "--prompt-tokens", "32", "--new-tokens", "8", "--threads", "2")
    assert code == 0
    fields = dict(line.split(": ", 1) for line in out.out.strip().splitlines())
    for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mib", "size_mib"):
        assert float(fields[k]) > 0
    assert fields["providers"] == "['CPUExecutionProvider']" and fields["new_tokens"] == "8"


# ---- the real Qwen2.5-Coder-0.5B-Instruct ----------------------------------------------------------------------------
@pytest.fixture
def real_runner(real_exports):
    """Per test, so its 2.4 GB session is gone before the next test opens another."""
    return Runner(real_exports[0] / "fp32", CPU2)


@pytest.mark.real_model
def test_real_fp32_greedy_equals_llama_cpp(real_runner):
    out = [s[0] for s in real_runner.generate([PROMPT_IDS], SamplingParams(max_new_tokens=64))]
    assert real_runner.folder.tokenizer.decode(PROMPT_IDS + out) == LLAMA_CPP_GREEDY
    text = "".join(real_runner.stream(PROMPT, real_runner.default_config(max_new_tokens=64)))
    assert PROMPT + text == LLAMA_CPP_GREEDY


@pytest.mark.real_model
def test_real_stop_string_and_chat(real_runner):
    text = "".join(real_runner.stream(PROMPT, real_runner.default_config(max_new_tokens=64, stop_strings=("elif",))))
    assert text == LLAMA_CPP_GREEDY[len(PROMPT):LLAMA_CPP_GREEDY.index("elif")]
    assert real_runner.stats.finish == ["stop"]
    [c] = real_runner.complete(["Reply with one word: the capital of France?"],
                               real_runner.default_config(max_new_tokens=16), chat=True)
    assert "Paris" in c.text and c.finish_reason == "stop" and c.token_ids[-1] == 151645  # <|im_end|>


@pytest.mark.real_model
def test_real_prompt_longer_than_context_cli(real_exports, monkeypatch, capsys):
    code, out = run_main(monkeypatch, capsys, "generate", "--model", str(real_exports[0] / "fp32"),
                         "--prompt", "word " * 33000, "--max-new-tokens", "1")
    assert code == 2 and "but the export's context is 32768" in out.err and out.out == ""
