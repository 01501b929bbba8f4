"""Tokenizer metadata for GGUF: everything llama.cpp needs to tokenize like the source.

Two tokenizer families are written:

* byte-level BPE (``tokenizer.json`` with a ``BPE`` model and a ``ByteLevel`` pre-tokenizer:
  GPT-2, SmolLM, Llama 3, Qwen) -> ``tokenizer.ggml.model = "gpt2"``; the pre-tokenizer name
  llama.cpp expects is read from the *structure* of the HF pre-tokenizer (table
  :data:`PRE_TOKENIZERS`), not guessed from a hash of a known checkpoint, so freshly
  trained tokenizers convert too.
* SentencePiece (``tokenizer.model``: Llama 2, TinyLlama, Mistral, Gemma) ->
  ``tokenizer.ggml.model = "llama"`` with scores and token types.

Special token ids, merges, add-BOS flags and the chat template come from gguf-py's
``SpecialVocab`` (llama.cpp's own reader of tokenizer_config.json).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgellm._jsonfile import read_json_object
from edgellm.errors import ConversionError, InvalidModelError

logger = logging.getLogger(__name__)

__all__ = ["PRE_TOKENIZERS", "add_vocab"]

LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

#: HF pre-tokenizer signature -> llama.cpp ``tokenizer.ggml.pre`` name (llama-vocab.cpp).
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel(regex)",): "gpt-2",
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",
    (f"Split({LLAMA3_REGEX})", "ByteLevel"): "llama-bpe",
    (f"Split({QWEN2_REGEX})", "ByteLevel"): "qwen2",
}

# GGUF token types (gguf.TokenType values, spelled out to keep this module import-light)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _step_signature(step: dict[str, Any]) -> str:
    kind = step.get("type")
    if kind == "ByteLevel":
        return "ByteLevel(regex)" if step.get("use_regex", True) else "ByteLevel"
    if kind == "Digits":
        return "Digits(individual)" if step.get("individual_digits") else "Digits"
    if kind == "Split":
        pattern = step.get("pattern", {})
        return f"Split({pattern.get('Regex', pattern.get('String', ''))})"
    return str(kind)


def pre_tokenizer_signature(tokenizer_json: dict[str, Any]) -> tuple[str, ...]:
    """The HF pre-tokenizer as a tuple of step descriptions (Sequence flattened)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return tuple(_step_signature(s) for s in steps if s)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "re-download the tokenizer files")


def _bpe_tokens(folder: Path, tok: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int], str]:
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(
            f"{folder / 'tokenizer.json'}: tokenizer model {model.get('type')!r} without a "
            "tokenizer.model file; supported: byte-level BPE or SentencePiece"
        )
    signature = pre_tokenizer_signature(tok)
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        raise ConversionError(
            f"{folder / 'tokenizer.json'}: pre-tokenizer {list(signature)} has no llama.cpp "
            f"equivalent known to edgellm; known: {sorted(set(PRE_TOKENIZERS.values()))}"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_UNUSED] * n_vocab
    for text, idx in model["vocab"].items():
        if idx < n_vocab:
            tokens[idx], types[idx] = text, _NORMAL
    for added in tok.get("added_tokens", []):
        idx = int(added["id"])
        if idx >= n_vocab:
            raise InvalidModelError(
                f"{folder / 'tokenizer.json'}: added token {added['content']!r} has id {idx} "
                f">= vocab_size {n_vocab} in config.json"
            )
        tokens[idx] = added["content"]
        types[idx] = _CONTROL if added.get("special") else _USER_DEFINED
    return tokens, types, pre


def _spm_tokens(folder: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor  # convert extra

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [_UNUSED] * n_vocab
    checks = ((sp.IsUnknown, _UNKNOWN), (sp.IsControl, _CONTROL), (sp.IsUnused, _UNUSED), (sp.IsByte, _BYTE))
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = next((t for check, t in checks if check(i)), _NORMAL)
    tok_json = folder / "tokenizer.json"
    for added in (_read_json(tok_json).get("added_tokens", []) if tok_json.is_file() else []):
        idx = int(added["id"])
        if idx < n_vocab:
            tokens[idx] = added["content"].encode("utf-8")
            types[idx] = _CONTROL if added.get("special") else _USER_DEFINED
    return tokens, scores, types


def add_vocab(
    writer: Any, folder: Path, n_vocab: int, add_space_prefix: bool | None = None
) -> dict[str, Any]:
    """Write the tokenizer of HF checkpoint ``folder`` into ``writer``; return a summary."""
    import gguf

    tok_json_path = folder / "tokenizer.json"
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _spm_tokens(folder, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        if add_space_prefix is not None:
            writer.add_add_space_prefix(add_space_prefix)
        summary = {"model": "llama", "pre": "default"}
        merges = False
    elif tok_json_path.is_file():
        btokens, types, pre = _bpe_tokens(folder, _read_json(tok_json_path), n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(btokens)
        writer.add_token_types(types)
        summary = {"model": "gpt2", "pre": pre}
        merges = True
    else:
        raise InvalidModelError(
            f"{folder}: no tokenizer.json or tokenizer.model; the GGUF needs the tokenizer — "
            "copy the tokenizer files into the checkpoint folder"
        )
    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    summary.update(
        n_tokens=n_vocab,
        special_ids=dict(special.special_token_ids),
        chat_template=special.chat_template is not None,
    )
    return summary
