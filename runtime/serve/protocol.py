"""The OpenAI-compatible API's wire format: the request bodies each endpoint accepts (pydantic, checked
once here) and the pieces of a choice's response (text deltas and log-probabilities).

Bad input fails validation with one sentence (the app turns it into a 400 with an OpenAI-style error body);
a field this server cannot honour is refused, not ignored; fields it does not know are accepted and unused.

The engine reports token ids and its text; per token (when asked) a log-probability and the top
alternatives. The completions API wants those as parallel lists keyed by token strings plus character
offsets, the chat API one object per token with its UTF-8 bytes. A token that holds only part of a UTF-8
character is named ``bytes:\\xNN...``, as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from ..engine.engine import RequestError
from ..engine.protocol import Update
from ..engine.sampling import MAX_LOGPROBS, SEED_RANGE, SamplingParams, text_token_ids
from ..model.tokenizer import Tokenizer

MAX_CHOICES = 16  # n: choices per prompt, each an engine request of its own
MAX_BATCH = 256  # prompts x n: engine requests one HTTP request may start
# vLLM's constrained-decoding fields: refused rather than ignored (the output would not follow them)
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


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
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
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


_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# the schema says what the server takes (non-empty prompts, token ids >= 0); validation keeps its own sentences
PROMPT_SCHEMA = WithJsonSchema({"title": "Prompt", "anyOf": [
    _TEXT, _IDS, {"type": "array", "items": _TEXT, "minItems": 1}, {"type": "array", "items": _IDS, "minItems": 1}]})


class CompletionRequest(SamplingFields):
    # one prompt, or several (a batch)
    prompt: Annotated[Union[str, list[int], list[str], list[list[int]]], PROMPT_SCHEMA]
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
    # a string, or content parts (text only), or none (read as ""; validated even when left out)
    content: Union[str, list[dict], None] = Field(default=None, validate_default=True)

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


# -- one choice's response: text deltas and logprobs --


def token_text(tokenizer: Tokenizer, token_id: int, as_id: bool = False) -> str:
    """The token's text, or with ``as_id`` vLLM's ``token_id:N`` (``return_tokens_as_token_ids``)."""
    if as_id:
        return f"token_id:{token_id}"
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list, text_offset: int = 0,
                        as_ids: bool = False) -> dict:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` for these tokens; offsets count
    characters of the completion from ``text_offset`` (where the previous stream chunk ended)."""
    tokens, offsets, pos = [], [], text_offset
    for t in token_ids:
        tokens.append(token_text(tokenizer, t, as_ids))
        offsets.append(pos)
        pos += len(tokenizer.token_bytes(t).decode("utf-8", errors="ignore"))
    tops = []
    for t, entry in zip(token_ids, entries):
        if entry is None:  # a prompt's first token: nothing before it to predict it
            tops.append(None)
            continue
        lp, alts = entry
        top = {token_text(tokenizer, a, as_ids): v for a, v in alts}
        top.setdefault(token_text(tokenizer, t, as_ids), lp)  # the scored token is always listed
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e[0] if e else None for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list, as_ids: bool = False) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...], "refusal": None}``."""

    def item(t: int, lp: float) -> dict:
        return {"token": token_text(tokenizer, t, as_ids), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))}

    content = [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in alts]}
               for t, (lp, alts) in zip(token_ids, entries)]
    return {"content": content, "refusal": None}


class ChoiceStream:
    """One choice's text deltas (the engine's text, which holds back what a stop string may still cut) and
    logprobs (each token's text as OpenAI names it).

    ``echo``: the prompt's text (and, with logprobs, its tokens' logprobs) comes
    first; ``score_only``: the one token the engine generated is not shown
    (``max_tokens: 0`` with echo scores the prompt alone).
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_ids: set[int],
                 echo: tuple[str, list[int]] | None = None, score_only: bool = False, token_ids_as_names: bool = False):
        self.tokenizer, self.params, self.eos_ids = tokenizer, params, eos_ids
        self.as_ids = token_ids_as_names  # logprobs name tokens ``token_id:N`` (vLLM's return_tokens_as_token_ids)
        self.echo, self.score_only = echo, score_only
        self.sent = ""
        self.logprobs_sent, self.offset = 0, 0  # logprob entries and their characters already streamed
        self.echoed = echo is None

    def shown_ids(self, u: Update) -> list[int]:
        """The output tokens the text stands for: all but a final EOS or stop token id."""
        if self.score_only:
            return []
        return text_token_ids(u.token_ids, u.finish_reason, self.params, self.eos_ids)

    def _prefix(self) -> str:
        return self.echo[0] if self.echo else ""

    def final_text(self, u: Update) -> str:
        return self._prefix() + ("" if self.score_only else u.text)

    def delta(self, u: Update) -> str:
        text = self.final_text(u)
        new = text[len(self.sent):] if text.startswith(self.sent) else ""  # sent text is never taken back
        self.sent += new
        return new

    def logprobs(self, u: Update, chat: bool) -> dict | None:
        """The OpenAI logprobs object for what is not yet sent (None when not asked for): with echo, the
        prompt's tokens first (once the engine has scored them), then the shown output tokens."""
        if u.logprobs is None:
            return None
        ids = self.shown_ids(u)
        start, end = self.logprobs_sent, min(len(ids), len(u.logprobs))
        self.logprobs_sent = max(start, end)
        if chat:
            return chat_logprobs(self.tokenizer, ids[start:end], u.logprobs[start:end], self.as_ids)
        parts = []
        if not self.echoed and u.prompt_logprobs is not None:
            self.echoed = True
            text, prompt_ids = self.echo
            parts.append(completion_logprobs(self.tokenizer, prompt_ids, u.prompt_logprobs, 0, self.as_ids))
            self.offset = len(text)
        if not self.echoed:  # the prompt's logprobs come first: hold the output's until they are here
            self.logprobs_sent = start
            return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        out = completion_logprobs(self.tokenizer, ids[start:end], u.logprobs[start:end], self.offset, self.as_ids)
        if out["tokens"]:
            last = ids[end - 1]
            self.offset = out["text_offset"][-1] + len(self.tokenizer.token_bytes(last).decode("utf-8", "ignore"))
        parts.append(out)
        return {k: [x for part in parts for x in part[k]] for k in out}
