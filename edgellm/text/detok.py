"""Incremental detokenization: token ids in, complete UTF-8 text out.

Byte-level vocabularies split characters freely: "🙂" may arrive as three tokens of one,
two and one bytes. Decoding each token alone would show U+FFFD or a broken character;
decoding the whole sequence each step is quadratic. :class:`StreamDecoder` concatenates
each token's raw bytes (:meth:`Tokenizer.token_bytes`) through an incremental UTF-8
decoder, which holds back an incomplete trailing sequence until its last byte arrives.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgellm.text.tokenizer import Tokenizer

__all__ = ["StreamDecoder"]


class StreamDecoder:
    """Turn a stream of token ids into text pieces that are always valid to show.

    ``feed(id)`` returns the text completed by that token ("" while a multi-byte
    character is still incomplete); ``flush()`` returns what is left at the end, with
    bytes that never formed a character replaced by U+FFFD. Bytes that are invalid UTF-8
    in the middle of the stream are replaced as soon as they are known to be invalid.

    ``skip_special`` drops special (control) tokens such as ``<|im_end|>`` from the text.
    ``strip_leading_space`` removes one leading space from the first text emitted; use it
    when decoding from the start of a text with a SentencePiece vocabulary that adds a
    dummy prefix space. The decode loop does not: a completion continues its prompt, and
    the space in front of its first word belongs to the text (llama.cpp does the same).
    """

    __slots__ = ("_decoder", "_skip_special", "_strip_pending", "_tokenizer")

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special: bool = True, strip_leading_space: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._skip_special = skip_special
        self._strip_pending = strip_leading_space

    def feed(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        tok = self._tokenizer
        if self._skip_special and tok.is_special(token_id):
            return ""
        text = self._decoder.decode(tok.token_bytes(token_id), False)
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                text = text[1:]
        return text

    def flush(self) -> str:
        """Return the remaining text; incomplete trailing bytes become U+FFFD."""
        text = self._decoder.decode(b"", True)
        self._decoder.reset()
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                text = text[1:]
        return text
