"""OpenAI-compatible HTTP server (FastAPI): /v1/completions, /v1/chat/completions, /v1/models, /health.

Requests are validated with pydantic (bad input is a 400 with an OpenAI-style
error body), run on the AsyncEngine, and answered whole or streamed as
server-sent events. A client that disconnects mid-stream has its request
aborted, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from xytune.runtime.async_engine import AsyncEngine, Update
from xytune.runtime.engine import RequestError
from xytune.runtime.openai_output import ChoiceStream
from xytune.runtime.sampling import MAX_LOGPROBS, SamplingParams
from xytune.runtime.tokenizer import Tokenizer

MAX_CHOICES = 16  # n: choices per prompt, each an engine request of its own
MAX_BATCH = 256  # prompts x n: engine requests one HTTP request may start
# vLLM's constrained-decoding fields: refused rather than ignored (the output would not follow them)
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
log = logging.getLogger("xytune.server")


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with empty choices and the request's usage
    # vLLM's extension: with include_usage, every chunk also carries its choice's usage so far
    continuous_usage_stats: bool = False


class SamplingFields(BaseModel):
    """OpenAI sampling fields plus vLLM's extras (top_k, seed, ignore_eos, min_tokens, stop_token_ids,
    repetition_penalty)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    logit_bias: dict[int, float] | None = None  # JSON keys are strings; pydantic reads them as token ids
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)  # keep only the prompt's last this many
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    use_beam_search: bool = False
    prompt_logprobs: int | None = None

    @model_validator(mode="after")
    def _fields_served(self):
        """Checks shared by completions and chat (each adds its own)."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        if self.use_beam_search:
            raise ValueError("use_beam_search is not supported (greedy and sampling only)")
        if self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported; send echo with logprobs to /v1/completions")
        guided = [k for k in GUIDED_FIELDS if (self.model_extra or {}).get(k) is not None]
        if guided:
            raise ValueError(f"{guided[0]} is not supported (no constrained decoding)")
        return self

    def bad_words_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        """Each bad word as tokens, alone and after a space (BPE spells a word differently there), as vLLM."""
        seqs = []
        for word in self.bad_words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs

    def truncated(self, prompt_ids: list[int]) -> list[int]:
        """The prompt cut to its last ``truncate_prompt_tokens`` tokens (vLLM's option), or whole."""
        return prompt_ids[-self.truncate_prompt_tokens:] if self.truncate_prompt_tokens else prompt_ids

    def ignored_fields(self) -> list[str]:
        """Fields this server does not know (OpenAI's metadata, other servers' extensions): accepted, unused."""
        return sorted(self.model_extra or {})

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v and any(not -100 <= b <= 100 for b in v.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        return v

    def num_logprobs(self) -> int | None:
        """How many top alternatives per token the client asked for (None: no logprobs)."""
        return None

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, v):
        if v and any(not w.strip() for w in v):
            raise ValueError("bad_words must be non-blank strings")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops) or len(stops) > 4:
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def sampling_params(self, default_max: int, tokenizer: Tokenizer) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=self.max_tokens or default_max, temperature=self.temperature, top_k=self.top_k,
                top_p=self.top_p, min_p=self.min_p, seed=self.seed, stop=list(self.stop or []),
                stop_token_ids=list(self.stop_token_ids or []),
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens, ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                logit_bias=dict(self.logit_bias or {}), logprobs=self.num_logprobs(),
                allowed_token_ids=None if self.allowed_token_ids is None else list(self.allowed_token_ids),
                bad_words_ids=self.bad_words_ids(tokenizer))
        except ValueError as exc:
            raise RequestError(str(exc)) from None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]  # one prompt, or several (a batch)
    max_tokens: int | None = Field(default=16, ge=0)  # 0: with echo, score the prompt and generate nothing
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        if len(self.prompts()) * self.n > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} choices per request (prompts x n)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo (scoring the prompt alone)")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of must equal n (completions are not ranked)")
        if self.suffix:
            raise ValueError("suffix is not supported (no fill-in-the-middle)")
        return self

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: a string or a token list is one prompt."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None  # a string, or content parts (text only), or none

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        """Text parts join with newlines (as vLLM does); any other part (an image, audio) is refused."""
        if isinstance(v, list):
            kinds = {p.get("type") for p in v}
            if kinds - {"text"}:
                raise ValueError(f"only text content parts are supported, not {sorted(map(str, kinds - {'text'}))}")
            return "\n".join(TextPart(**p).text for p in v)
        return v or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    functions: list | None = None  # OpenAI's older form of tools
    response_format: dict | None = None
    # vLLM's chat extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # carry the last (assistant) message on instead of starting a new one
    echo: bool = False  # the reply starts with the last message's text when that message has the reply's role
    chat_template_kwargs: dict | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools or self.functions:
            raise ValueError(f"{'tools' if self.tools else 'functions'} are not supported (this server parses no "
                             "tool calls)")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported (no constrained decoding)")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # for messages, as in chat completions
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def build_app(engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
              default_max_tokens: int = 256) -> FastAPI:
    app = FastAPI(title="xytune", version="0.1.0")
    created = int(time.time())
    info = engine.info
    eos_ids = set(info.eos_ids)

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

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return _error(503, f"engine failed: {engine.error}", "server_error")
        snap = engine.snapshot()
        return {"status": "ok", "kv_blocks_free": snap["kv_blocks_free"], "kv_blocks_total": snap["kv_blocks_total"],
                "requests_active": engine.num_active}

    @app.get("/metrics")
    async def metrics():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST

        if engine.metrics is None:
            return _error(404, "metrics are off")
        return Response(engine.metrics.render(engine.snapshot()), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (err := check_model(body)) is not None:
            return err
        try:
            if body.messages is not None:
                text = tokenizer.apply_chat_template([m.model_dump() for m in body.messages],
                                                     body.add_generation_prompt, body.continue_final_message,
                                                     body.chat_template_kwargs)
                ids = tokenizer.encode(text, add_special_tokens=False)  # the template adds its own
            else:
                ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as exc:
            return _error(400, str(exc))
        return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if (err := check_model(body)) is not None:
            return err
        bad = [t for t in body.tokens if not 0 <= t < info.vocab_size]
        if bad:
            return _error(400, f"Token id {bad[0]} is outside the vocabulary (0..{info.vocab_size - 1}).")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "xytune", "max_model_len": info.max_model_len,
                                            "vocab_size": info.vocab_size}]}

    warned: set[str] = set()  # ignored request fields already logged (once each, not per request)

    def check_model(body: SamplingFields | TokenizeRequest | DetokenizeRequest):
        if body.model not in (None, model_name):
            return _error(404, f"The model {body.model!r} does not exist; this server runs {model_name!r}.",
                          "not_found_error")
        if isinstance(body, SamplingFields) and (new := set(body.ignored_fields()) - warned):
            warned.update(new)
            log.warning("ignoring request fields this server does not use: %s", ", ".join(sorted(new)))
        return None

    async def updates(streams: list[tuple[str, asyncio.Queue]], request: HTTPRequest):
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
                    if u.finished:
                        del pending[i]
                    yield i, u
        finally:
            for f in getters.values():
                f.cancel()
            for rid, _ in pending.values():
                engine.abort(rid)

    def usage(last: list[Update], n: int, score_only: bool = False) -> dict:
        """Totals over the choices; each prompt counts once (its ``n`` choices share it)."""
        prompt = sum(u.num_prompt_tokens for u in last[::n])
        completion = 0 if score_only else sum(len(u.token_ids) for u in last)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(u.num_cached_tokens for u in last[::n])}}

    async def respond(request: HTTPRequest, body: SamplingFields, prompts: list[list[int]], params: SamplingParams,
                      chat: bool, echo: list[str] | None = None):
        """One choice per prompt and sample: choice ``p * n + i`` is prompt ``p``'s ``i``-th (OpenAI's order).
        ``echo``: per prompt, the text shown before its choices' outputs (completions: the prompt; chat: the
        last message)."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        # n choices are n engine requests; with a seed, choice i samples with seed + i (reproducible, distinct)
        choice_params = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                         for i in range(body.n)]
        jobs = [(ids, p, None if echo is None else (echo[k], ids))
                for k, ids in enumerate(prompts) for p in choice_params]
        streams = []
        try:
            for i, (ids, p, _) in enumerate(jobs):
                streams.append((f"{rid}-{i}", engine.submit(ids, p, f"{rid}-{i}")))
        except BaseException:
            for sub_id, _ in streams:
                engine.abort(sub_id)
            raise
        score_only = echo is not None and body.max_tokens == 0
        texts = [ChoiceStream(tokenizer, p, eos_ids, shown, score_only, body.return_tokens_as_token_ids)
                 for _, p, shown in jobs]
        total = len(jobs)
        kind = "chat.completion" if chat else "text_completion"
        if not body.stream:
            last: dict[int, Update] = {}
            async for i, u in updates(streams, request):
                last[i] = u
            if len(last) < total or not all(u.finished for u in last.values()):
                return _error(499, "client closed the request")
            choices = []
            for i, u in sorted(last.items()):
                final = texts[i].final_text(u)
                choice = {"index": i, "finish_reason": u.finish_reason, "logprobs": texts[i].logprobs(u, chat)}
                choice.update({"message": {"role": "assistant", "content": final}} if chat else {"text": final})
                choices.append(choice)
            return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name,
                    "choices": choices, "usage": usage([last[i] for i in range(total)], body.n, score_only)}

        async def sse():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            options = body.stream_options
            continuous = bool(options and options.include_usage and options.continuous_usage_stats)

            def chunk(choice: dict, prompt_tokens: int, completion_tokens: int) -> str:
                data = _chunk(rid, chunk_kind, model_name, choice)
                if continuous:
                    data["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens}
                return f"data: {json.dumps(data)}\n\n"

            if chat:
                for i in range(total):
                    head = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield chunk(head, len(jobs[i][0]), 0)
            last: dict[int, Update] = {}
            try:
                async for i, u in updates(streams, request):
                    last[i] = u
                    text = texts[i]
                    delta = text.delta(u)
                    logprobs = text.logprobs(u, chat)
                    has_logprobs = logprobs is not None and (logprobs.get("content") or logprobs.get("tokens"))
                    if not delta and not u.finished and not has_logprobs:
                        continue
                    piece = {"content": delta} if chat else None
                    choice = {"index": i, "finish_reason": u.finish_reason if u.finished else None,
                              "logprobs": logprobs}
                    choice.update({"delta": piece} if chat else {"text": delta})
                    yield chunk(choice, u.num_prompt_tokens, 0 if score_only else len(u.token_ids))
            except RuntimeError as exc:  # the engine failed mid-stream: say so in the stream (OpenAI clients raise)
                error = {"message": str(exc), "type": "server_error", "code": 500}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            if options and options.include_usage:  # as OpenAI: one more chunk, no choices
                data = {**_chunk(rid, chunk_kind, model_name, None), "choices": [],
                        "usage": usage([last[k] for k in range(total)], body.n, score_only)}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        if (err := check_model(body)) is not None:
            return err
        try:
            given = body.prompts()
            prompts = [body.truncated(tokenizer.encode(p) if isinstance(p, str) else list(p)) for p in given]
            params = body.sampling_params(default_max_tokens, tokenizer)
            echo = None
            if body.echo:
                echo = [p if isinstance(p, str) and not body.truncate_prompt_tokens else tokenizer.decode(ids)
                        for p, ids in zip(given, prompts)]
                params.prompt_logprobs = body.logprobs
                if body.max_tokens == 0:  # the engine samples one token, which is not shown
                    params.max_tokens, params.min_tokens = 1, 0
            return await respond(request, body, prompts, params, chat=False, echo=echo)
        except RequestError as exc:
            return _error(400, str(exc))
        except RuntimeError as exc:  # the engine failed
            return _error(503, str(exc), "server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        if (err := check_model(body)) is not None:
            return err
        try:
            if body.max_completion_tokens is not None:
                body.max_tokens = body.max_completion_tokens
            messages = [m.model_dump() for m in body.messages]
            prompt = tokenizer.apply_chat_template(messages, body.add_generation_prompt, body.continue_final_message,
                                                   body.chat_template_kwargs)
            ids = body.truncated(tokenizer.encode(prompt, add_special_tokens=False))
            # as vLLM: the reply's role is the assistant's after a generation prompt, else the last message's
            role = "assistant" if body.add_generation_prompt else messages[-1]["role"]
            echo = [messages[-1]["content"]] if body.echo and messages[-1]["role"] == role else None
            return await respond(request, body, [ids], body.sampling_params(default_max_tokens, tokenizer), chat=True,
                                 echo=echo)
        except (RequestError, ValueError) as exc:
            return _error(400, str(exc))
        except RuntimeError as exc:
            return _error(503, str(exc), "server_error")

    return app


def _chunk(rid: str, kind: str, model: str, choice: dict) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
