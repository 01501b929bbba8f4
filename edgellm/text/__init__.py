"""Text layer: tokenizers (the ``tokenizers`` library, never transformers), sandboxed chat
templates and incremental detokenization. Importing it loads neither tokenizers nor jinja2;
they are imported when first used.
"""

from __future__ import annotations

from edgellm.text.chat import DEFAULT_CHATML, check_text, encode_chat, render_chat, validate_messages
from edgellm.text.detok import StreamDecoder
from edgellm.text.tokenizer import HFTokenizer, Tokenizer

__all__ = [
    "DEFAULT_CHATML",
    "HFTokenizer",
    "StreamDecoder",
    "check_text",
    "encode_chat",
    "Tokenizer",
    "render_chat",
    "validate_messages",
]
