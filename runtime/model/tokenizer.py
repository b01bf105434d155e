"""Tokenizer: Hugging Face ``tokenizers`` built from tokenizer.json or from GGUF metadata, plus chat templates."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from xytune.model_config import ModelLoadError

# Pre-tokenizer split patterns of the BPE families llama.cpp names in tokenizer.ggml.pre.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf_tokenizer(reader) -> tuple[HFTokenizer, dict]:
    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer type {kind!r} is not supported; put a tokenizer.json beside the model.")
    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = field("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt2", "smollm"))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = field("tokenizer.ggml.token_type", [])
    specials = [tokens[i] for i, t in enumerate(types) if t in (3, 4)]  # CONTROL, USER_DEFINED

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    info = {
        "chat_template": field("tokenizer.chat_template"),
        "bos_token": tokens[field("tokenizer.ggml.bos_token_id")] if field("tokenizer.ggml.bos_token_id") is not None else None,
        "eos_token": tokens[field("tokenizer.ggml.eos_token_id")] if field("tokenizer.ggml.eos_token_id") is not None else None,
        "add_bos": bool(field("tokenizer.ggml.add_bos_token", False)),
    }
    return tok, info


def _folder_info(folder: Path) -> dict:
    info: dict = {"add_bos": False}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())

        def text(tok):
            return tok.get("content") if isinstance(tok, dict) else tok

        info.update(chat_template=cfg.get("chat_template"), bos_token=text(cfg.get("bos_token")),
                    eos_token=text(cfg.get("eos_token")), add_bos=bool(cfg.get("add_bos_token", False)))
    template = folder / "chat_template.jinja"
    if template.is_file():
        info["chat_template"] = template.read_text()
    return info


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's scheme: printable
    Latin-1 bytes stand for themselves, the other 68 bytes take the characters from U+0100 on, in order)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(0x100 + i): b for i, b in enumerate(others)}}


class Tokenizer:
    """Encode/decode and the model's chat template."""

    def __init__(self, tok: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, add_bos: bool = False):
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None

    @classmethod
    def from_file(cls, path: Path, info: dict | None = None) -> "Tokenizer":
        return cls(HFTokenizer.from_file(str(path)), **(info or {}))

    @classmethod
    def from_gguf(cls, reader, folder: Path | None = None) -> "Tokenizer":
        if folder is not None and (folder / "tokenizer.json").is_file():
            return cls.from_file(folder / "tokenizer.json", _folder_info(folder))
        tok, info = _gguf_tokenizer(reader)
        return cls(tok, **info)

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json.")
        return cls.from_file(path, _folder_info(folder))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a byte-level BPE token may hold part of a UTF-8 character,
        which ``decode`` would turn into U+FFFD)."""
        piece = self._tok.id_to_token(token_id)
        if piece is not None and isinstance(self._tok.decoder, decoders.ByteLevel):
            table = _byte_level_table()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, template_kwargs: dict | None = None) -> str:
        """Render ``messages`` with the model's own Jinja chat template.

        ``continue_final_message`` (vLLM's and transformers' option): the text stops where the last
        message's content ends, with no end-of-turn after it, so the model carries that message on (a
        prefilled assistant answer). ``template_kwargs``: extra variables for the template.
        """
        if not self.chat_template:
            raise ModelLoadError("This model has no chat template; send a plain prompt instead.")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if continue_final_message and not messages:
            raise ValueError("continue_final_message needs a final message to continue; messages is empty")
        reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"} & set(template_kwargs or {})
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {sorted(reserved)}")

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            text = env.from_string(self.chat_template).render(
                **(template_kwargs or {}), messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except (TemplateError, TypeError, IndexError, KeyError, AttributeError) as exc:
            # the template's own checks, and messages it cannot render (a tool turn it does not expect, a null
            # content it concatenates): the request's fault, one line, never a traceback
            raise ValueError(f"chat template error: {exc}") from None
        if continue_final_message:
            final = messages[-1].get("content") or ""
            for piece in (final, final.strip()):  # templates often strip the content
                if piece and piece in text:
                    return text[: text.rindex(piece) + len(piece)]
            raise ValueError("continue_final_message: the chat template does not show the final message's text, "
                             "so it cannot be continued")
        return text


class IncrementalDetokenizer:
    """The text of a growing token list, decoding a few tokens per update instead of the whole list.

    A stream that decodes its whole output at every step costs quadratic time in the output length. Here
    each update decodes the tokens since ``prefix`` twice, with and without those after ``read``; the
    difference is the new text. Starting a few tokens back keeps decoders whose output depends on context
    (SentencePiece drops the leading space of a sequence's first word) right, and text that ends in U+FFFD
    (part of a UTF-8 character) waits, whole, for the rest. ``text`` is a prefix of ``decode(ids)``, and
    equals it whenever the tokens end on a whole character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.text, self.prefix, self.read = tokenizer, "", 0, 0
        self.skip = skip_special_tokens

    def update(self, ids: list[int]) -> str:
        if len(ids) > self.read:
            before = self.tokenizer.decode(ids[self.prefix: self.read], self.skip)
            after = self.tokenizer.decode(ids[self.prefix:], self.skip)
            if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(ids)
            elif not after.startswith(before):  # a decoder that rewrote the window: decode all, once
                self.text = self.tokenizer.decode(ids, self.skip).rstrip("\ufffd")
                self.prefix, self.read = max(0, len(ids) - 4), len(ids)
        return self.text


class OutputText:
    """A request's output text, made once, as its tokens arrive: the engine cuts it at stop strings and every
    client (HTTP stream, whole response, ``LLM.generate``) reads it from here.

    ``shown`` only grows: while the request runs it leaves out as many trailing characters as a stop string
    could still need (and a trailing partial UTF-8 character), so a stream never has to take text back. At
    the end it is the full decode of the tokens the text stands for, or the text up to the stop string.
    Stop strings are searched only in text that arrived while the request was allowed to stop
    (``min_tokens`` reached), as vLLM does.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, stop: tuple[str, ...] = (),
                 include_stop: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop, self.include_stop = tuple(stop), include_stop
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.searched = 0  # characters of the decoded text already searched (or not eligible) for stop strings
        self.shown = ""
        self.stopped = False  # a stop string ended the text

    def add(self, ids: list[int], may_stop: bool = True) -> bool:
        """Decode ``ids`` (the output so far) incrementally; True when a stop string just completed, and the
        text then ends at it. ``may_stop`` False: ``min_tokens`` is not yet reached."""
        text = self.detokenizer.update(ids)
        if may_stop and self.stop:
            start = max(0, self.searched - self.hold)  # a stop string may straddle old and new text
            hits = [(at, len(s)) for s in self.stop if (at := text.find(s, start)) >= 0]
            if hits:
                at, length = min(hits)
                self._show(text[: at + length] if self.include_stop else text[:at])
                self.stopped = True
                return True
        self.searched = len(text)
        self._show(text[: max(0, len(text) - self.hold)])
        return False

    def finish(self, ids: list[int]) -> None:
        """The request ended without a stop string: its text is the full decode of ``ids``."""
        self._show(self.tokenizer.decode(ids, self.skip))

    def _show(self, text: str) -> None:
        if text.startswith(self.shown):  # text already shown is never taken back
            self.shown = text
