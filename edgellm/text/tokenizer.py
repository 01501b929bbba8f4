"""Tokenizers: the protocol the decode loop needs, and its Hugging Face implementation.

:class:`HFTokenizer` reads a model folder with the ``tokenizers`` library only (never
``transformers``, which an embedded install does not have). Besides encode/decode it
answers :meth:`Tokenizer.token_bytes`: the raw bytes of one token, which may be an
incomplete UTF-8 sequence. The streaming detokenizer (:mod:`edgellm.text.detok`) works on
those bytes so that an emoji split over three tokens is never shown half-decoded.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from edgellm._jsonfile import read_json_object
from edgellm.errors import InvalidModelError, ModelNotFoundError, one_line

if TYPE_CHECKING:
    import tokenizers

logger = logging.getLogger(__name__)

__all__ = ["HFTokenizer", "Tokenizer", "bytes_to_unicode"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the decode loop and chat layer need from a tokenizer.

    ``encode(add_special=True)`` prepends BOS when ``add_bos`` is true;
    ``parse_special=True`` turns text such as ``"<|im_end|>"`` into that special token.
    ``token_bytes(id)`` is the raw bytes of one token's piece (possibly an incomplete
    UTF-8 sequence); for special and control tokens it is the token text's UTF-8.
    ``special_tokens()`` maps the text of every token that ``parse_special=True`` turns into
    a special (control) token to its id: the markers chat content must never produce.
    """

    vocab_size: int
    bos_id: int | None
    eos_ids: frozenset[int]
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    chat_template: str | None

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...

    def token_bytes(self, id: int) -> bytes: ...

    def is_special(self, id: int) -> bool: ...

    def special_tokens(self) -> dict[str, int]: ...


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE.

    Source: openai/gpt-2 ``encoder.py::bytes_to_unicode``. Printable Latin-1 bytes map to
    themselves; the other 68 bytes map to U+0100 onwards, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


# How a vocabulary spells bytes; detected from the tokenizer's decoder (see _piece_style).
_BYTELEVEL, _SENTENCEPIECE, _PLAIN = "bytelevel", "sentencepiece", "plain"
_SP_SPACE = "\u2581"  # "▁", SentencePiece's visible space


def _component_types(state: Any) -> Iterable[str]:
    """Every ``type`` in a serialized decoder / pre-tokenizer, Sequences included."""
    if isinstance(state, dict):
        if "type" in state:
            yield str(state["type"])
        for key in ("decoders", "pretokenizers"):
            for child in state.get(key) or ():
                yield from _component_types(child)


def _piece_style(tok: tokenizers.Tokenizer) -> str:
    types: set[str] = set()
    for part in (tok.decoder, tok.pre_tokenizer):
        if part is not None:
            types.update(_component_types(json.loads(part.__getstate__())))
    if "ByteLevel" in types:
        return _BYTELEVEL
    if types & {"ByteFallback", "Metaspace", "Replace"}:
        return _SENTENCEPIECE
    return _PLAIN


def _sp_piece_bytes(piece: str) -> bytes:
    # "<0x0A>" is a byte-fallback token (SentencePiece byte_fallback=true): one raw byte.
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace(_SP_SPACE, " ").encode("utf-8")


