"""OpenAI-compatible HTTP server (FastAPI): /v1/completions, /v1/chat/completions, /v1/models, /health.

Requests are validated with pydantic (``protocol``; bad input is a 400 with an OpenAI-style error body), run
on the AsyncEngine, and answered whole or streamed as server-sent events. A client that disconnects
mid-stream has its request aborted, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
import uuid

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..engine.async_engine import AsyncEngine
from ..engine.engine import RequestError
from ..engine.protocol import Update
from ..engine.sampling import SamplingParams
from ..model.tokenizer import Tokenizer
from .protocol import (
    ChatCompletionRequest,
    ChoiceStream,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)

log = logging.getLogger("xytune.server")
MAX_WARNED_FIELDS = 64  # unknown field names logged (once each); clients that invent names cannot fill the log


class RequestFailed(RuntimeError):
    """The engine failed one request (a bug it hit); the others in flight and later ones are served."""


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def build_app(engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
              default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app: the routes of an ``OpenAIServer``, its API-key check and its 400s for bad bodies."""
    server = OpenAIServer(engine, tokenizer, model_name, default_max_tokens)
    app = FastAPI(title="xytune", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        return _error(400, f"{where}: {msg}" if where else msg)

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "Missing or wrong API key.", "authentication_error")
        return await call_next(request)

    json_or_stream = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}
    app.get("/health", responses=_errors(503))(server.health)
    app.get("/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, **_errors(404)})(
        server.metrics)
    app.post("/tokenize", responses=_errors(400, 404))(server.tokenize)
    app.post("/detokenize", responses=_errors(400, 404))(server.detokenize)
    app.get("/v1/models", responses=_errors(401))(server.models)
    app.post("/v1/completions", responses={**json_or_stream, **_errors(400, 401, 404, 500, 503)})(server.completions)
    app.post("/v1/chat/completions", responses={**json_or_stream, **_errors(400, 401, 404, 500, 503)})(
        server.chat_completions)
    app.openapi = lambda: _openapi_without_422(app)
    return app


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "integer"}}}}}
ERROR_MEANINGS = {400: "A bad request body: one sentence says what is wrong.", 401: "Missing or wrong API key.",
                  404: "No such model (or metrics are off).",
                  500: "The engine failed this request alone (a bug; the server goes on).", 503: "The engine failed."}


