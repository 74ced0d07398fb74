"""`finetune serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the shared engine.

    GET  /health                 liveness and load (no key needed)
    GET  /v1/models              the base ("base") and every adapter, by name
    POST /v1/chat/completions    messages -> answer (stream: server-sent events ending with [DONE])
    POST /v1/completions         prompt -> answer (rendered as the adapter's training prompts were)
    POST /v1/classify            classification adapters: {"model", "input": text | [texts]} -> label probabilities
    /demo                        the gradio demo on the same engine (when a demo builder is given)

Errors are OpenAI error objects ({"error": {"message", "type", "param", "code"}}), never a traceback: malformed
JSON or a bad field 400, a missing or wrong API key 401, an unknown model 404, a full queue 429 with Retry-After.
One log line per request (id, path, status, model, tokens, ms); prompts and keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from finetune.errors import FinetuneError
from finetune.serving import openai_api as oa
from finetune.serving.engine import (
    BASE,
    Busy,
    Chunk,
    Engine,
    GenerationParams,
    InputError,
    Stream,
    UnknownModel,
)

log = logging.getLogger("finetune.serve")
BASE_ID = "base"  # the base model's id in the API (BASE is the demo's picker label; both are accepted)
Handler = Callable[[Any], Awaitable[Any]]


class ApiError(Exception):
    """A refused request: HTTP status and an OpenAI error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, oa.error_body(message, kind, param, code), headers or {}


