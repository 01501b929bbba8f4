"""The llama.cpp backend (through llama-cpp-python's low-level bindings).

edgellm drives llama.cpp's model, context and batch objects directly: no high-level
``Llama`` object, no per-context logits matrix. Sampling, stop strings and streaming are
done by the shared loop; this module only maps token ids to logits and manages the KV
state. llama.cpp's log is routed into :mod:`logging` and its last lines are quoted when a
native call fails, so a failure reaches the user as one edgellm error naming the file.
"""

from __future__ import annotations

import collections
import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import (
    BackendError,
    ContextOverflowError,
    InvalidInputError,
    InvalidModelError,
    MissingDependencyError,
    NoCompatibleRuntimeError,
)
from edgellm.gguf_meta import read_gguf_spec
from edgellm.runtimes.base import RuntimeOptions

try:
    import llama_cpp
    from llama_cpp import _internals
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("llama_cpp", "llama", "the llama.cpp backend") from exc

logger = logging.getLogger(__name__)

__all__ = ["LlamaCppRuntime", "LlamaCppTokenizer", "open", "open_vocab"]

#: KV cache element types (ggml type ids, ggml.h ``enum ggml_type``).
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}
_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=20)
_BACKEND_READY = False


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace").rstrip()
    if line:
        _LOG_TAIL.append(line)
        logger.debug("llama.cpp: %s", line)


def _init_backend() -> None:
    global _BACKEND_READY
    if not _BACKEND_READY:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True


def _native_reason() -> str:
    for word in ("error", "failed"):
        lines = [ln for ln in _LOG_TAIL if word in ln.lower()]
        if lines:
            return lines[-1]
    return _LOG_TAIL[-1] if _LOG_TAIL else "no message from llama.cpp"



