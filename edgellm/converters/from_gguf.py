"""GGUF file -> Hugging Face checkpoint folder, without torch or transformers.

The first step of GGUF -> OpenVINO (which traces PyTorch) and the way the ONNX graph builder
reads a GGUF source. Weights: :mod:`~edgellm.converters.gguf_tensors` (gguf-py dequantizes,
one tensor at a time, llama.cpp's row permutation and norm shift undone); config:
:mod:`~edgellm.converters.gguf_config`; tokenizer: rebuilt here from the metadata — byte-level
BPE (table :data:`PRE_TOKENIZERS`: llama.cpp pre-tokenizer name -> the HF pre-tokenizer that
reproduces it) or SentencePiece (:mod:`~edgellm.converters.gguf_spm`) — and then *checked*:
the written ``tokenizer.json`` must give the same ids as llama.cpp's own reading of the GGUF
on :data:`PROBE_TEXTS` (when llama-cpp-python is installed; the manifest says when the check
could not run).

This replaced transformers' GGUF loader (4.57), which got the weights right but not the
tokenizer (it dropped the pre-tokenizer's digit splitting and regex, prepended BOS whatever
the GGUF said, could name the wrong EOS) and not Llama 3.1's rope frequency factors (dropped
silently; recovered into ``rope_scaling`` here, see ``gguf_config``); tests/test_gguf_source.py
checks the weights are still the ones it reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm.converters.gguf_spm import spm_tokenizer_json
from edgellm.converters.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX
from edgellm.errors import ConversionError, InvalidInputError, MissingDependencyError
from edgellm.gguf_meta import read_gguf_header

logger = logging.getLogger(__name__)

__all__ = ["PRE_TOKENIZERS", "PROBE_TEXTS", "dequantize_gguf", "write_tokenizer_files"]


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}


_GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_DEFAULT_BPE_REGEXES = ("[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2_REGEX, "\\p{N}+", "[0-9][0-9][0-9]")

#: GGUF ``tokenizer.ggml.pre`` -> Hugging Face pre-tokenizer (the inverse of
#: ``gguf_vocab.PRE_TOKENIZERS``, which reads these structures when writing a GGUF).
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _byte_level(True),
    # llama.cpp's regex list for a ``default`` (or unrecognised, pre-"pre") BPE vocabulary,
    # applied one after the other as llm_tokenizer_bpe does (llama-vocab.cpp, default case).
    "default": {"type": "Sequence", "pretokenizers": [
        *(_split(r) for r in _DEFAULT_BPE_REGEXES), _byte_level(False)]},
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _byte_level(False)]},
}
_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
_BPE_FLAGS = {"dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "ignore_merges": False}
# GGUF token types (gguf.TokenType) that become added tokens -> their "special" flag.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_ADDED = {_CONTROL: True, _USER_DEFINED: False}

#: Strings the rewritten tokenizer must split exactly as llama.cpp does.
PROBE_TEXTS: tuple[str, ...] = (
    "Hello, world!", "The capital of France is Paris.", " leading space", "trailing space ",
    "multiple   spaces\tand\ttabs", "line\nbreaks\n\n\nmany", "\r\nwindows\r\n", "1234567890",
    "3.14159 and 2,718", "version 12.04.5-rc1", "I'm sure you've heard they'd go", "CAPS lock ON",
    "naïve café façade", "Ünïcödé ßtraße", "日本語のテキスト", "中文测试句子", "한국어 문장",
    "Привет, мир", "مرحبا بالعالم", "emoji 😀🎉 and 👩‍👩‍👧 family", "def f(x):\n    return x**2  # sq",
    "<html><body>tag</body></html>", "a" * 40, "!!!???...", "",
)


def _tokenizer_meta(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConversionError(f"{path}: the GGUF has no tokenizer.ggml.tokens; it cannot be "
                              "turned into a Hugging Face checkpoint without its vocabulary")
    arch = meta.get("general.architecture")

    def ident(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if isinstance(value, int) else None

    return {
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "tokens": tokens,
        "chat_template": meta.get("tokenizer.chat_template"),
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "context_length": meta.get(f"{arch}.context_length"),
        **{k: ident(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")},
    }


def _post_processor(tm: dict[str, Any]) -> dict[str, Any] | None:
    """BOS through a template when the GGUF adds one (so transformers agrees), else none."""
    bos = tm["bos"]
    if not tm["add_bos"] or bos is None:
        if tm["model"] != "gpt2":
            return None
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                "use_regex": True}
    text = tm["tokens"][bos]
    special = {"SpecialToken": {"id": text, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special,
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {text: {"id": text, "ids": [bos], "tokens": [text]}},
    }


def _special_tokens(tm: dict[str, Any]) -> dict[str, Any]:
    tokens = tm["tokens"]
    out: dict[str, Any] = {}
    for key, field in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                       ("pad_token", "padding")):
        if tm[field] is not None and 0 <= tm[field] < len(tokens):
            out[key] = tokens[tm[field]]
    if "pad_token" not in out and "eos_token" in out:
        out["pad_token"] = out["eos_token"]
    return out


def bpe_tokenizer_json(meta: dict[str, Any], gguf_path: Path) -> dict[str, Any]:
    """``tokenizer.json`` (as a dict) for the GGUF byte-level BPE vocabulary in ``meta``.

    llama.cpp's ``llm_tokenizer_bpe``: the pre-tokenizer named by ``tokenizer.ggml.pre``
    (:data:`PRE_TOKENIZERS`), then merges by rank; control tokens (type 3) and user-defined
    tokens (type 4) are matched whole before that, as Hugging Face added tokens (special or
    not). The post-processor (BOS) is left to the caller.
    """
    tm = _tokenizer_meta(meta, gguf_path)
    if tm["pre"] not in PRE_TOKENIZERS:
        raise ConversionError(
            f"{gguf_path}: GGUF pre-tokenizer {tm['pre']!r} has no Hugging Face equivalent "
            f"known to edgellm (known: {', '.join(PRE_TOKENIZERS)}); convert from the "
            "original Hugging Face checkpoint instead"
        )
    tokens = [str(t) for t in tm["tokens"]]
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    merges = [str(m).split(" ", 1) for m in meta.get("tokenizer.ggml.merges") or ()]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": _ADDED[t]}
            for i, t in enumerate(types) if t in _ADDED
        ],
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[tm["pre"]], "post_processor": None,
        "decoder": _DECODER,
        "model": {"type": "BPE", **_BPE_FLAGS, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": merges},
    }


#: ``tokenizer.ggml.model`` -> the builder of its tokenizer.json.
TOKENIZER_MODELS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "gpt2": bpe_tokenizer_json,
    "llama": lambda meta, path: spm_tokenizer_json(meta),
}


def write_tokenizer_files(out_dir: Path, meta: dict[str, Any], gguf_path: Path) -> dict[str, Any]:
    """Write transformers' tokenizer files in ``out_dir`` from the GGUF metadata alone."""
    tm = _tokenizer_meta(meta, gguf_path)
    build = TOKENIZER_MODELS.get(str(tm["model"]))
    if build is None:
        raise ConversionError(
            f"{gguf_path}: GGUF tokenizer model {tm['model']!r} cannot be rebuilt (known: "
            f"{', '.join(TOKENIZER_MODELS)}); convert from the original Hugging Face checkpoint instead")
    tokenizer_json = build(meta, gguf_path)
    tokenizer_json["post_processor"] = _post_processor(tm)
    _write_json(out_dir / "tokenizer.json", tokenizer_json)
    special = _special_tokens(tm)
    _write_json(out_dir / "special_tokens_map.json", special)
    added = {
        str(tok["id"]): {k: tok[k] for k in
                         ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for tok in tokenizer_json.get("added_tokens", [])
    }
    config: dict[str, Any] = {
        "add_bos_token": tm["add_bos"], "add_eos_token": False, "added_tokens_decoder": added,
        **special, "clean_up_tokenization_spaces": False,
        "model_max_length": tm["context_length"] or 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if tm["chat_template"]:
        config["chat_template"] = tm["chat_template"]
    _write_json(out_dir / "tokenizer_config.json", config)
    return {"model": tm["model"], "pre": tm["pre"], "add_bos": tm["add_bos"],
            "eos": special.get("eos_token")}


def check_tokenizer(out_dir: Path, gguf_path: Path) -> dict[str, Any]:
    """Compare the written tokenizer with llama.cpp's reading of the GGUF on PROBE_TEXTS."""
    from edgellm.text.tokenizer import HFTokenizer

    try:
        from edgellm.runtimes.llamacpp import open_vocab
    except MissingDependencyError:
        return {"status": "skipped", "reason": "llama-cpp-python is not installed"}
    ours = HFTokenizer.from_dir(out_dir)
    theirs = open_vocab(gguf_path)
    for text in PROBE_TEXTS:
        a, b = ours.encode(text), theirs.encode(text)
        if a != b:
            raise ConversionError(
                f"{gguf_path}: the tokenizer rebuilt from the GGUF splits {text!r} as {a[:12]} but "
                f"llama.cpp gives {b[:12]}; convert from the original Hugging Face checkpoint"
            )
    return {"status": "match", "reference": "llama.cpp", "strings": len(PROBE_TEXTS)}


#: ``dtype`` of :func:`dequantize_gguf` -> the safetensors dtype written.
DTYPES = {"float32": "F32", "float16": "F16"}


def dequantize_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", *,
                    weights: bool = True) -> dict[str, Any]:
    """Write a Hugging Face checkpoint of ``gguf_path`` into ``out_dir``; return provenance.

    No torch and no transformers: the config comes from the metadata
    (:mod:`~edgellm.converters.gguf_config`), the tokenizer is built from the metadata and
    checked against llama.cpp, and (unless ``weights`` is false: a reader that takes
    :class:`~edgellm.converters.gguf_tensors.GGUFTensors` directly needs only the rest) the
    tensors are dequantized one at a time by gguf-py and streamed into ``model.safetensors``
    (:func:`write_gguf_weights`). Raises an edgellm error (one line, naming the file) when any
    step cannot be done faithfully; a refused config leaves nothing behind.
    """
    from importlib.metadata import version

    from edgellm.converters.gguf_config import generation_config, hf_config
    from edgellm.converters.gguf_tensors import GGUFTensors

    _check_dtype(dtype)
    started = time.perf_counter()
    header = read_gguf_header(gguf_path, full_lists=True)
    tensors = GGUFTensors(gguf_path, header)
    config = hf_config(tensors)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config(tensors))
    summary = write_tokenizer_files(out_dir, header.metadata, gguf_path)
    info: dict[str, Any] = {"by": f"edgellm with gguf-py {version('gguf')} (no torch)", "tokenizer": summary,
                            "tokenizer_check": check_tokenizer(out_dir, gguf_path)}
    if weights:
        info.update(write_gguf_weights(gguf_path, out_dir, dtype, tensors))
    else:
        info["weights"] = "not written: the converter reads the GGUF's tensors itself"
    info["seconds"] = round(time.perf_counter() - started, 1)
    logger.info("dequantized %s into %s in %.1fs", gguf_path, out_dir, info["seconds"])
    return info


def write_gguf_weights(gguf_path: Path, out_dir: Path, dtype: str = "float32",
                       tensors: Any = None) -> dict[str, Any]:
    """Stream the dequantized tensors of ``gguf_path`` into ``out_dir/model.safetensors``."""
    from edgellm.converters.gguf_tensors import GGUFTensors
    from edgellm.converters.safetensors import write_safetensors

    _check_dtype(dtype)
    source = tensors or GGUFTensors(gguf_path)
    largest = write_safetensors(out_dir / "model.safetensors", source, DTYPES[dtype])
    return {"dtype": dtype, "largest_tensor_bytes": largest}


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype {dtype!r} cannot be written; use one of: {', '.join(DTYPES)}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
