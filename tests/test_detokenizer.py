"""Incremental detokenization: at every length the text is a prefix of a full decode, and equals it whenever
the tokens end on a whole character (a token that ends inside a UTF-8 character waits, whole, for the rest),
for byte-level BPE (SmolLM2's tokenizer, token ids that split characters included) and for a
SentencePiece-style decoder that drops the leading space of a sequence."""

from __future__ import annotations

import pytest
from conftest import require_default_model
from hypothesis import given, settings
from hypothesis import strategies as st

from xytune.runtime.model.tokenizer import IncrementalDetokenizer, Tokenizer

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