def _bytelevel_piece_bytes(piece: str) -> bytes:
    table = _unicode_to_bytes()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return piece.encode("utf-8")  # not a byte-level piece (e.g. a plain added token)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A :class:`Tokenizer` backed by a Hugging Face ``tokenizer.json``.

    Build it with :meth:`from_dir` for a model folder, or directly from a
    ``tokenizers.Tokenizer`` plus the special-token facts that live in other files.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_ids: Iterable[int] = (),
        add_bos: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self._lock = threading.Lock()  # encode_special_tokens is tokenizer-wide state
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id: int | None = tokenizer.token_to_id(bos_token) if bos_token else None
        eos = {int(i) for i in eos_ids}
        if eos_token and tokenizer.token_to_id(eos_token) is not None:
            eos.add(tokenizer.token_to_id(eos_token))
        self.eos_ids: frozenset[int] = frozenset(eos)
        self.chat_template = chat_template
        added = tokenizer.get_added_tokens_decoder()
        self._added_text: dict[int, str] = {i: t.content for i, t in added.items()}
        self._special: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._style = _piece_style(tokenizer)
        self._bytes_cache: dict[int, bytes] = {}
        self.add_bos: bool = self._detect_add_bos() if add_bos is None else bool(add_bos)
        if self.add_bos and self.bos_id is None:
            logger.warning("add_bos is set but the tokenizer has no BOS token; not adding one")
            self.add_bos = False

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Read ``tokenizer.json`` and its companions from a Hugging Face model folder.

        Reads ``tokenizer_config.json`` (chat template, BOS/EOS, ``add_bos_token``),
        ``generation_config.json`` (``eos_token_id``) and ``chat_template.jinja`` when
        present. A missing or unreadable ``tokenizer.json`` raises
        :class:`~edgellm.errors.InvalidModelError` naming the file.
        """
        from tokenizers import Tokenizer as _HFTok

        folder = Path(path)
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"tokenizer folder {str(folder)!r} does not exist; pass the model folder"
            )
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise InvalidModelError(
                f"{tok_file} is missing; edgellm needs a fast tokenizer file: re-save the model "
                "with transformers (tokenizer.save_pretrained) so that tokenizer.json is written"
            )
        try:
            tok = _HFTok.from_file(str(tok_file))
        except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception)
            raise InvalidModelError(
                f"{tok_file} could not be read ({one_line(exc)}); the file is corrupt or "
                "truncated: copy it again from the source model"
            ) from None
        config = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")
        add_bos = config.get("add_bos_token")
        return cls(
            tok,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            eos_ids=_eos_ids(gen.get("eos_token_id")),
            add_bos=add_bos if isinstance(add_bos, bool) else None,
            chat_template=_find_chat_template(folder, config),
        )

    def _detect_add_bos(self) -> bool:
        """True when the tokenizer's own post-processor prepends BOS (e.g. Llama)."""
        if self.bos_id is None:
            return False
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(plain) and with_special[0] == self.bos_id

    # -- the Tokenizer protocol ---------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_special`` and the model wants one."""
        if parse_special:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            with self._lock:
                self._tok.encode_special_tokens = True
                try:
                    ids = self._tok.encode(text, add_special_tokens=False).ids
                finally:
                    self._tok.encode_special_tokens = False
        if add_special and self.add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids`` as the tokenizer's own decoder spells it."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token (see :class:`Tokenizer`); cached per id."""
        cached = self._bytes_cache.get(id)
        if cached is not None:
            return cached
        if id in self._added_text:
            value = self._added_text[id].encode("utf-8")
        else:
            piece = self._tok.id_to_token(id)
            if piece is None:
                value = b""
            elif self._style == _BYTELEVEL:
                value = _bytelevel_piece_bytes(piece)
            elif self._style == _SENTENCEPIECE:
                value = _sp_piece_bytes(piece)
            else:
                value = self._tok.decode([id]).encode("utf-8")
        self._bytes_cache[id] = value
        return value

    def is_special(self, id: int) -> bool:
        """True for special (control) tokens such as BOS, EOS and chat markers."""
        return id in self._special

    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the special added tokens (those ``parse_special=False`` keeps as text)."""
        return {self._added_text[i]: i for i in self._special}

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, style={self._style!r}, "
            f"bos={self.bos_token!r}, eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})"
        )


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when the file is absent."""
    if not path.is_file():
        return {}
    return read_json_object(path, "copy it again from the source model")


def _eos_ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _find_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The chat template: chat_template.jinja, then chat_template.json, then the config.

    A config may hold a list of named templates; the one named "default" is used.
    """
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    value = _read_json(folder / "chat_template.json").get("chat_template")
    if value is None:
        value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
        if value is None:
            logger.warning("no chat template named 'default' among %s", sorted(map(str, named)))
    return value if isinstance(value, str) else None
