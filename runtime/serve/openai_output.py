"""One choice's output as OpenAI clients read it: text deltas and log-probabilities.

The engine reports token ids, and per token (when asked) its log-probability
and the top alternatives. Clients read text: the completions API wants
parallel lists keyed by token strings plus character offsets, the chat API
one object per token with its UTF-8 bytes. A token that holds only part of a
UTF-8 character is named ``bytes:\\xNN...``, as OpenAI does. ``ChoiceStream``
keeps what one choice has sent so far, so a stream never takes text back.
"""

from __future__ import annotations

from ..engine.protocol import Update
from ..engine.sampling import SamplingParams, text_token_ids
from ..model.tokenizer import IncrementalDetokenizer, Tokenizer


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
    """Turns a choice's growing token list into text deltas and logprobs, holding back what may change.

    Held back: a trailing partial UTF-8 character, and while stop strings are
    set, as many trailing characters as a stop string could still need.
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
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.logprobs_sent, self.offset = 0, 0  # logprob entries and their characters already streamed
        self.echoed = echo is None
        self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)

    def shown_ids(self, u: Update) -> list[int]:
        """The output tokens the text stands for: all but a final EOS or stop token id."""
        if self.score_only:
            return []
        return text_token_ids(u.token_ids, u.finish_reason, self.params, self.eos_ids)

    def _prefix(self) -> str:
        return self.echo[0] if self.echo else ""

    def final_text(self, u: Update) -> str:
        if self.score_only:
            return self._prefix()
        if u.stop_text is not None:
            return self._prefix() + u.stop_text
        return self._prefix() + self.tokenizer.decode(self.shown_ids(u), self.params.skip_special_tokens)

    def delta(self, u: Update) -> str:
        if u.finished:
            text = self.final_text(u)
        elif self.score_only:
            text = self._prefix()
        else:
            text = self.detokenizer.update(u.token_ids)
            text = self._prefix() + (text[: len(text) - self.hold] if self.hold else text)
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
