"""The OpenAI-compatible server (runtime/server.py) on loopback, driven by the `openai` package: completions, chat,
streaming, concurrent streams each equal to its own single-stream result, and bad requests answered 400 while the
server keeps serving. A tiny seqlens export with a small byte-level BPE tokenizer (trained here) and a chat
template, so text paths run without the real model."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from export.onnx import export_onnx  # noqa: E402
from export.plan import make_plan  # noqa: E402
from runtime import GenerationConfig, Runner, SessionSettings  # noqa: E402
from runtime.batching import BatchEngine  # noqa: E402

from .conftest import random_checkpoint  # noqa: E402

CPU2 = SessionSettings(threads=2)
NAME = "tiny-qwen2"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
         "hello world, this is a tiny tokenizer for the server tests", "the quick brown fox jumps over the lazy dog"]


def _tokenizer(folder) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}))


def tiny_server_export(out):
    """A tiny random seqlens export with the tiny tokenizer and chat template (shared with the Ray test)."""
    ckpt = random_checkpoint("tiny-untied")
    export_onnx(ckpt, make_plan("onnx", ckpt, dtype="fp32", attention="seqlens", out=out, verify=False))
    _tokenizer(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from runtime.server import create_app

    out = tiny_server_export(tmp_path_factory.mktemp("server") / "seqlens")
    engine = BatchEngine(Runner(out, CPU2), slots=4, capacity=96, chunk=8, max_queue=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, NAME), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    yield client, out, f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    t.join(10)


def alone(folder, ids, n: int):
    """What `Runner.complete` (the library behind `runtime generate`) gives for one prompt: greedy, the export's
    stop tokens; its text is UTF-8 safe (bytes that never complete a character are dropped), as the server's."""
    r = Runner(folder, CPU2)
    return r.complete([ids], GenerationConfig(max_new_tokens=n, stop_token_ids=tuple(r.folder.eos_token_ids)))[0]


def test_models_and_health(server):
    client, _, base, _ = server
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_completion_equals_runtime_generate(server):
    client, folder, _, _ = server
    r = client.completions.create(model=NAME, prompt=[5, 9, 200, 31, 77, 12], max_tokens=12, temperature=0)
    want = alone(folder, [5, 9, 200, 31, 77, 12], 12)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == 6 and r.choices[0].finish_reason == want.finish_reason


def test_chat_and_streaming(server):
    client, folder, _, _ = server
    msgs = [{"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    tok = Runner(folder, CPU2).folder.tokenizer
    ids = tok.encode(tok.apply_chat_template(msgs))
    want = alone(folder, ids, 10)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_concurrent_streams_each_equal_their_single_stream(server):
    client, folder, _, engine = server
    tok = Runner(folder, CPU2).folder.tokenizer
    prompts = [TEXTS[0][:20], TEXTS[1][:30], TEXTS[2], TEXTS[0][30:], "fox", TEXTS[1][:9]]

    def one(p):
        s = client.completions.create(model=NAME, prompt=p, max_tokens=14, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in s)

    steps = engine.steps
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(one, prompts))
    assert engine.steps - steps < 6 * 14 and any(got)  # the streams shared decode steps (4 rows, 6 requests)
    for p, g in zip(prompts, got):
        assert g == alone(folder, tok.encode(p), 14).text, p


@pytest.mark.parametrize("body, message", [
    ({"model": "other", "prompt": [1, 2]}, "model 'other' is not served here"),
    ({"model": NAME, "prompt": [1, 2], "max_tokens": 0}, "max_tokens must be at least 1"),
    ({"model": NAME, "prompt": [1, 2], "max_tokens": 500}, "exceed this model's context of 96"),
    ({"model": NAME, "prompt": list(range(1, 120))}, "the prompt has 119 tokens; this model's context is 96"),
    ({"model": NAME, "prompt": [1, 2], "temperature": "hot"}, "temperature"),
    ({"model": NAME, "prompt": [1, 2], "n": 2}, "n must be 1"),
    ({"model": NAME, "prompt": [1, 99999]}, "prompt token ids must be in [0, 512)"),
    ({"model": NAME}, "prompt: Field required"),
])
def test_bad_requests_are_400_and_the_server_goes_on(server, body, message):
    client, _, base, _ = server
    r = httpx.post(base + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    bad = httpx.post(base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "the request body is not valid JSON"
    assert client.completions.create(model=NAME, prompt=[3, 4], max_tokens=2, temperature=0).usage.completion_tokens