class LlamaCppTokenizer:
    """The tokenizer stored in the GGUF file, run by llama.cpp (implements ``Tokenizer``)."""

    def __init__(self, model: Any, metadata: dict[str, Any]) -> None:
        self._model = model  # the vocabulary lives as long as its native model
        self._vocab = model.vocab
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.bos_id: int | None = bos if bos >= 0 else None
        self.eos_ids = frozenset(
            i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, i)
        )
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        template = metadata.get("tokenizer.chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.bos_token = self._text(self.bos_id)
        eos = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.eos_token = self._text(eos if eos >= 0 else None)
        self._buf = ctypes.create_string_buffer(256)

    def _text(self, token: int | None) -> str | None:
        if token is None:
            return None
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS prepended when the model wants it and add_special)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max,
                                     add_special and self.add_bos, parse_special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, -n,
                                         add_special and self.add_bos, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """Raw bytes of one token's piece (special tokens rendered as their text)."""
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, True)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, big, -n, 0, True)
            return big.raw[:n]
        return self._buf.raw[:n]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; control tokens are dropped when ``skip_special``."""
        pieces = (self.token_bytes(i) for i in ids if not (skip_special and self.is_special(i)))
        return b"".join(pieces).decode("utf-8", errors="replace")

    def is_special(self, token: int) -> bool:
        """True for control tokens (BOS, EOS, chat markers)."""
        return bool(llama_cpp.llama_vocab_is_control(self._vocab, token))


def open_vocab(path: Path) -> LlamaCppTokenizer:
    """The tokenizer of a GGUF file alone (llama.cpp loads the vocabulary, not the weights)."""
    _init_backend()
    _, metadata = read_gguf_spec(path)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except (ValueError, RuntimeError, OSError):
        raise InvalidModelError(
            f"{path}: llama.cpp could not read the vocabulary ({_native_reason()})"
        ) from None
    return LlamaCppTokenizer(model, metadata)


class LlamaCppRuntime:
    """A GGUF model in llama.cpp with one sequence of KV state (implements ``Runtime``)."""

    backend = "llamacpp"

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        _init_backend()
        self.path = path
        self.spec, metadata = read_gguf_spec(path)  # validates before native code sees the file
        self._metadata = metadata
        self.device = self._pick_device(options.device)
        self.threads = options.thread_count()
        self.n_ctx = options.context_for(self.spec)
        self.n_batch = min(self.n_ctx, int(options.extra.get("n_batch", 512)))
        self._model = self._load_model(path, options)
        self._ctx = self._make_context(options)
        self._batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._model.vocab))
        self.tokenizer = LlamaCppTokenizer(self._model, metadata)
        self._n_past = 0

    def _pick_device(self, device: str) -> str:
        """cpu, or gpu when this llama.cpp build can offload; "auto" takes the GPU if there is one."""
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        if device == "gpu" and not gpu:
            raise NoCompatibleRuntimeError(
                "device 'gpu' requested but this llama-cpp-python build has no GPU offload "
                "(CPU-only build); use device='cpu', or reinstall llama-cpp-python with a GPU "
                "backend (e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\" or \"-DGGML_VULKAN=on\")",
                {"llamacpp": "no GPU offload in this build"},
            )
        return "gpu" if device in ("gpu", "auto") and gpu else "cpu"

    def _load_model(self, path: Path, options: RuntimeOptions) -> Any:
        params = llama_cpp.llama_model_default_params()
        default_layers = 999 if self.device == "gpu" else 0  # all layers offloaded on a GPU
        params.n_gpu_layers = int(options.extra.get("n_gpu_layers", default_layers))
        params.use_mmap = bool(options.extra.get("use_mmap", True))
        try:
            return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except (ValueError, RuntimeError, OSError):
            raise InvalidModelError(
                f"{path}: llama.cpp could not load the model ({_native_reason()}); "
                "re-convert it or update llama-cpp-python"
            ) from None

    def _make_context(self, options: RuntimeOptions) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        kv_type = str(options.extra.get("kv_type", "f16")).lower()
        if kv_type not in KV_TYPES:
            raise InvalidInputError(f"unknown kv_type {kv_type!r}; use one of: {', '.join(KV_TYPES)}")
        params.type_k = params.type_v = KV_TYPES[kv_type]
        if kv_type not in ("f32", "f16"):  # llama.cpp needs flash attention for a quantized V cache
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.kv_type = kv_type
        flash = options.extra.get("flash_attn")  # None: llama.cpp decides (auto)
        if flash is not None:
            params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        try:
            return _internals.LlamaContext(model=self._model, params=params, verbose=False)
        except (ValueError, RuntimeError):
            raise BackendError(
                f"{self.path}: llama.cpp could not create a context of {self.n_ctx} tokens "
                f"({_native_reason()}); try a smaller n_ctx"
            ) from None

    @property
    def n_past(self) -> int:
        """Number of positions currently held in the KV cache."""
        return self._n_past

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the state; logits of the last token (or of every token)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        if self._n_past + n > self.n_ctx:
            raise ContextOverflowError(
                f"{self._n_past} tokens in context + {n} new > context {self.n_ctx}; "
                "load the model with a larger n_ctx"
            )
        rows = []
        for start in range(0, n, self.n_batch):
            chunk = list(tokens[start:start + self.n_batch])
            self._batch.set_batch(batch=chunk, n_past=self._n_past, logits_all=all_logits)
            try:
                self._ctx.decode(self._batch)
            except RuntimeError:
                raise BackendError(f"{self.path}: llama_decode failed ({_native_reason()})") from None
            self._n_past += len(chunk)
            if all_logits:
                ptr = llama_cpp.llama_get_logits(self._ctx.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab)).copy())
        if all_logits:
            return np.concatenate(rows, axis=0)
        ptr = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def trim(self, n_keep: int) -> None:
        """Drop every KV position from ``n_keep`` on."""
        if n_keep < self._n_past:
            self._ctx.kv_cache_seq_rm(0, n_keep, -1)
            self._n_past = max(0, n_keep)

    def reset(self) -> None:
        """Empty the KV cache."""
        self._ctx.kv_cache_clear()
        self._n_past = 0

    def info(self) -> dict[str, Any]:
        """What runs where: backend, device, threads, context, file."""
        return {
            "backend": self.backend,
            "device": self.device,
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "kv_type": self.kv_type,
            "model_file": str(self.path),
            "llama_cpp_version": getattr(llama_cpp, "__version__", "unknown"),
            "file_type": self._metadata.get("general.file_type"),
        }

    def close(self) -> None:
        """Free the native context and model."""
        for obj in (getattr(self, "_batch", None), getattr(self, "_ctx", None),
                    getattr(self, "_model", None)):
            if obj is not None:
                obj.close()
        self._batch = self._ctx = self._model = None  # type: ignore[assignment]


def open(path: Path, options: RuntimeOptions) -> LlamaCppRuntime:  # noqa: A001 - registry hook
    """Open a GGUF file with llama.cpp (the registry's entry point)."""
    return LlamaCppRuntime(path, options)
