"""The engine's per-token log-probabilities in OpenAI's two layouts (legacy completions, chat).

The engine records, for each sampled token, its log-probability and the top
alternatives (token id, log-probability). Clients read them as text: the
completions API wants parallel lists keyed by token strings plus character
offsets; the chat API wants one object per token with its UTF-8 bytes. A
token that holds only part of a UTF-8 character is named ``bytes:\\xNN...``,
as OpenAI does.
"""

from __future__ import annotations

from xytune.runtime.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list, text_offset: int = 0) -> dict:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` for these tokens; offsets count
    characters of the completion from ``text_offset`` (where the previous stream chunk ended)."""
    tokens, offsets, pos = [], [], text_offset
    for t in token_ids:
        tokens.append(token_text(tokenizer, t))
        offsets.append(pos)
        pos += len(tokenizer.token_bytes(t).decode("utf-8", errors="ignore"))
    tops = []
    for t, (lp, alts) in zip(token_ids, entries):
        top = {token_text(tokenizer, a): v for a, v in alts}
        top.setdefault(token_text(tokenizer, t), lp)  # the sampled token is always listed
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...], "refusal": None}``."""

    def item(t: int, lp: float) -> dict:
        return {"token": token_text(tokenizer, t), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))}

    content = [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in alts]}
               for t, (lp, alts) in zip(token_ids, entries)]
    return {"content": content, "refusal": None}
