"""llama.cpp with edgellm's GGUF tokenizes exactly like the Hugging Face tokenizer.

The corpus is >= 200 strings: prose, code, numbers, unicode scripts, emoji (incl. ZWJ
sequences), whitespace runs, control characters and the chat special tokens.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from tokenizers import Tokenizer

import edgellm
from edgellm.runtimes.base import RuntimeOptions, open_runtime

BASE = [
    "Hello world", "hello world", "HELLO WORLD", " leading space", "trailing space ", "  two leading",
    "The quick brown fox jumps over the lazy dog.", "I've been 'told' he's there, 'RE you sure?",
    "don't won't can't shouldn't y'all", "e-mail: someone@example.com", "https://example.org/a?b=c&d=e",
    "3", "33", "333", "3333", "33333", "3.14159", "1,000,000", "-42", "+1 (555) 010-9999", "0x1F", "1e-9",
    "2024-11-25T18:23:00Z", "v1.2.3-rc.1", "50%", "$19.99", "€5", "¥1000",
    "def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)", "if (a && b) { return c; }",
    "#include <stdio.h>\nint main(void) { return 0; }", "SELECT * FROM t WHERE id = 1;",
    "<html><body><p>Hi</p></body></html>", '{"key": [1, 2, 3], "nested": {"a": null}}',
    "x = [i**2 for i in range(5)]  # squares", "fn main() { println!(\"hi\"); }", "a\tb\tc",
    "line1\nline2\r\nline3",
    "\n", "\n\n", "\n\n\n", " \n", "\t", "\t\t", "   ", "          ", " \t \n \r ", "\u00a0nbsp",
    "naïve café résumé", "Straße", "Ελληνικά", "русский текст", "нещо на Български", "עברית", "العربية",
    "हिन्दी", "ภาษาไทย", "日本語のテキスト", "中文文本测试", "한국어 텍스트", "我想在apple工作1314151天～",
    "កាន់តែពិសេសអាច", "Tiếng Việt có dấu", "Ægir Øre Åse", "İstanbul ığdır", "ſ ß ẞ",
    "🚀", "🦙🦙", "😶‍🌫️", "👩‍👩‍👧‍👦", "🇫🇷🇩🇪", "✅ done", "❤️", "👍🏽", "(normal) 😁 ?",
    "------=======", "''''''```````\"\"\"\"......!!!!!!??????", "...", "!!!", "???", "~~~", "___", "***",
    "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b",
    "<|im_start|><|im_end|>", "text <|endoftext|> more", "<not_special>", "< |im_start| >",
    "\x00", "\x07bell", "zero\u200bwidth", "combining e\u0301", "ﬁ ligature", "Ⅻ roman", "½ ¼ ¾",
    "a" * 50, "ab" * 40, " " * 33, "\n" * 17, "😀" * 10, "1234567890" * 5,
]


def corpus() -> list[str]:
    extra = [f"{a} {b}" for a, b in itertools.islice(itertools.product(BASE[:40], BASE[60:90]), 120)]
    strings = BASE + extra
    assert len(strings) >= 200
    return strings


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_converted) -> Path:
    return smollm2_converted("gguf", "F16").model_file


def _compare(gguf_file: Path, tokenizer_json: Path) -> list[tuple[str, list[int], list[int]]]:
    hf = Tokenizer.from_file(str(tokenizer_json))
    runtime = open_runtime(gguf_file, "gguf", RuntimeOptions(n_ctx=64))
    try:
        mismatches = []
        for text in corpus():
            want = hf.encode(text, add_special_tokens=False).ids
            got = runtime.tokenizer.encode(text, add_special=False, parse_special=True)
            if got != want:
                mismatches.append((text, want, got))
        return mismatches
    finally:
        runtime.close()


def test_smollm2_tokenizes_like_hf(smollm2_f16: Path, smollm2_hf: Path) -> None:
    assert _compare(smollm2_f16, smollm2_hf / "tokenizer.json") == []


def test_tiny_tokenizer_tokenizes_like_hf(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("qwen3")
    gguf = edgellm.convert(src, tmp_path / "q", quant="F16", verify=False).model_file
    assert _compare(gguf, src / "tokenizer.json") == []


def test_detokenize_round_trip(smollm2_f16: Path, smollm2_hf: Path) -> None:
    hf = Tokenizer.from_file(str(smollm2_hf / "tokenizer.json"))
    with edgellm.load(smollm2_f16, n_ctx=64) as model:
        for text in corpus():
            ids = hf.encode(text, add_special_tokens=False).ids
            assert model.detokenize(ids) == hf.decode(ids, skip_special_tokens=False), text
