"""Incremental detokenization: at every length the text is a prefix of a full decode, and equals it whenever
the tokens end on a whole character (a token that ends inside a UTF-8 character waits, whole, for the rest),
for byte-level BPE (SmolLM2's tokenizer, token ids that split characters included) and for a
SentencePiece-style decoder that drops the leading space of a sequence."""

from __future__ import annotations

import pytest
from conftest import require_default_model
from hypothesis import given, settings
from hypothesis import strategies as st

from xytune.runtime.model.tokenizer import IncrementalDetokenizer, OutputText, Tokenizer

TEXT = ("naïve café 😀 日本語のテキスト, the quick brown fox jumps over the lazy dog; "
        "Ünïcödé ∑ x² — «quotes» and emoji 🚀🔥 mixed in.")


def _check_every_prefix(tok: Tokenizer, ids: list[int]) -> None:
    inc = IncrementalDetokenizer(tok)
    for n in range(1, len(ids) + 1):
        text, full = inc.update(ids[:n]), tok.decode(ids[:n])
        assert full.startswith(text), (ids[:n], text, full)
        if not full.endswith("\ufffd"):
            assert text == full, (ids[:n], text, full)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    from xytune.runtime.model.loader import load_checkpoint

    require_default_model()
    return load_checkpoint("smollm2-135m")[2]


def test_byte_level_text_streams_exactly(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(smollm2_tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # some split a character
    _check_every_prefix(smollm2_tokenizer, ids)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 49151), min_size=1, max_size=40))
def test_byte_level_random_ids_stream_exactly(smollm2_tokenizer, ids):
    _check_every_prefix(smollm2_tokenizer, ids)


def test_sentencepiece_style_leading_space_streams_exactly():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator([TEXT] * 10, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    tok = Tokenizer(hf)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT and tok.decode(ids[1:2]) != tok.decode(ids[:2])[len(tok.decode(ids[:1])):]
    _check_every_prefix(tok, ids)


def _stream(out: OutputText, ids: list[int], may_stop_from: int = 0) -> tuple[list[str], bool]:
    shown, stopped = [], False
    for n in range(1, len(ids) + 1):
        stopped = out.add(ids[:n], may_stop=n >= may_stop_from)
        shown.append(out.shown)
        if stopped:
            break
    if not stopped:
        out.finish(ids)
        shown.append(out.shown)
    return shown, stopped


@settings(max_examples=40, deadline=None)
@given(st.integers(0, len(TEXT) - 6), st.integers(1, 6), st.booleans())
def test_output_text_cuts_at_the_first_stop_string_and_never_takes_text_back(smollm2_tokenizer, at, length,
                                                                             include):
    ids = smollm2_tokenizer.encode(TEXT, add_special_tokens=False)
    stop = TEXT[at: at + length]
    shown, stopped = _stream(OutputText(smollm2_tokenizer, stop=(stop, "never appears"), include_stop=include), ids)
    first = TEXT.find(stop)
    assert stopped and shown[-1] == TEXT[: first + len(stop) if include else first]
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:]))


def test_output_text_without_stop_strings_is_the_full_decode(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(TEXT, add_special_tokens=False)
    shown, stopped = _stream(OutputText(smollm2_tokenizer), ids)
    assert not stopped and shown[-1] == TEXT
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:]))


def test_a_stop_string_complete_before_min_tokens_is_not_matched_later(smollm2_tokenizer):
    """vLLM's rule: stop strings are searched in the text that arrives once the request may stop."""
    ids = smollm2_tokenizer.encode("fox one fox two", add_special_tokens=False)
    n_first_fox = next(n for n in range(1, len(ids) + 1) if "fox" in smollm2_tokenizer.decode(ids[:n]))
    shown, stopped = _stream(OutputText(smollm2_tokenizer, stop=("fox",)), ids, may_stop_from=n_first_fox + 1)
    assert stopped and shown[-1] == "fox one "
    shown, stopped = _stream(OutputText(smollm2_tokenizer, stop=("fox",)), ids)
    assert stopped and shown[-1] == ""
