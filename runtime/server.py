"""`python -m runtime serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one export, with
continuous batching (batching.py): concurrent requests share decode steps.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the export's chat template);
`stream: true` answers with server-sent events ending in `data: [DONE]`. Sampling: max_tokens (or
max_completion_tokens), temperature (OpenAI's default 1), top_p, stop, seed, n = 1. A bad request is HTTP 400 with an
OpenAI-style error body, a full queue 429; the server keeps serving either way. One log line per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from qwen2_ref.errors import Qwen2Error

from .batching import BatchEngine, QueueFull
from .runner import GenerationConfig

log = logging.getLogger("qwen2.serve")
FINISH = {"stop": "stop", "length": "length", "context": "length", "deadline": "length", "cancelled": "stop",
          "error": "error"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[int]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class EngineLoop(threading.Thread):
    """The one thread that steps the engine: it sleeps while nothing is queued or running."""

    def __init__(self, engine: BatchEngine):
        super().__init__(name="qwen2-engine", daemon=True)
        self.engine, self.wake, self.stopping = engine, threading.Event(), False

    def run(self) -> None:
        while not self.stopping:
            if not self.engine.busy:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # noqa: BLE001 - logged; the requests in flight end with "error", the server goes on
                log.exception("engine step failed; ending the requests in flight")
                self.engine.fail_all("error")


def create_app(engine: BatchEngine, model_name: str, timeout_s: float | None = None,
               replica: str | None = None) -> FastAPI:
    """`timeout_s`: each request's deadline (it ends with what it has, finish_reason "length"). `replica`: this
    copy's name among several (Ray Serve): sent as the `x-replica` header of every answer and in /health."""
    loop_thread = EngineLoop(engine)
    folder = engine.runner.folder
    tok = folder.tokenizer

    async def lifespan(app):
        loop_thread.start()
        yield
        loop_thread.stopping = True
        loop_thread.wake.set()

    app = FastAPI(title="qwen2-export server", lifespan=lifespan)
    if replica is not None:
        @app.middleware("http")
        async def _name(request: Request, call_next):
            response = await call_next(request)
            response.headers["x-replica"] = replica
            return response

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        log.info('%s "%s %s" %d %s', _client(request), request.method, request.url.path, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return await _api_error(request, APIError(400, "the request body is not valid JSON"))
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return await _api_error(request, APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}",
                                                  where or None))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": sum(r is not None for r in engine.rows), "waiting": len(engine.waiting)} \
            | ({"replica": replica} if replica is not None else {})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "qwen2-export"}]}

    def prepare(body: _Body, ids: list[int]) -> GenerationConfig:
        if body.model != model_name:
            raise APIError(400, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                           "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, "n must be 1", "n")
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        room = engine.capacity - len(ids)
        if room <= 0:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {engine.capacity}",
                           "prompt", "context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = min(room, 16 if isinstance(body, CompletionBody) else room)
        if max_tokens <= 0:
            raise APIError(400, f"max_tokens must be at least 1, not {max_tokens}", "max_tokens")
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + {len(ids)} prompt tokens exceed this model's context "
                                f"of {engine.capacity}", "max_tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return GenerationConfig(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop_token_ids=tuple(folder.eos_token_ids),
                                stop_strings=tuple(stop))

    def encode(text: str) -> list[int]:
        if tok is None:
            raise APIError(400, "this export has no tokenizer: send the prompt as a list of token ids", "prompt")
        return tok.encode(text)

    async def generate(request: Request, body: _Body, ids: list[int], chat: bool):
        params = prepare(body, ids)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        try:
            req = engine.submit(ids, params, on_token=lambda t, p: loop.call_soon_threadsafe(pieces.put_nowait, p),
                                on_finish=lambda f: loop.call_soon_threadsafe(pieces.put_nowait, None),
                                timeout_s=timeout_s)
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error") from None
        except Qwen2Error as e:
            raise APIError(400, str(e), "prompt") from None
        loop_thread.wake.set()
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, t0 = int(time.time()), time.monotonic()

        def done_log(status: int) -> None:
            log.info('%s "%s %s" %d prompt=%d completion=%d finish=%s %.2fs', _client(request), request.method,
                     request.url.path, status, len(ids), len(req.tokens), req.finish, time.monotonic() - t0)

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": len(req.tokens),
                    "total_tokens": len(ids) + len(req.tokens)}

        if not body.stream:
            try:
                while (await pieces.get()) is not None:
                    pass
            except asyncio.CancelledError:  # the client went away
                req.cancel()
                raise
            done_log(200)
            choice: dict = {"index": 0, "finish_reason": FINISH[req.finish], "logprobs": None}
            choice |= {"message": {"role": "assistant", "content": req.text}} if chat else {"text": req.text}
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice],
                    "usage": usage()}

        def chunk(piece: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": kind + (".chunk" if chat else ""),
                                          "created": created, "model": model_name, "choices": [choice]}) + "\n\n"

        async def events():
            try:
                if chat:
                    yield chunk(None, first=True)
                while (piece := await pieces.get()) is not None:
                    if piece:
                        yield chunk(piece)
                yield chunk(None, FINISH[req.finish])
                if (body.stream_options or {}).get("include_usage"):
                    yield "data: " + json.dumps({"id": rid, "object": kind + (".chunk" if chat else ""),
                                                 "created": created, "model": model_name, "choices": [],
                                                 "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
                done_log(200)
            finally:
                if not req.done.is_set():  # the client disconnected: its row is freed at the next step
                    req.cancel()
                    done_log(499)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        ids = encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        if any(not 0 <= i < engine.runner.vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {engine.runner.vocab})", "prompt")
        return await generate(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        if tok is None:
            raise APIError(400, "this export has no tokenizer, so no chat template: use /v1/completions with token "
                                "ids", "messages")
        try:
            text = tok.apply_chat_template([m.model_dump() for m in body.messages])
        except Qwen2Error as e:
            raise APIError(400, str(e), "messages") from None
        return await generate(request, body, tok.encode(text), chat=True)

    return app


def _client(request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


def serve(engine: BatchEngine, model_name: str, host: str, port: int, timeout_s: float | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log.info("serving %s on http://%s:%d/v1 (%d rows decoded together, context %d)", model_name, host, port,
             engine.slots, engine.capacity)
    uvicorn.run(create_app(engine, model_name, timeout_s), host=host, port=port, log_level="warning", access_log=False)
