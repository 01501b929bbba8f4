"""Incremental detokenization never shows a broken character."""

from __future__ import annotations

import pytest

from edgellm.runtimes.fake import FakeTokenizer
from edgellm.text.detok import StreamDecoder

TEXTS = ["日本語のテキスト", "emoji 🙂👍🏽 and flags 🇫🇷", "café naïve Ωμέγα", "mixed 中文 🙂 text\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokens_never_emit_broken_text(text: str) -> None:
    tok = FakeTokenizer()  # one token per byte: every multi-byte character is split
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in tok.encode(text, add_special=False)]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    for p in pieces:
        p.encode("utf-8")  # no lone surrogates either


def test_character_appears_with_its_last_byte() -> None:
    tok = FakeTokenizer()
    dec = StreamDecoder(tok)
    assert [dec.feed(b) for b in "🙂".encode()] == ["", "", "", "🙂"]
    assert [dec.feed(b) for b in "aé".encode()] == ["a", "", "é"]


def test_hf_bytelevel_tokens_split_characters(tmp_path) -> None:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from edgellm.text.tokenizer import HFTokenizer

    raw = HFTok(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    raw.train_from_iterator(["plain ascii words only, nothing else"] * 20, trainer)
    tok = HFTokenizer(raw)
    text = "日本語 🙂 café"
    ids = tok.encode(text, add_special=False)
    naive = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in naive)  # per-token decoding would break characters
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_flush_replaces_an_unfinished_character() -> None:
    tok = FakeTokenizer()
    dec = StreamDecoder(tok)
    assert dec.feed(ord("a")) == "a"
    assert dec.feed(0xF0) == "" and dec.feed(0x9F) == ""  # first half of an emoji
    assert dec.flush() == "\ufffd"
    assert dec.feed(ord("b")) == "b"  # usable again after flush


def test_invalid_byte_is_replaced_not_held() -> None:
    tok = FakeTokenizer()
    dec = StreamDecoder(tok)
    assert dec.feed(0xFF) == "\ufffd"  # can never start a character
    assert dec.feed(ord("x")) == "x"


def test_special_tokens_skipped_by_default() -> None:
    tok = FakeTokenizer()
    ids = tok.encode("<|im_start|>hi<|im_end|>", add_special=False)
    assert "".join(StreamDecoder(tok).feed(i) for i in ids) == "hi"
    keep = StreamDecoder(tok, skip_special=False)
    assert "".join(keep.feed(i) for i in ids) == "<|im_start|>hi<|im_end|>"


def test_strip_leading_space_only_once() -> None:
    tok = FakeTokenizer()
    dec = StreamDecoder(tok, strip_leading_space=True)
    assert [dec.feed(b) for b in b" a b"] == ["", "a", " ", "b"]