def create_app(engine: Engine, api_keys: Sequence[str] = (), demo: Callable[[Engine], Any] | None = None) -> Any:
    """The FastAPI app; `demo(engine)` returns the gradio Blocks mounted at /demo (None: no demo)."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException

    api = _Api(engine, tuple(api_keys))
    app = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(HTTPException, api.http_error)
    for path, method, handler, auth in (
            ("/", "GET", api.index, True), ("/health", "GET", api.health, False),
            ("/v1/models", "GET", api.models, True), ("/v1/chat/completions", "POST", api.chat, True),
            ("/v1/completions", "POST", api.completions, True), ("/v1/classify", "POST", api.classify, True)):
        app.router.add_route(path, api.guarded(handler, auth), methods=[method])
    if demo is not None:
        _mount_demo(app, demo(engine), api)
    app.add_middleware(RequestLog)
    return app


def _mount_demo(app: Any, blocks: Any, api: _Api) -> None:
    """The demo page at /demo (the page options and login page of `finetune demo`); with API keys set, its login
    asks for one of them as the password."""
    from finetune.serving.demo.app import mount

    auth = (lambda _user, password: api.key_ok(password)) if api.keys else None
    mount(app, blocks, path="/demo", auth=auth)


class _Api:
    """The request handlers (plain Starlette endpoints: bodies are validated here, errors answered here)."""

    def __init__(self, engine: Engine, keys: tuple[str, ...]):
        self.engine, self.keys = engine, keys
        self.created = oa.now()

    # -- plumbing -----------------------------------------------------------------------------------------------

    def key_ok(self, given: str) -> bool:
        """Constant-time comparison against every key (no early exit that would time which one matched)."""
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given.encode(), key.encode())
        return ok

    def guarded(self, handler: Handler, auth: bool) -> Handler:
        from starlette.responses import JSONResponse

        async def endpoint(request: Any) -> Any:
            try:
                if auth and self.keys:
                    self._authorize(request)
                return await handler(request)
            except ApiError as exc:
                return JSONResponse(exc.body, exc.status, headers=exc.headers)
            except Exception:  # noqa: BLE001 - the client gets an error object, the log gets the traceback
                log.exception("request %s %s failed", request.method, request.url.path)
                return JSONResponse(oa.error_body("internal error: see the server log", "server_error"), 500)

        return endpoint

    def _authorize(self, request: Any) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.key_ok(token.strip()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def http_error(self, request: Any, exc: Any) -> Any:
        from starlette.responses import JSONResponse

        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(oa.error_body(f"{request.method} {request.url.path}: {exc.detail}", kind), exc.status_code)

    async def _body(self, request: Any, model: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param or None) from None
        request.scope.setdefault("finetune", {})["model"] = getattr(body, "model", None)
        return body

    def _resolve(self, model: str, task: str) -> str:
        names = self.engine.names()
        name = BASE if model == BASE_ID and BASE in names else model
        if name not in names:
            served = ", ".join(self._ids())
            raise ApiError(404, f"the model '{model}' does not exist here; served: {served}", param="model",
                           code="model_not_found")
        actual = self.engine.card(name).task
        if actual != task:
            where = "POST /v1/classify" if actual == "classification" else "/v1/chat/completions or /v1/completions"
            raise ApiError(400, f"'{model}' is a {actual} model: use {where}", param="model")
        return name

    def _ids(self) -> list[str]:
        return [BASE_ID if n == BASE else n for n in self.engine.names()]

    # -- endpoints ----------------------------------------------------------------------------------------------

    async def index(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"service": "finetune serve", "openai_base_url": str(request.base_url) + "v1",
                             "models": self._ids(), "docs": "docs/serving.md"})

    async def health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        stats = self.engine.stats()
        body: dict[str, Any] = {"status": "ok"}
        if stats is not None:
            body.update(running=stats.running, waiting=stats.waiting, max_batch=stats.max_batch,
                        max_queue=stats.max_queue, served=stats.served, generated_tokens=stats.generated_tokens)
            if not stats.alive:
                body["status"] = "error"
                return JSONResponse(body, 503)
        return JSONResponse(body)

    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        base = self.engine.card(self.engine.names()[0]).base
        return JSONResponse(oa.model_list(self._ids(), base, self.created))

    async def chat(self, request: Any) -> Any:
        body = await self._body(request, oa.ChatRequest)
        name = self._resolve(body.model, "causal_lm")
        if not self.engine.card(name).chat:
            raise ApiError(400, f"'{body.model}' was trained without a chat template: use /v1/completions",
                           param="model")
        if body.messages[-1].role != "user":
            raise ApiError(400, "the last message must be a user message", param="messages")
        return await self._generate(request, body, name, body.as_prompt(), chat=True)

    async def completions(self, request: Any) -> Any:
        body = await self._body(request, oa.CompletionRequest)
        name = self._resolve(body.model, "causal_lm")
        text = body.text()
        if text is None:
            raise ApiError(400, "send one prompt per request (a string, or a list of one string)", param="prompt")
        return await self._generate(request, body, name, text, chat=False)

    async def classify(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        body = await self._body(request, oa.ClassifyRequest)
        name = self._resolve(body.model, "classification")
        try:
            results = await asyncio.to_thread(self.engine.classify_many, name, body.texts())
        except InputError as exc:
            raise ApiError(400, str(exc), param="input") from None
        data = [{"index": i, "label": max(probs, key=probs.__getitem__), "probs": probs}
                for i, probs in enumerate(results)]
        return JSONResponse({"object": "list", "model": body.model, "data": data})

    # -- generation ---------------------------------------------------------------------------------------------

    async def _generate(self, request: Any, body: oa.GenerationRequest, name: str, prompt: Any, chat: bool) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        stream = self._submit(body, name, prompt)
        info = request.scope.setdefault("finetune", {})
        info.update(id=stream.id, prompt_tokens=stream.prompt_tokens)
        rid, created = ("chatcmpl-" if chat else "cmpl-") + stream.id, oa.now()
        if body.stream:
            events = _sse(stream, rid, body.model, created, chat, bool(body.stream_options and
                                                                        body.stream_options.include_usage), info)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        last = await _collect(stream, request)
        info.update(completion_tokens=last.tokens, finish=last.finish_reason)
        build = oa.chat_response if chat else oa.completion_response
        return JSONResponse(build(rid, body.model, created, last))

    def _submit(self, body: oa.GenerationRequest, name: str, prompt: Any) -> Stream:
        refused = body.refused()
        if refused:
            raise ApiError(400, refused[0][1], param=refused[0][0])
        limit = self.engine.limits.max_new_tokens
        wanted = body.new_tokens()
        if wanted is not None and wanted > limit:
            raise ApiError(400, f"max_tokens={wanted} is above this server's limit of {limit} (--max-new-tokens)",
                           param="max_tokens")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        params = GenerationParams(wanted or limit, body.temperature, body.top_p, seed, body.stops(), body.ignore_eos)
        try:
            return self.engine.submit(name, prompt, params, loop=asyncio.get_running_loop())
        except UnknownModel as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        except InputError as exc:
            raise ApiError(400, str(exc), param="messages" if isinstance(prompt, list) else "prompt") from None
        except Busy as exc:
            raise ApiError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None


async def _collect(stream: Stream, request: Any) -> Chunk:
    """The finished answer; a client that hangs up first cancels the request (its row leaves at the next step)."""
    async def drain() -> Chunk:
        async for _ in stream:
            pass
        return stream.last

    answer = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not answer.done():
        stream.cancel()
    gone.cancel()
    return await answer


async def _disconnected(request: Any) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(stream: Stream, rid: str, model: str, created: int, chat: bool, with_usage: bool,
               info: dict[str, Any]) -> AsyncIterator[str]:
    """OpenAI chunks as server-sent events; if the client goes away the generator is closed and the request
    cancelled. Errors after the first byte can only be reported in the stream: as an error event."""
    def event(data: Any) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield event(oa.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
        async for chunk in stream:
            if chunk.delta:
                yield event(oa.chat_chunk(rid, model, created, {"content": chunk.delta}, None) if chat
                            else oa.completion_chunk(rid, model, created, chunk.delta, None))
            if chunk.finish_reason is not None:
                reason = oa.finish(chunk)
                info.update(completion_tokens=chunk.tokens, finish=chunk.finish_reason)
                yield event(oa.chat_chunk(rid, model, created, {}, reason) if chat
                            else oa.completion_chunk(rid, model, created, "", reason))
                if with_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield event(oa.usage_chunk(rid, model, created, obj, chunk))
        yield "data: [DONE]\n\n"
    except FinetuneError as exc:
        yield event(oa.error_body(str(exc), "server_error"))
    finally:
        stream.close()


class RequestLog:
    """ASGI middleware: one log line per request once its response is complete (streams included)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            info = scope.get("finetune", {})
            fields = " ".join(f"{k}={info[k]}" for k in ("model", "prompt_tokens", "completion_tokens", "finish")
                              if k in info)
            level = logging.DEBUG if scope["path"].startswith("/demo") else logging.INFO
            log.log(level, "%s %s %s %d %s %.0f ms", info.get("id", "-"), scope["method"], scope["path"], status[0],
                    fields, 1000 * (time.perf_counter() - start))


# -- running it -----------------------------------------------------------------------------------------------------


def run(app: Any, host: str, port: int) -> None:
    """Serve until Ctrl+C / SIGTERM (uvicorn handles both and drains open connections)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve in a background thread (tests, notebooks); yields the base URL, stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="finetune-serve", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise FinetuneError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
