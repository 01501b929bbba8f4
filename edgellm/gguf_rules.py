"""The model-level limits llama.cpp's loader enforces, checked in Python before it runs.

A GGUF whose header reads cleanly can still trip an assertion inside llama.cpp's
``llama_model::load_hparams`` (``src/llama-model.cpp``), which aborts the whole process:
a ``block_count`` of 0 or above ``LLAMA_MAX_LAYERS`` (512, ``src/llama-hparams.h``), an
``expert_count`` above ``LLAMA_MAX_EXPERTS`` (512), experts used without experts. Others make
edgellm's own arithmetic divide by zero (a head count of 0). Each rule here is a row of
:data:`RULES`; :func:`check_model_rules` runs them all and raises the first failure as one
:class:`InvalidModelError` naming the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.errors import InvalidModelError

if TYPE_CHECKING:
    from edgellm.gguf_meta import GGUFHeader

__all__ = ["LLAMA_MAX_LAYERS", "LLAMA_MAX_EXPERTS", "RULES", "check_model_rules", "vocab_size"]

LLAMA_MAX_LAYERS = 512  # llama.cpp src/llama-hparams.h
LLAMA_MAX_EXPERTS = 512  # llama.cpp src/llama-hparams.h ("Qwen3 Next")
_VOCAB_LISTS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


class _View:
    """The ``{arch}.``-prefixed keys of one header, read as llama.cpp reads them."""

    def __init__(self, header: GGUFHeader) -> None:
        self.header = header
        self.meta: Mapping[str, Any] = header.metadata
        self.arch = str(self.meta.get("general.architecture", ""))

    def name(self, key: str) -> str:
        return f"{self.arch}.{key}"

    def get(self, key: str) -> Any:
        return self.meta.get(self.name(key))

    def counts(self, key: str) -> list[Any]:
        """The value of a key that may be one number or one per layer (``get_key_or_arr``)."""
        value = self.get(key)
        return list(value) if isinstance(value, list) else [value]


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _architecture(v: _View) -> str | None:
    if not isinstance(v.meta.get("general.architecture"), str) or not v.arch:
        return "general.architecture is missing or not a string; llama.cpp needs it to read the model"
    return None


def _block_count(v: _View) -> str | None:
    n = v.get("block_count")
    if not _is_uint(n) or not 1 <= n <= LLAMA_MAX_LAYERS:
        return (f"{v.name('block_count')} is {n!r}; it must be a layer count from 1 to {LLAMA_MAX_LAYERS} "
                "(llama.cpp's LLAMA_MAX_LAYERS)")
    return None


def _experts(v: _View) -> str | None:
    n, used = v.get("expert_count") or 0, v.get("expert_used_count") or 0
    if not _is_uint(n) or not _is_uint(used) or n > LLAMA_MAX_EXPERTS:
        return (f"{v.name('expert_count')} is {n!r} (used {used!r}); it must be 0 to {LLAMA_MAX_EXPERTS} "
                "(llama.cpp's LLAMA_MAX_EXPERTS)")
    if used > n or (n > 0) != (used > 0):
        return (f"{v.name('expert_used_count')} is {used} with {n} experts; llama.cpp needs "
                "1 to expert_count experts used when there are experts, and 0 when there are none")
    return None


def _per_layer(v: _View, key: str, required: bool) -> str | None:
    values = v.counts(key)
    if values == [None] and not required:
        return None
    n_layers = v.get("block_count")
    if len(values) > 1 and len(values) != n_layers:
        return f"{v.name(key)} has {len(values)} per-layer values for {n_layers} layers"
    if not all(_is_uint(x) and x > 0 for x in values):
        return f"{v.name(key)} is {values[0] if len(values) == 1 else values!r}; it must be a positive count"
    return None


def _heads(v: _View) -> str | None:
    problem = _per_layer(v, "attention.head_count", True) or _per_layer(v, "attention.head_count_kv", False)
    if problem:
        return problem
    heads, kv = v.counts("attention.head_count"), v.counts("attention.head_count_kv")
    n = max(len(heads), len(kv))  # each is one value or one per layer
    if kv != [None] and any(heads[i % len(heads)] % kv[i % len(kv)] for i in range(n)):
        return (f"{v.name('attention.head_count_kv')} {kv} does not divide {v.name('attention.head_count')} "
                f"{heads}; each query head group needs a whole number of KV heads")
    return None


def _embedding(v: _View) -> str | None:
    width = v.get("embedding_length")
    if not _is_uint(width) or width == 0:
        return f"{v.name('embedding_length')} is {width!r}; it must be a positive width"
    heads = v.counts("attention.head_count")
    if v.get("attention.key_length") is None and any(width % h for h in heads):
        return (f"{v.name('embedding_length')} {width} is not a multiple of the head count {heads} "
                f"and there is no {v.name('attention.key_length')}")
    return None


_EPSILONS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")


def _norm_epsilon(v: _View) -> str | None:
    """ggml's norm operators assert ``eps >= 0.0f``: a NaN or negative epsilon aborts the first decode."""
    for key in _EPSILONS:
        eps = v.get(key)
        if eps is not None and not (isinstance(eps, (int, float)) and 0 <= eps < math.inf):
            return f"{v.name(key)} is {eps!r}; it must be a finite number >= 0 (else ggml aborts)"
    return None


