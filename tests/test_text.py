"""Tokenizer (HF tokenizer.json read with `tokenizers` only) and sandboxed chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.errors import InvalidInputError, InvalidModelError, ModelNotFoundError
from edgellm.text.chat import DEFAULT_CHATML, render_chat
from edgellm.text.tokenizer import HFTokenizer, Tokenizer, bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["hello world, the quick brown fox jumps over the lazy dog.", "café au lait",
          "chat models talk"] * 40
TEXTS = ["hello world", "café 🙂 日本語", "  two spaces\nnew line\ttab", "<|im_start|>user\nhi<|im_end|>"]


def _train_bytelevel(out: Path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return tok


@pytest.fixture
def bpe_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    _train_bytelevel(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": DEFAULT_CHATML},
        ],
    }))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return folder


def test_from_dir_reads_config_files(bpe_dir: Path) -> None:
    tok = HFTokenizer.from_dir(bpe_dir)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(json.loads((bpe_dir / "tokenizer.json").read_text())["model"]["vocab"])
    assert tok.vocab_size > 256 + len(SPECIALS)  # bytes + specials + merges
    assert tok.bos_token == "<|im_start|>" and tok.bos_id == 1
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_ids == frozenset({0, 2})  # generation_config list + eos_token
    assert tok.add_bos is False
    assert tok.chat_template == DEFAULT_CHATML  # the template named "default"
    assert tok.is_special(2) and not tok.is_special(tok.encode("hello", add_special=False)[0])


def test_chat_template_jinja_file_wins(bpe_dir: Path) -> None:
    (bpe_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert HFTokenizer.from_dir(bpe_dir).chat_template == "{{ messages[0]['content'] }}"


def test_add_bos_token_prepends_bos(bpe_dir: Path) -> None:
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer.from_dir(bpe_dir)
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.encode("hello", add_special=False) == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(bpe_dir: Path, text: str) -> None:
    tok = HFTokenizer.from_dir(bpe_dir)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_round_trip(bpe_dir: Path, text: str) -> None:
    tok = HFTokenizer.from_dir(bpe_dir)
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_token_bytes_can_be_partial_utf8(bpe_dir: Path) -> None:
    tok = HFTokenizer.from_dir(bpe_dir)
    pieces = [tok.token_bytes(i) for i in tok.encode("🙂")]  # not in the corpus: split in bytes
    assert len(pieces) > 1 and b"".join(pieces) == "🙂".encode()
    with pytest.raises(UnicodeDecodeError):
        pieces[0].decode("utf-8")


def test_parse_special(bpe_dir: Path) -> None:
    tok = HFTokenizer.from_dir(bpe_dir)
    assert tok.encode("<|im_end|>") == [2]
    literal = tok.encode("<|im_end|>", parse_special=False)
    assert len(literal) > 1 and 2 not in literal
    assert tok.decode(literal) == "<|im_end|>"
    assert tok.encode("<|im_end|>") == [2]  # the switch does not stick


def test_gpt2_byte_table_is_a_bijection() -> None:
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def _sentencepiece_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "h", "i", "▁h", "▁hi"):
        vocab[piece] = len(vocab)
    tok = HFTok(models.BPE(vocab, [("▁", "h"), ("▁h", "i")], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    folder = tmp_path / "sp"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def test_sentencepiece_token_bytes(tmp_path: Path) -> None:
    tok = HFTokenizer.from_dir(_sentencepiece_dir(tmp_path))
    assert tok.token_bytes(3 + 0x0A) == b"\n"  # <0x0A>
    assert tok.token_bytes(3 + 0xC3) == b"\xc3"  # a lone byte of a 2-byte character
    ids = tok.encode("hi\né", add_special=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == " hi\né".encode()  # "▁" prefix is a space
    assert tok.token_bytes(1) == b"<s>"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="tokenizer.json is missing.*save_pretrained"):
        HFTokenizer.from_dir(tmp_path)
    with pytest.raises(ModelNotFoundError):
        HFTokenizer.from_dir(tmp_path / "nope")


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(InvalidModelError, match=r"tokenizer\.json could not be read"):
        HFTokenizer.from_dir(tmp_path)


def test_corrupt_config_names_file(bpe_dir: Path) -> None:
    (bpe_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="tokenizer_config.json"):
        HFTokenizer.from_dir(bpe_dir)


# -- chat templates -----------------------------------------------------------------------

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_default_chatml() -> None:
    out = render_chat(DEFAULT_CHATML, MSGS, bos_token="<s>", eos_token="</s>")
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n")
    no_prompt = render_chat(DEFAULT_CHATML, MSGS, bos_token=None, eos_token=None, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_trim_blocks_and_bos() -> None:
    template = "{{ bos_token }}\n  {% for m in messages %}\n{{ m.role }}: {{ m.content }}\n  {% endfor %}"
    out = render_chat(template, MSGS, bos_token="<s>", eos_token=None)
    assert out == "<s>\nsystem: Be brief.\nuser: Hi\n"


def test_raise_exception_from_template() -> None:
    template = ("{% if messages[0].role != 'user' %}"
                "{{ raise_exception('first message must be user') }}{% endif %}")
    with pytest.raises(InvalidInputError, match="first message must be user"):
        render_chat(template, MSGS, bos_token=None, eos_token=None)


def test_tojson_keeps_unicode_and_indents() -> None:
    tools = [{"name": "météo", "args": {"city": "Zürich"}}]
    out = render_chat("{{ tools | tojson }}|{{ tools | tojson(indent=2) }}", MSGS, bos_token=None,
                      eos_token=None, tools=tools)
    compact, indented = out.split("|")
    assert json.loads(compact) == tools and "météo" in compact
    assert "\n  " in indented and json.loads(indented) == tools


def test_strftime_and_loopcontrols() -> None:
    template = ("{{ strftime_now('%Y') }}{% for m in messages %}"
                "{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    out = render_chat(template, MSGS, bos_token=None, eos_token=None)
    assert out[:4].isdigit() and out[4:] == "system"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append({'role': 'x', 'content': 'y'}) }}",  # immutable sandbox
])
def test_sandbox_refuses(template: str) -> None:
    with pytest.raises(InvalidInputError, match="unsafe"):
        render_chat(template, MSGS, bos_token=None, eos_token=None)


def test_syntax_error_is_one_line() -> None:
    with pytest.raises(InvalidInputError) as info:
        render_chat("{% for m in messages %}{{ m }}", MSGS, bos_token=None, eos_token=None)
    assert "\n" not in str(info.value) and "does not compile" in str(info.value)


@pytest.mark.parametrize(("messages", "needle"), [
    ("hi", "must be a list"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] needs a str 'role'"),
    ([{"role": "user", "content": 3}], r"messages\[0\] needs a str 'content'"),
    ([{"role": "user"}], r"messages\[0\] needs a str 'content'"),
])
def test_bad_messages(messages: object, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        render_chat(DEFAULT_CHATML, messages, bos_token=None, eos_token=None)  # type: ignore[arg-type]


def test_tool_call_message_may_have_no_content() -> None:
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert render_chat("{{ messages[0].tool_calls[0].name }}", msgs, bos_token=None, eos_token=None) == "f"