def _errors(*codes: int) -> dict:
    """OpenAPI ``responses`` entries for the errors a route answers, each with the OpenAI error body."""
    return {c: {"description": ERROR_MEANINGS[c], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for c in codes}


def _openapi_without_422(app: FastAPI) -> dict:
    """FastAPI documents a 422 for every body it validates; this server answers bad bodies with a 400 in
    OpenAI's error shape instead (as OpenAI and vLLM do), so the schema says that."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


class OpenAIServer:
    """The endpoints over one engine and tokenizer: bodies to engine requests, updates to OpenAI responses."""

    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, default_max_tokens: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.default_max_tokens = default_max_tokens
        self.info = engine.info
        self.eos_ids = set(self.info.eos_ids)
        self.created = int(time.time())
        self.warned: set[str] = set()  # ignored request fields already logged (once each, not per request)

    async def health(self):
        if self.engine.error is not None:
            return _error(503, f"engine failed: {self.engine.error}", "server_error")
        snap = self.engine.snapshot()
        return {"status": "ok", "kv_blocks_free": snap["kv_blocks_free"], "kv_blocks_total": snap["kv_blocks_total"],
                "requests_active": self.engine.num_active}

    async def metrics(self):
        if self.engine.metrics is None:
            return _error(404, "metrics are off")
        return Response(self.engine.metrics.render(self.engine.snapshot()), media_type=CONTENT_TYPE_LATEST)

    async def tokenize(self, body: TokenizeRequest):
        if (err := self.check_model(body)) is not None:
            return err
        try:
            if body.messages is not None:
                text = self.tokenizer.apply_chat_template([m.model_dump() for m in body.messages],
                                                          body.add_generation_prompt, body.continue_final_message,
                                                          body.chat_template_kwargs)
                ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template adds its own
            else:
                ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as exc:
            return _error(400, str(exc))
        return {"count": len(ids), "max_model_len": self.info.max_model_len, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest):
        if (err := self.check_model(body)) is not None:
            return err
        bad = [t for t in body.tokens if not 0 <= t < self.info.vocab_size]
        if bad:
            return _error(400, f"Token id {bad[0]} is outside the vocabulary (0..{self.info.vocab_size - 1}).")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "xytune", "max_model_len": self.info.max_model_len,
                                            "vocab_size": self.info.vocab_size}]}

    async def completions(self, body: CompletionRequest, request: HTTPRequest):
        if (err := self.check_model(body)) is not None:
            return err
        try:
            given = body.prompts()
            prompts = [body.truncated(self.tokenizer.encode(p) if isinstance(p, str) else list(p)) for p in given]
            params = body.sampling_params(self.default_max_tokens, self.tokenizer)
            echo = None
            if body.echo:
                for ids in prompts:  # before decoding them for the echo: ids outside the vocabulary are a 400
                    self.info.validate_prompt(ids, params)
                echo = [p if isinstance(p, str) and not body.truncate_prompt_tokens else self.tokenizer.decode(ids)
                        for p, ids in zip(given, prompts)]
                params.prompt_logprobs = body.logprobs
                if body.max_tokens == 0:  # the engine samples one token, which is not shown
                    params.max_tokens, params.min_tokens = 1, 0
            return await self.respond(request, body, prompts, params, chat=False, echo=echo)
        except RequestError as exc:
            return _error(400, str(exc))
        except RequestFailed as exc:
            return _error(500, str(exc), "server_error")
        except RuntimeError as exc:  # the engine failed
            return _error(503, str(exc), "server_error")

    async def chat_completions(self, body: ChatCompletionRequest, request: HTTPRequest):
        if (err := self.check_model(body)) is not None:
            return err
        try:
            if body.max_completion_tokens is not None:
                body.max_tokens = body.max_completion_tokens
            messages = [m.model_dump() for m in body.messages]
            prompt = self.tokenizer.apply_chat_template(messages, body.add_generation_prompt,
                                                        body.continue_final_message, body.chat_template_kwargs)
            ids = body.truncated(self.tokenizer.encode(prompt, add_special_tokens=False))
            # as vLLM: the reply's role is the assistant's after a generation prompt, else the last message's
            role = "assistant" if body.add_generation_prompt else messages[-1]["role"]
            echo = [messages[-1]["content"]] if body.echo and messages[-1]["role"] == role else None
            params = body.sampling_params(self.default_max_tokens, self.tokenizer)
            return await self.respond(request, body, [ids], params, chat=True, echo=echo)
        except (RequestError, ValueError) as exc:
            return _error(400, str(exc))
        except RequestFailed as exc:
            return _error(500, str(exc), "server_error")
        except RuntimeError as exc:
            return _error(503, str(exc), "server_error")

    def check_model(self, body: SamplingFields | TokenizeRequest | DetokenizeRequest):
        if body.model not in (None, self.model_name):
            return _error(404, f"The model {body.model!r} does not exist; this server runs {self.model_name!r}.",
                          "not_found_error")
        if isinstance(body, SamplingFields) and len(self.warned) < MAX_WARNED_FIELDS \
                and (new := set(body.ignored_fields()) - self.warned):
            self.warned.update(new)
            log.warning("ignoring request fields this server does not use: %s", ", ".join(sorted(new)))
        return None

    async def respond(self, request: HTTPRequest, body: SamplingFields, prompts: list[list[int]],
                      params: SamplingParams, chat: bool, echo: list[str] | None = None):
        """One choice per prompt and sample: choice ``p * n + i`` is prompt ``p``'s ``i``-th (OpenAI's order).
        ``echo``: per prompt, the text shown before its choices' outputs (completions: the prompt; chat: the
        last message)."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        # n choices are n engine requests; with a seed, choice i samples with seed + i (reproducible, distinct)
        choice_params = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                         for i in range(body.n)]
        jobs = [(ids, p, None if echo is None else (echo[k], ids))
                for k, ids in enumerate(prompts) for p in choice_params]
        streams = self._submit(rid, jobs)
        score_only = echo is not None and body.max_tokens == 0
        texts = [ChoiceStream(self.tokenizer, p, self.eos_ids, shown, score_only, body.return_tokens_as_token_ids)
                 for _, p, shown in jobs]
        reply = _Reply(rid, self.model_name, chat, body, texts, [len(ids) for ids, _, _ in jobs], score_only)
        if not body.stream:
            return await reply.whole(self._updates(streams, request))
        return StreamingResponse(reply.stream(self._updates(streams, request)), media_type="text/event-stream")

    def _submit(self, rid: str, jobs: list) -> list[tuple[str, asyncio.Queue]]:
        """Start one engine request per job; if one cannot start, abort those that did."""
        streams = []
        try:
            for i, (ids, p, _) in enumerate(jobs):
                streams.append((f"{rid}-{i}", self.engine.submit(ids, p, f"{rid}-{i}")))
        except BaseException:
            for sub_id, _ in streams:
                self.engine.abort(sub_id)
            raise
        return streams

    async def _updates(self, streams: list[tuple[str, asyncio.Queue]], request: HTTPRequest):
        """Yield ``(choice index, update)`` until every request finishes; abort the rest if the client goes
        away (or stops reading) first."""
        pending = dict(enumerate(streams))
        getters: dict[int, asyncio.Future] = {}
        try:
            while pending:
                for i, (_, queue) in pending.items():
                    if i not in getters:
                        getters[i] = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(getters.values(), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if await request.is_disconnected():
                        return
                    continue
                for i in sorted(i for i, f in getters.items() if f in done):
                    u = getters.pop(i).result()
                    if isinstance(u, BaseException):
                        raise RuntimeError(f"engine failed: {u}")
                    if u.error is not None:  # this request failed alone; the engine serves the others on
                        raise RequestFailed(f"the engine failed this request: {u.error}")
                    if u.finished:
                        del pending[i]
                    yield i, u
        finally:
            for f in getters.values():
                f.cancel()
            for rid, _ in pending.values():
                self.engine.abort(rid)


@dataclasses.dataclass
class _Reply:
    """One HTTP request's choices as an OpenAI response: whole, or as server-sent event chunks."""

    rid: str
    model_name: str
    chat: bool
    body: SamplingFields
    texts: list[ChoiceStream]
    prompt_lens: list[int]
    score_only: bool

    def usage(self, last: dict[int, Update]) -> dict:
        """Totals over the choices; each prompt counts once (its ``n`` choices share it)."""
        updates = [last[i] for i in range(len(self.texts))]
        prompt = sum(u.num_prompt_tokens for u in updates[::self.body.n])
        completion = 0 if self.score_only else sum(len(u.token_ids) for u in updates)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(u.num_cached_tokens for u in updates[::self.body.n])}}

    async def whole(self, updates):
        last: dict[int, Update] = {}
        async for i, u in updates:
            last[i] = u
        if len(last) < len(self.texts) or not all(u.finished for u in last.values()):
            return _error(499, "client closed the request")
        choices = []
        for i, u in sorted(last.items()):
            final = self.texts[i].final_text(u)
            choice = {"index": i, "finish_reason": u.finish_reason, "logprobs": self.texts[i].logprobs(u, self.chat)}
            choice.update({"message": {"role": "assistant", "content": final}} if self.chat else {"text": final})
            choices.append(choice)
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices, "usage": self.usage(last)}

    def _chunk_data(self, choices: list) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices}

    def _chunk(self, choice: dict, usage: tuple[int, int]) -> str:
        """One event; with ``continuous_usage_stats`` (vLLM's) it carries the choice's usage so far."""
        data = self._chunk_data([choice])
        options = self.body.stream_options
        if options and options.include_usage and options.continuous_usage_stats:
            data["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                             "total_tokens": usage[0] + usage[1]}
        return f"data: {json.dumps(data)}\n\n"

    async def stream(self, updates):
        if self.chat:
            for i, prompt_len in enumerate(self.prompt_lens):
                head = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield self._chunk(head, (prompt_len, 0))
        last: dict[int, Update] = {}
        try:
            async for i, u in updates:
                last[i] = u
                if (chunk := self._delta_chunk(i, u)) is not None:
                    yield chunk
        except RuntimeError as exc:  # the engine failed mid-stream: say so in the stream (OpenAI clients raise)
            error = {"message": str(exc), "type": "server_error", "code": 500}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        options = self.body.stream_options
        if options and options.include_usage:  # as OpenAI: one more chunk, no choices
            data = {**self._chunk_data([]), "usage": self.usage(last)}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"

    def _delta_chunk(self, i: int, u: Update) -> str | None:
        """The chunk of choice ``i``'s new text (None when the update adds nothing to show)."""
        text = self.texts[i]
        delta = text.delta(u)
        logprobs = text.logprobs(u, self.chat)
        has_logprobs = logprobs is not None and (logprobs.get("content") or logprobs.get("tokens"))
        if not delta and not u.finished and not has_logprobs:
            return None
        choice = {"index": i, "finish_reason": u.finish_reason if u.finished else None, "logprobs": logprobs}
        choice.update({"delta": {"content": delta}} if self.chat else {"text": delta})
        return self._chunk(choice, (u.num_prompt_tokens, 0 if self.score_only else len(u.token_ids)))


class _DrainingServer(uvicorn.Server):
    """uvicorn finishes the requests in flight on SIGTERM or Ctrl-C, then raises the signal again, so a server
    stopped cleanly exits 143 (or 130), which process managers read as a crash. This one asks uvicorn for the
    same graceful shutdown and then returns: exit 0 after a clean drain. A second Ctrl-C still forces exit."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_http(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` until SIGTERM or Ctrl-C, then drain and return."""
    _DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
