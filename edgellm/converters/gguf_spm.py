"""A SentencePiece vocabulary in a GGUF file (``tokenizer.ggml.model == "llama"``) as a
Hugging Face ``tokenizer.json`` that splits text exactly as llama.cpp does.

llama.cpp's SentencePiece tokenizer (``llm_tokenizer_spm`` in llama-vocab.cpp):

1. the text gets a leading space when ``tokenizer.ggml.add_space_prefix`` is true (default)
   at its start and after every special token, then every space becomes "▁";
2. it starts from one symbol per UTF-8 character and repeatedly merges the adjacent pair
   whose concatenation is the vocabulary token with the highest *score* (ties: leftmost);
3. a symbol left that is not a token is spelled as its bytes, ``<0xNN>`` tokens.

The same pipeline in the ``tokenizers`` library: a ``Prepend("▁")`` + ``Replace(" ", "▁")``
normalizer (normalizers run on each piece between added tokens, so the prefix follows every
special token as in llama.cpp), a BPE model whose merges are every split ``a + b`` of a
token into two tokens, ranked by the merged token's score, with ``byte_fallback``, and
control / user-defined tokens as added tokens. This is how transformers' own
``LlamaConverter`` rebuilds a SentencePiece BPE model, but from GGUF metadata alone.
:func:`edgellm.converters.from_gguf.check_tokenizer` then checks it against llama.cpp.
"""

from __future__ import annotations

from typing import Any

__all__ = ["spm_tokenizer_json"]

SP_SPACE = "\u2581"  # "▁"
# GGUF token types (gguf.TokenType): which tokens are pieces, which are added tokens.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_ADDED = {_CONTROL: True, _USER_DEFINED: False}  # type -> "special" flag of the added token


def spm_tokenizer_json(meta: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer.json`` (as a dict) for the GGUF SentencePiece vocabulary in ``meta``.

    The post-processor (BOS) is left to the caller, which knows the ``add_bos`` flag.
    """
    tokens: list[str] = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    vocab = {text: i for i, text in enumerate(tokens)}  # llama.cpp: a repeated text's last id wins
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SP_SPACE}
    normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SP_SPACE}, replace]}
                  if prefix else replace)
    decoders = [{"type": "Replace", "pattern": {"String": SP_SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": _ADDED[t]}
            for i, t in enumerate(types) if t in _ADDED
        ],
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None,
            "unk_token": tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab,
            "merges": _merges(tokens, scores, types, vocab),
        },
    }


def _merges(tokens: list[str], scores: list[float], types: list[int],
            vocab: dict[str, int]) -> list[list[str]]:
    """Every split of a piece into two tokens, best score first (llama.cpp's merge order).

    A merge's rank stands for the merged piece's score: BPE merges the lowest-ranked pair
    first, llm_tokenizer_spm the highest-scored; splits of one piece share its place.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, piece in enumerate(tokens):
        if types[i] not in (_NORMAL, _USER_DEFINED) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, k, left, right))
    ranked.sort()
    return [[left, right] for _, _, _, left, right in ranked]