def _context(v: _View) -> str | None:
    n = v.get("context_length")
    if n is not None and (not _is_uint(n) or n == 0):
        return f"{v.name('context_length')} is {n!r}; it must be a positive number of positions"
    return None


def _list_len(value: Any) -> int | None:
    """Length of an array value (read or skipped); None for a scalar."""
    from edgellm.gguf_meta import SkippedArray

    return len(value) if isinstance(value, (list, SkippedArray)) else None


def vocab_size(header: GGUFHeader) -> int:
    """The vocabulary size as llama.cpp takes it: ``{arch}.vocab_size``, else the token list's length.

    llama.cpp's own ``convert_hf_to_gguf.py`` often writes no ``{arch}.vocab_size``; the token
    list is then the only source (its length is known even when the list was not read).
    """
    meta = header.metadata
    arch = meta.get("general.architecture")
    key = meta.get(f"{arch}.vocab_size")
    if _is_uint(key) and key > 0:
        return int(key)
    return _list_len(meta.get("tokenizer.ggml.tokens")) or 0


def _vocabulary(v: _View) -> str | None:
    lengths = {k: _list_len(v.meta[k]) for k in _VOCAB_LISTS if k in v.meta}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k.rsplit('.', 1)[1]} {n}" for k, n in lengths.items())
        return f"the vocabulary lists differ in length ({shown}); each token needs one entry in each"
    n_vocab = vocab_size(v.header)
    if n_vocab == 0:
        return "there is no vocabulary (no tokenizer.ggml.tokens and no vocab_size)"
    embd = next((t for t in v.header.tensors if t.name == "token_embd.weight"), None)
    if embd is not None and (len(embd.dims) < 2 or embd.dims[1] != n_vocab):
        return f"token_embd.weight has shape {list(embd.dims)} but the vocabulary has {n_vocab} tokens"
    return None


def _tokenizer(v: _View) -> str | None:
    """'no_vocab' / 'none' load, but llama.cpp has no tokenizer then, and the first text edgellm
    tokenizes aborts (llama-vocab.cpp asserts "Tokenizer not initialized")."""
    model = v.meta.get("tokenizer.ggml.model")
    if model in ("no_vocab", "none"):
        return f"tokenizer.ggml.model is {model!r}: the file has no tokenizer, and edgellm runs text"
    return None


def _byte_fallback(v: _View) -> str | None:
    """llama.cpp's SentencePiece ('llama') tokenizer falls back to byte tokens for any text its
    pieces do not cover (llama-vocab.cpp ``byte_to_token``: ``token_to_id.at``); a missing one
    throws out of a noexcept path and terminates the process at the first such text."""
    if v.meta.get("tokenizer.ggml.model") != "llama":
        return None
    missing = sorted(set(range(256)) - v.header.byte_tokens)
    if missing:
        return (f"its SentencePiece ('llama') vocabulary lacks {len(missing)} of the 256 byte tokens "
                f"(<0x{missing[0]:02X}> first); llama.cpp aborts on text that needs one")
    return None


def _norm_weights(v: _View) -> str | None:
    """Norm weights are F32 in every file llama.cpp writes (its converter and quantizer keep 1-D
    tensors F32); ggml's norm multiply asserts it, so another type aborts the first decode."""
    for t in v.header.tensors:
        if t.name.endswith("norm.weight") and t.type_id != 0:
            from gguf.constants import GGMLQuantizationType

            return f"tensor {t.name!r} is {GGMLQuantizationType(t.type_id).name}; norm weights must be F32"
    return None


#: Every rule, in the order llama.cpp's loader meets them; a rule returns the problem or None.
RULES: tuple[Callable[[_View], str | None], ...] = (
    _architecture, _vocabulary, _tokenizer, _byte_fallback, _context, _block_count, _experts, _heads,
    _embedding, _norm_epsilon, _norm_weights,
)


def check_model_rules(path: Path, header: GGUFHeader) -> None:
    """Raise InvalidModelError for the first rule ``header`` breaks (llama.cpp would abort)."""
    view = _View(header)
    for rule in RULES:
        problem = rule(view)
        if problem:
            raise InvalidModelError(f"{path}: {problem}; llama.cpp fails or aborts on it — re-convert it")
