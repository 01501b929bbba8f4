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
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import (
    BackendError,
    ContextOverflowError,
    InvalidInputError,
    InvalidModelError,
    KVBudgetError,
    MissingDependencyError,
    ModelClosedError,
    NoCompatibleRuntimeError,
    SessionStateError,
)
from edgellm.gguf_meta import read_gguf_spec
from edgellm.kvcache import KV_PRECISIONS, KVAbility, KVCache
from edgellm.runtimes.base import RuntimeOptions, file_fingerprint

try:
    import llama_cpp
    from llama_cpp import _internals
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("llama_cpp", "llama", "the llama.cpp backend") from exc

logger = logging.getLogger(__name__)

__all__ = ["LlamaCppEngine", "LlamaCppSession", "LlamaCppTokenizer", "open", "open_vocab"]

#: KV cache element types (ggml type ids, ggml.h ``enum ggml_type``).
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}
#: Most sessions one llama_context holds (llama.cpp's LLAMA_MAX_SEQ is 256; each stream costs
#: an output row of n_vocab floats).
MAX_STREAMS = 16
_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=20)
_BUFFER_LOG: list[str] = []  # "... buffer size = ..." lines, read after each context is made
_BACKEND_READY = False


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace").rstrip()
    if line:
        _LOG_TAIL.append(line)
        if "buffer size" in line:
            _BUFFER_LOG.append(line)
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
        self._controls: dict[str, int] | None = None

    def _text(self, token: int | None) -> str | None:
        if token is None:
            return None
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def close(self) -> None:
        """Forget the vocabulary (its model is being freed): later calls raise, never crash."""
        self._vocab = None

    def _live(self) -> Any:
        if self._vocab is None:
            raise ModelClosedError("this llama.cpp model is closed; load it again with edgellm.load()")
        return self._vocab

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS prepended when the model wants it and add_special)."""
        self._live()
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

    def _id(self, token: int) -> int:
        # llama.cpp indexes its token table with .at(): an id outside it throws a C++ exception
        # through the C API, which aborts the process (detokenize([-1]) did).
        if not 0 <= token < self.vocab_size:
            raise InvalidInputError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return token

    def token_bytes(self, token: int) -> bytes:
        """Raw bytes of one token's piece (special tokens rendered as their text)."""
        n = llama_cpp.llama_token_to_piece(self._live(), self._id(token), self._buf, len(self._buf), 0, True)
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
        return bool(llama_cpp.llama_vocab_is_control(self._live(), self._id(token)))

    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the control tokens: what llama_tokenize's ``parse_special`` matches
        and ``parse_special=False`` leaves as text (llama-vocab.cpp ``tokenizer_st_partition``)."""
        if self._controls is None:
            vocab = self._live()
            self._controls = {self._text(i) or "": i for i in range(self.vocab_size)
                              if llama_cpp.llama_vocab_is_control(vocab, i)}
            self._controls.pop("", None)
        return dict(self._controls)


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


def _buffer_sizes(lines: list[str]) -> dict[str, int]:
    """``{"kv": bytes, "compute": bytes, "output": bytes}`` from llama.cpp's context-creation log.

    llama.cpp reports each buffer it allocates ("CPU KV buffer size = 11.25 MiB", "CPU
    compute buffer size = 15.3 MiB"); these are the backend's own numbers, not a formula.
    """
    sizes: dict[str, int] = {}
    for line in lines:
        m = _BUFFER_LINE.search(line)
        if m:
            key = m[1].lower()
            sizes[key] = sizes.get(key, 0) + int(float(m[2]) * 2**20)
    return sizes


_BUFFER_LINE = re.compile(r"\b(KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")


class _Pool:
    """One llama_context holding ``streams`` sessions of ``cells`` tokens each.

    With ``kv_unified=False`` llama.cpp gives every sequence id its own KV stream of
    ``n_ctx / n_seq_max`` cells, so a session attends only to its own cells, and all the
    sessions of a pool share one compute buffer. Decode calls on one pool are serialised
    by ``lock``.
    """

    def __init__(self, ctx: Any, streams: int, cells: int, batch: Any, step: int,
                 buffers: dict[str, int]) -> None:
        self.ctx = ctx
        self.step = step  # tokens per llama_decode call (the batch's size)
        self.streams = streams
        self.cells = cells
        self.batch = batch
        self.buffers = buffers
        self.free = list(range(streams))
        self.lock = threading.Lock()
        self.memory = llama_cpp.llama_get_memory(ctx.ctx)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


class LlamaCppEngine:
    """A GGUF model loaded once by llama.cpp; its sessions are KV streams of shared contexts.

    Sessions of one size share a context (a *pool*): at most as many streams as the
    ``kv_budget`` holds sessions of that size (up to :data:`MAX_STREAMS`), one compute buffer
    for all of them. Measured once by hand (a throwaway script, not a benchmark in this
    repository) on SmolLM2-135M Q4_1, 4 sessions of 512 tokens each filled with 500 tokens:
    +64 MiB over the loaded model in one 4-stream context, +113 MiB in four contexts (each
    context has its own ~15 MiB compute buffer) — so streams it is. ``benchmarks/bench_kv.py``
    measures the chosen shape: RSS with 4 sessions 1.08x the loaded model plus 4 caches.
    """

    backend = "llamacpp"

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        _init_backend()
        self.path = path
        self.spec, metadata = read_gguf_spec(path)  # validates before native code sees the file
        self._metadata = metadata
        self.device = self._pick_device(options.device)
        self.thread_choice = options.thread_choice()
        self.threads = self.thread_choice.count
        self.tuner = self.thread_choice.tuner(self._set_threads)  # None unless threads are automatic
        self.default_ctx = options.context_for(self.spec)
        self.max_ctx = self.spec.max_positions
        self.n_batch = int(options.extra.get("n_batch", 512))
        self.kv_precision = options.kv_precision or "f16"
        self._options = options
        self._budget = options.kv_budget_bytes
        self._model = self._load_model(path, options)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._model.vocab))
        self.tokenizer = LlamaCppTokenizer(self._model, metadata)
        self._pools: list[_Pool] = []
        self._lock = threading.Lock()
        self._fingerprint: str | None = None

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
        try:  # llama.cpp's log goes through _log_callback; fd 2 is left alone so that an abort's
            # GGML_ASSERT line (the only trace a crash leaves) still reaches the user
            return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except (ValueError, RuntimeError, OSError):
            raise InvalidModelError(
                f"{path}: llama.cpp could not load the model ({_native_reason()}); "
                "re-convert it or update llama-cpp-python"
            ) from None

    # -- sessions -------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer at :attr:`kv_precision` (ggml block sizes)."""
        return self.spec.kv_bytes_per_token(KV_PRECISIONS[self.kv_precision])

    def open_session(self, n_ctx: int) -> LlamaCppSession:
        """A session of ``n_ctx`` tokens: a free stream of a pool of that size, or a new pool."""
        if self._model is None:
            raise ModelClosedError(f"{self.path}: this model is closed; load it again")
        with self._lock:
            # a pool of this size (llama.cpp pads a stream to a multiple of 256 cells)
            pool = next((p for p in self._pools if p.free and 0 <= p.cells - n_ctx < 256), None)
            if pool is None:
                pool = self._new_pool(n_ctx)
                self._pools.append(pool)
            seq = pool.free.pop(0)
        return LlamaCppSession(self, pool, seq, n_ctx)

    def _new_pool(self, n_ctx: int) -> _Pool:
        bpt = self.kv_bytes_per_token()
        allocated = sum(p.streams * p.cells for p in self._pools) * bpt
        streams = 1
        if self._budget is not None:
            if allocated + n_ctx * bpt > self._budget:
                raise KVBudgetError(
                    f"{self.path}: a session of {n_ctx} tokens does not fit beside the KV streams "
                    f"already allocated ({allocated} of {self._budget} bytes, in pools of "
                    f"{sorted({p.cells for p in self._pools})} tokens); open sessions of those sizes "
                    "or load with a larger kv_budget"
                )
            streams = max(1, min(MAX_STREAMS, (self._budget - allocated) // (n_ctx * bpt)))
        _BUFFER_LOG.clear()
        ctx = self._make_context(n_ctx, streams)
        buffers = _buffer_sizes(_BUFFER_LOG)
        cells = int(llama_cpp.llama_n_ctx_seq(ctx.ctx))
        step = min(self.n_batch, n_ctx)
        batch = _internals.LlamaBatch(n_tokens=step, embd=0, n_seq_max=1, verbose=False)
        logger.debug("llama.cpp pool: %d stream(s) of %d cells, buffers %s", streams, cells, buffers)
        return _Pool(ctx, streams, cells, batch, step, buffers)

    def _make_context(self, n_ctx: int, streams: int) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * streams
        params.n_batch = params.n_ubatch = min(self.n_batch, n_ctx)
        params.n_seq_max = streams
        params.kv_unified = False  # one KV stream per session: attention never spans another's cells
        params.n_threads = params.n_threads_batch = self.threads
        params.type_k = params.type_v = KV_TYPES[self.kv_precision]
        if self.kv_precision not in ("f32", "f16"):  # llama.cpp needs flash attention for a quantized V
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        flash = self._options.extra.get("flash_attn")  # None: llama.cpp decides (auto)
        if flash is not None:
            params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        try:
            return _internals.LlamaContext(model=self._model, params=params, verbose=False)
        except (ValueError, RuntimeError):
            raise BackendError(
                f"{self.path}: llama.cpp could not create a context of {streams} x {n_ctx} tokens "
                f"({_native_reason()}); try a smaller n_ctx or kv_budget"
            ) from None

    def _release(self, pool: _Pool, seq: int) -> None:
        with self._lock:
            llama_cpp.llama_memory_seq_rm(pool.memory, seq, -1, -1)
            pool.free.append(seq)
            if len(pool.free) == pool.streams and pool in self._pools:
                self._pools.remove(pool)  # no session left: free its KV and compute buffers
                pool.close()

    # -- facts ----------------------------------------------------------------------------

    def memory(self) -> dict[str, int | None]:
        """Weights (llama.cpp's tensor bytes) and compute buffers (as llama.cpp reported them)."""
        if self._model is None:
            return {"weights": 0, "compute": 0}
        with self._lock:
            compute = sum(p.buffers.get("compute", 0) + p.buffers.get("output", 0) for p in self._pools)
        return {"weights": int(llama_cpp.llama_model_size(self._model.model)), "compute": compute}

    def _set_threads(self, n: int) -> None:
        """Decode and prefill on ``n`` threads from the next call on (every context of the engine)."""
        with self._lock:
            self.threads = n
            for pool in self._pools:
                with pool.lock:  # never while another session decodes on this context
                    llama_cpp.llama_set_n_threads(pool.ctx.ctx, n, n)

    def fingerprint(self) -> str:
        """Names the weights: size and SHA-256 of the GGUF header and of samples of its data."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.path)
        return self._fingerprint

    def info(self) -> dict[str, Any]:
        """What runs where: backend, device, threads, context, file."""
        with self._lock:
            pools = [{"streams": p.streams, "cells": p.cells, "free": len(p.free),
                      "buffers": dict(p.buffers)} for p in self._pools]
        return {
            "backend": self.backend,
            "device": self.device,
            "threads": self.threads,
            "threads_reason": self.thread_choice.reason,
            "threads_checks": list(self.tuner.history) if self.tuner else None,
            "n_ctx": self.default_ctx,
            "n_batch": self.n_batch,
            "kv_precision": self.kv_precision,
            "pools": pools,
            "model_file": str(self.path),
            "llama_cpp_version": getattr(llama_cpp, "__version__", "unknown"),
            "file_type": self._metadata.get("general.file_type"),
        }

    def close(self) -> None:
        """Free every context and the model."""
        with self._lock:
            for pool in self._pools:
                pool.close()
            self._pools = []
            self.tokenizer.close()
            if self._model is not None:
                self._model.close()
            self._model = None


class LlamaCppSession:
    """One conversation: sequence ``seq`` of a pool, with its own KV stream (a ``BackendSession``)."""

    def __init__(self, engine: LlamaCppEngine, pool: _Pool, seq: int, n_ctx: int) -> None:
        self._engine = engine
        self._pool = pool
        self._seq = seq
        self.n_ctx = n_ctx
        self._n_past = 0
        self._closed = False
        abilities = frozenset(KVAbility) if llama_cpp.llama_memory_can_shift(pool.memory) else \
            frozenset({KVAbility.TRIM, KVAbility.SNAPSHOT})
        self.cache = KVCache(n_ctx, engine.kv_bytes_per_token(), engine.kv_precision, abilities,
                             self._held_bytes, lambda: self._n_past)

    def _held_bytes(self) -> int:
        """llama.cpp's own size of this sequence's state (its cells' K and V, plus a header)."""
        if self._closed:
            return 0
        with self._pool.lock:
            return int(llama_cpp.llama_state_seq_get_size(self._pool.ctx.ctx, self._seq))

    @property
    def n_past(self) -> int:
        """Number of positions currently held in the KV cache."""
        return self._n_past

    def _check_open(self) -> None:
        if self._closed or self._engine._model is None:
            raise ModelClosedError(f"{self._engine.path}: this session is closed; open another")

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the cache; logits of the last token (or of every token)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        self._check_open()
        if self._n_past + n > self.n_ctx:
            raise ContextOverflowError(
                f"{self._n_past} tokens in the cache + {n} new > its {self.n_ctx} tokens; "
                "open the session with a larger n_ctx"
            )
        pool, vocab = self._pool, self._engine.n_vocab
        rows = []
        step = pool.step
        with pool.lock:
            for start in range(0, n, step):
                chunk = tokens[start:start + step]
                _fill(pool.batch.batch, chunk, self._n_past, self._seq, all_logits)
                try:
                    pool.ctx.decode(pool.batch)
                except RuntimeError:
                    raise BackendError(
                        f"{self._engine.path}: llama_decode failed ({_native_reason()})") from None
                self._n_past += len(chunk)
                if all_logits:
                    ptr = llama_cpp.llama_get_logits(pool.ctx.ctx)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), vocab)).copy())
            if all_logits:
                return np.concatenate(rows, axis=0)
            ptr = llama_cpp.llama_get_logits_ith(pool.ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(vocab,)).copy()  # the pool's buffer is shared

    def trim(self, n_keep: int) -> None:
        """Drop every position from ``n_keep`` on."""
        self._check_open()
        if n_keep < self._n_past:
            with self._pool.lock:
                llama_cpp.llama_memory_seq_rm(self._pool.memory, self._seq, max(0, n_keep), -1)
            self._n_past = max(0, n_keep)

    def shift(self, start: int, n_discard: int) -> None:
        """Drop positions ``[start, start + n_discard)`` and move the later ones down.

        llama.cpp re-applies RoPE to the moved keys (its K-shift) at the next decode.
        """
        self._check_open()
        mem = self._pool.memory
        with self._pool.lock:
            llama_cpp.llama_memory_seq_rm(mem, self._seq, start, start + n_discard)
            llama_cpp.llama_memory_seq_add(mem, self._seq, start + n_discard, -1, -n_discard)
        self._n_past -= n_discard

    def save_state(self) -> bytes:
        """llama.cpp's serialised state of this sequence (its cells' K and V)."""
        self._check_open()
        ctx = self._pool.ctx.ctx
        with self._pool.lock:
            size = llama_cpp.llama_state_seq_get_size(ctx, self._seq)
            buf = (ctypes.c_uint8 * size)()
            written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, self._seq)
        return bytes(buf[:written])

    def load_state(self, data: bytes, n_tokens: int) -> None:
        """Put back what :meth:`save_state` gave (into this session's stream)."""
        self._check_open()
        ctx = self._pool.ctx.ctx
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        with self._pool.lock:
            llama_cpp.llama_memory_seq_rm(self._pool.memory, self._seq, -1, -1)
            read = llama_cpp.llama_state_seq_set_data(ctx, buf, len(data), self._seq)
        if read == 0:
            raise SessionStateError(
                f"{self._engine.path}: llama.cpp refused the saved state ({_native_reason()}); "
                "it was saved from another model or with other KV settings"
            )
        self._n_past = n_tokens

    def reset(self) -> None:
        """Empty the KV cache."""
        self.trim(0)

    def close(self) -> None:
        """Free this session's stream for another session."""
        if not self._closed:
            self._closed = True
            if self._engine._model is not None:
                self._engine._release(self._pool, self._seq)


def _fill(batch: Any, tokens: Sequence[int], n_past: int, seq: int, all_logits: bool) -> None:
    """Write ``tokens`` at positions ``n_past...`` of sequence ``seq`` into a llama_batch."""
    n = len(tokens)
    batch.n_tokens = n
    for i, t in enumerate(tokens):
        batch.token[i] = int(t)
        batch.pos[i] = n_past + i
        batch.seq_id[i][0] = seq
        batch.n_seq_id[i] = 1
        batch.logits[i] = all_logits or i == n - 1


def open(path: Path, options: RuntimeOptions) -> LlamaCppEngine:  # noqa: A001 - registry hook
    """Open a GGUF file with llama.cpp (the registry's entry point)."""
    return LlamaCppEngine(path, options)
