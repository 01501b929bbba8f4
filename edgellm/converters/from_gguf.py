"""GGUF file -> Hugging Face checkpoint folder: the first step of GGUF -> OpenVINO / ONNX.

The exporters for OpenVINO and ONNX trace a PyTorch model, so a GGUF source is first
dequantized into a float checkpoint by transformers' GGUF loader. The weights it gets
right; the tokenizer it does not (transformers 4.57): it drops the digit splitting and
regex of the model's pre-tokenizer, prepends BOS through a post-processor whatever the
GGUF says, can name the wrong EOS, and keeps the chat template only in a side file. So
the tokenizer files are rewritten here from the GGUF metadata (table
:data:`PRE_TOKENIZERS`: llama.cpp pre-tokenizer name -> the HF pre-tokenizer that
reproduces it), and then *checked*: the written ``tokenizer.json`` must give the same
ids as llama.cpp's own reading of the GGUF on :data:`PROBE_TEXTS` (when llama-cpp-python
is installed; the manifest says when the check could not run).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from edgellm.converters.gguf_spm import spm_tokenizer_json
from edgellm.converters.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX
from edgellm.errors import ConversionError, MissingDependencyError, UnsupportedArchitectureError
from edgellm.gguf_meta import read_gguf_metadata

logger = logging.getLogger(__name__)

__all__ = ["PRE_TOKENIZERS", "PROBE_TEXTS", "dequantize_gguf", "write_tokenizer_files"]


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}


#: GGUF ``tokenizer.ggml.pre`` -> Hugging Face pre-tokenizer (the inverse of
#: ``gguf_vocab.PRE_TOKENIZERS``, which reads these structures when writing a GGUF).
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _byte_level(False)]},
}
_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
_BPE_FLAGS = {"dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "ignore_merges": False}
#: Files transformers writes that a published checkpoint does not have (tokenizer.model is a
#: copy of the whole GGUF; the chat template goes into tokenizer_config.json instead).
_STRAY_FILES = ("tokenizer.model", "chat_template.jinja")

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


def write_tokenizer_files(out_dir: Path, tokenizer_json: dict[str, Any], meta: dict[str, Any],
                          gguf_path: Path) -> dict[str, Any]:
    """Rewrite transformers' tokenizer files in ``out_dir`` from the GGUF metadata."""
    tm = _tokenizer_meta(meta, gguf_path)
    if tm["model"] == "gpt2":
        if tm["pre"] not in PRE_TOKENIZERS:
            raise ConversionError(
                f"{gguf_path}: GGUF pre-tokenizer {tm['pre']!r} has no Hugging Face equivalent "
                f"known to edgellm (known: {', '.join(PRE_TOKENIZERS)}); convert from the "
                "original Hugging Face checkpoint instead"
            )
        tokenizer_json["normalizer"] = None
        tokenizer_json["pre_tokenizer"] = PRE_TOKENIZERS[tm["pre"]]
        tokenizer_json["decoder"] = _DECODER
        tokenizer_json["model"].update(_BPE_FLAGS)
    elif tm["model"] == "llama":  # SentencePiece: transformers' rebuild splits unlike llama.cpp
        tokenizer_json = spm_tokenizer_json(meta)
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
    _fix_generation_config(out_dir, tm)
    for name in _STRAY_FILES:
        (out_dir / name).unlink(missing_ok=True)
    return {"model": tm["model"], "pre": tm["pre"], "add_bos": tm["add_bos"],
            "eos": special.get("eos_token")}


def _fix_generation_config(out_dir: Path, tm: dict[str, Any]) -> None:
    path = out_dir / "generation_config.json"
    if not path.is_file():
        return
    gen = json.loads(path.read_text(encoding="utf-8"))
    for key, field in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        if tm[field] is not None:
            gen[key] = tm[field]
    _write_json(path, gen)


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


def _import_stack() -> tuple[Any, Any]:
    try:
        import accelerate  # noqa: F401  transformers needs it to load GGUF weights
        import gguf  # noqa: F401  transformers reads the GGUF through gguf-py
        import torch
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "transformers", "convert",
                                     "dequantizing a GGUF source") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def _fix_config(config: Any, meta: dict[str, Any], arch: str) -> None:
    """What transformers' GGUF config reader misses (4.57): an explicit head size.

    It derives ``head_dim`` as hidden / heads, which is wrong for Qwen 3, Gemma and any model
    whose ``{arch}.attention.key_length`` says otherwise; loading then fails on shapes.
    """
    key_length = meta.get(f"{arch}.attention.key_length")
    if isinstance(key_length, int) and hasattr(config, "head_dim"):
        config.head_dim = key_length


def dequantize_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> dict[str, Any]:
    """Write a Hugging Face checkpoint of ``gguf_path`` into ``out_dir``; return provenance.

    Weights are dequantized by transformers; the tokenizer is rebuilt from the GGUF
    metadata and checked against llama.cpp. Raises :class:`ConversionError` (one line,
    naming the file) when either step cannot be done faithfully.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    torch, transformers = _import_stack()
    meta = read_gguf_metadata(gguf_path)
    arch = str(meta.get("general.architecture"))
    if arch not in GGUF_CONFIG_MAPPING:
        supported = ", ".join(sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer")))
        raise UnsupportedArchitectureError(
            f"{gguf_path}: transformers {transformers.__version__} cannot dequantize GGUF "
            f"architecture {arch!r} (it reads: {supported})"
        )
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        config = transformers.AutoConfig.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        _fix_config(config, meta, arch)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, config=config, dtype=getattr(torch, dtype),
            local_files_only=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    except (ValueError, RuntimeError, KeyError, OSError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConversionError(f"{gguf_path}: transformers could not dequantize it ({detail})") from None
    del model
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    summary = write_tokenizer_files(out_dir, tokenizer_json, meta, gguf_path)
    check = check_tokenizer(out_dir, gguf_path)
    seconds = round(time.perf_counter() - started, 1)
    logger.info("dequantized %s into %s in %.1fs", gguf_path, out_dir, seconds)
    return {"dtype": dtype, "by": f"transformers {transformers.__version__}",
            "tokenizer": summary, "tokenizer_check": check, "seconds": seconds}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
