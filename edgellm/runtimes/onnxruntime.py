"""The ONNX Runtime backend: a decoder with explicit KV inputs, bound by its graph contract.

:func:`open` reads the contract from the manifest's ``graph`` record (:data:`GRAPH_ENGINES`):
edgellm's builder graphs (``gqa-shared-kv/1``: one in-place KV buffer) run on
:class:`edgellm.runtimes.ort_gqa.GQAEngine`; optimum exports (``optimum-concat/1``, or a
folder without a record) on :class:`ORTEngine`, described below.

The artifact is a folder: ``model.onnx`` (plus an optional external-data file such as
``model.onnx.data``), ``config.json`` (read into a :class:`~edgellm.spec.ModelSpec`) and the
tokenizer files (read by :class:`~edgellm.text.tokenizer.HFTokenizer`). The graph is what
``optimum.exporters.onnx.main_export(..., task="text-generation-with-past")`` writes: inputs
``input_ids``, ``attention_mask``, optionally ``position_ids`` (Gemma's graphs compute them)
and ``past_key_values.{i}.key|value`` shaped ``[batch, kv_heads, past, head_dim]``; outputs
``logits`` and ``present.{i}.key|value`` shaped ``[batch, kv_heads, past + n, head_dim]``.
At run time this module imports only onnxruntime, numpy and edgellm, never optimum, onnx,
transformers or torch.

One ``InferenceSession`` (the engine) serves every session; each session owns its KV cache,
which never moves and never grows. The graph concatenates past and new
(``present = concat(past, new)``), so each KV tensor owns two flat buffers of
``n_ctx * kv_heads * head_dim`` elements, allocated once per session (``np.zeros``: pages are
only committed as the context fills) and bound with the session's own I/O binding: past is
the first ``kv_heads * past * head_dim`` elements of one buffer viewed as ``[1, h, past, d]``,
present is written into the other viewed as ``[1, h, past + n, d]``, and the two swap roles
after each run (ping-pong, twice the KV bytes of an in-place cache, which this graph cannot
do). Logits, token ids, positions and the attention mask are preallocated too, so a decode
step allocates no array. :meth:`ORTSession.trim` re-lays the kept prefix into the other
buffer.

Execution providers, session options and error translation live in
:mod:`edgellm.runtimes.ort_setup` (shared with the builder-graph engine). Before ONNX Runtime
opens the model, :func:`~edgellm.runtimes.onnx_files.external_data_files` reads the
external-data locations from the ONNX protobuf itself and refuses any that leave the model
folder or are missing. After it opened the model on the CPU, the weights it copied into its
heap are moved onto huge pages (:mod:`edgellm.runtimes.hugepages`, option ``huge_pages``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import (
    BackendError,
    ContextOverflowError,
    InvalidInputError,
    InvalidModelError,
    MissingDependencyError,
    ModelClosedError,
    ModelNotFoundError,
    SessionStateError,
)
from edgellm.kvcache import KVAbility, KVCache
from edgellm.kvcache.arrays import pack_arrays, release_freed_memory, unpack_arrays
from edgellm.kvcache.rope import rotate_keys, shift_frequencies
from edgellm.runtimes.base import RuntimeOptions, file_fingerprint
from edgellm.runtimes.hugepages import collapse_resident, resident_ranges
from edgellm.runtimes.onnx_files import _SUBMESSAGES, ExternalData, external_data_files  # noqa: F401
from edgellm.runtimes.ort_setup import (  # noqa: F401 - re-exported: this module is the backend's face
    _CAUGHT,
    _CPU,
    _ORT_ERRORS,
    AUTO_ORDER,
    DEVICE_PROVIDERS,
    PROVIDER_INSTALL,
    select_providers,
    session_options,
    translate_error,
)
from edgellm.spec import ModelSpec
from edgellm.text.tokenizer import HFTokenizer

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("onnxruntime", "onnx", "the ONNX Runtime backend") from exc

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICE_PROVIDERS",
    "PROVIDER_INSTALL",
    "ExternalData",
    "ORTEngine",
    "ORTSession",
    "external_data_files",
    "open",
    "select_providers",
    "session_options",
]

#: ONNX Runtime tensor type -> numpy dtype of the buffers bound for it.
_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}

_KV_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")  # position_ids is optional
_DEFAULT_N_BATCH = 512  # prefill chunk: sizes the logits buffer (n_batch * vocab floats)
_KV_NAMES = {"float32": "f32", "float16": "f16"}  # numpy dtype -> kv_precision


# -- the runtime ------------------------------------------------------------------------


@dataclass(frozen=True)
class _KVSlot:
    """One KV tensor of the graph: its input and output names and its head layout."""

    past: str
    present: str
    heads: int
    head_dim: int

    @property
    def is_key(self) -> bool:
        return self.past.endswith(".key")

    def elements(self, positions: int) -> int:
        return self.heads * positions * self.head_dim


class ORTEngine:
    """An optimum-exported ONNX decoder loaded once; sessions own their KV buffers (an ``Engine``).

    One ``InferenceSession`` serves every session (ONNX Runtime's ``Run`` may be called from
    several threads at once); each session has its own I/O binding, KV buffers, token and
    logits buffers.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        self.path = Path(path)
        self._check_files(self.path)
        self.external_data = external_data_files(self.path)
        folder = self.path.parent
        self.spec = ModelSpec.from_hf_dir(folder)
        self.rope_omega = shift_frequencies(self.spec)  # None: sliding re-prefills
        self.tokenizer = HFTokenizer.from_dir(folder)
        self.device = options.device
        self.requested_providers = select_providers(
            options.device, ort.get_available_providers(), options.extra.get("providers"))
        self.thread_choice = options.thread_choice()
        self.threads = self.thread_choice.count
        self.default_ctx = options.context_for(self.spec)
        self.max_ctx = self.spec.max_positions
        self.n_batch = _positive(options.extra.get("n_batch", _DEFAULT_N_BATCH), "n_batch")
        want_huge = options.extra.get("huge_pages", True)
        if not isinstance(want_huge, bool):
            raise InvalidInputError(f"{self.path}: huge_pages must be True or False, got {want_huge!r}; "
                                    "pass huge_pages=False to keep the weights in 4 KiB pages")
        not_huge = self._no_huge_pages(want_huge)  # decided before loading: None means collapse
        before = resident_ranges() if not_huge is None else frozenset()
        self._session = self._open_session()
        self.huge_pages = self._collapse_weights(before) if not_huge is None else {"status": not_huge}
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self.slots = self._kv_slots()
        self.kv_dtype = self._kv_type()
        self.kv_precision = _KV_NAMES[np.dtype(self.kv_dtype).name]
        if options.kv_precision is not None and options.kv_precision != self.kv_precision:
            raise InvalidInputError(
                f"{self.path}: this graph's KV cache is {self.kv_precision} (its past_key_values "
                f"inputs), so kv_precision {options.kv_precision!r} cannot be used; convert the model "
                f"with --quant {'fp16' if options.kv_precision == 'f16' else 'fp32/int4/int8'} for that"
            )
        logits = next(o for o in self._session.get_outputs() if o.name == "logits")
        self.logits_dtype = self._dtype(logits.type, "logits")
        last = logits.shape[-1] if logits.shape else None
        self.n_vocab = last if isinstance(last, int) else int(self.spec.vocab_size)
        pos = self._inputs.get("position_ids")
        self.has_positions = pos is not None
        self.ids_dtype = self._dtype(self._inputs["input_ids"].type, "input_ids")
        self.mask_dtype = self._dtype(self._inputs["attention_mask"].type, "attention_mask")
        self.pos_dtype = self._dtype(pos.type, "position_ids") if pos is not None else np.int64
        self._fingerprint: str | None = None

    # -- loading --------------------------------------------------------------------------

    @staticmethod
    def _check_files(path: Path) -> None:
        if not path.is_file():
            raise ModelNotFoundError(f"ONNX model file {str(path)!r} does not exist")
        if path.suffix.lower() != ".onnx":
            raise InvalidModelError(f"{path}: an ONNX model is an .onnx file (model.onnx)")

    def _open_session(self) -> Any:
        try:
            # Measured on SmolLM2 int4, 2 idle cores: automatic 2 threads without spinning decoded
            # 115.7 tok/s against 162.4 with it; so only a contended count stops spinning (ONNX
            # Runtime cannot change it later: contention that starts after load is not adapted to).
            opts = session_options(self.threads, spin=not self.thread_choice.contended)
            return ort.InferenceSession(str(self.path), sess_options=opts,
                                        providers=self.requested_providers)
        except _CAUGHT as exc:
            raise translate_error(exc, self.path, "to load the model") from None

    def _no_huge_pages(self, wanted: bool) -> str | None:
        """Why the weights stay in 4 KiB pages, or None when they are to be collapsed."""
        if not wanted:
            return "off (huge_pages=False)"
        if self.requested_providers[0] != _CPU:
            return f"skipped: the weights are on {self.requested_providers[0]}"
        return None

    def _collapse_weights(self, before: frozenset[int]) -> dict[str, Any]:
        """Move the weights ONNX Runtime copied into its heap onto huge pages (CPU, Linux):
        decode reads all of them every token (:mod:`edgellm.runtimes.hugepages`)."""
        report = collapse_resident(skip=before)  # what the load added, not the host's own memory
        logger.info("%s: huge pages %s, %.0f MiB in %.0f ms", self.path, report.status,
                    report.bytes / 2**20, report.seconds * 1e3)
        return report.to_dict()

    def _kv_slots(self) -> list[_KVSlot]:
        """The graph's KV tensors, checked: every past input has its present output."""
        outputs = {o.name for o in self._session.get_outputs()}
        missing = [n for n in ("input_ids", "attention_mask") if n not in self._inputs]
        missing += [] if "logits" in outputs else ["output logits"]
        unknown = [n for n in self._inputs if n not in _TOKEN_INPUTS and not _KV_INPUT.match(n)]
        if unknown:
            raise InvalidModelError(
                f"{self.path}: graph input {unknown[0]!r} is not one edgellm feeds (it feeds "
                f"{', '.join(_TOKEN_INPUTS)} and past_key_values.*); export the model with optimum "
                '(task="text-generation-with-past")'
            )
        past = sorted((int(m[1]), m[2], name) for name in self._inputs
                      if (m := _KV_INPUT.match(name)))
        if missing or not past:
            what = f"{', '.join(missing)} missing" if missing else "no past_key_values inputs"
            raise InvalidModelError(
                f"{self.path}: not a decoder with a KV cache ({what}); export it with "
                'optimum (main_export(..., task="text-generation-with-past"))'
            )
        slots = []
        for layer, kind, name in past:
            present = f"present.{layer}.{kind}"
            if present not in outputs:
                raise InvalidModelError(
                    f"{self.path}: input {name} has no matching output {present}; re-export it "
                    'with optimum (task="text-generation-with-past")'
                )
            slots.append(_KVSlot(name, present, *self._head_layout(name)))
        return slots

    def _head_layout(self, name: str) -> tuple[int, int]:
        """(kv_heads, head_dim) of a ``[batch, heads, past, head_dim]`` input."""
        shape = self._inputs[name].shape
        if len(shape) != 4:
            raise InvalidModelError(f"{self.path}: {name} has shape {shape}, expected "
                                    "[batch, kv_heads, past, head_dim]; re-export the model")
        heads = shape[1] if isinstance(shape[1], int) else self.spec.n_kv_heads
        head_dim = shape[3] if isinstance(shape[3], int) else self.spec.head_dim
        return int(heads), int(head_dim)

    def _kv_type(self) -> type[np.generic]:
        types = sorted({self._inputs[s.past].type for s in self.slots})
        if len(types) != 1:
            raise InvalidModelError(f"{self.path}: KV inputs mix the types {', '.join(types)}; "
                                    "re-export the model with one KV type")
        return self._dtype(types[0], "KV cache")

    def _dtype(self, ort_type: str, what: str) -> type[np.generic]:
        if ort_type not in _NUMPY_TYPES:
            raise InvalidModelError(
                f"{self.path}: {what} type {ort_type} is not supported (supported: "
                f"{', '.join(_NUMPY_TYPES)}); re-export the model in float32 or float16"
            )
        return _NUMPY_TYPES[ort_type]

    # -- sessions -------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer, twice: the graph reads one buffer and writes the other."""
        one = sum(slot.elements(1) for slot in self.slots) * np.dtype(self.kv_dtype).itemsize
        return 2 * one

    def open_session(self, n_ctx: int) -> ORTSession:
        """A session of ``n_ctx`` tokens with its own preallocated, I/O-bound buffers."""
        if self._session is None:
            raise ModelClosedError(f"{self.path}: this model is closed; load it again")
        return ORTSession(self, n_ctx)

    def run(self, binding: Any) -> None:
        """One graph run; ONNX Runtime's failures become edgellm errors naming the file."""
        try:
            self._session.run_with_iobinding(binding)
        except _CAUGHT as exc:
            raise translate_error(exc, self.path, "to run the model") from None

    def memory(self) -> dict[str, int | None]:
        """The model's file bytes (ONNX Runtime keeps its own copies: see the planner); no compute report."""
        files = {self.path, *(self.path.parent / r.location for r in self.external_data)}
        return {"weights": sum(f.stat().st_size for f in files), "compute": None}

    def fingerprint(self) -> str:
        """Names the weights: sizes and samples of model.onnx and its external data."""
        if self._fingerprint is None:
            data = sorted({self.path.parent / r.location for r in self.external_data})
            self._fingerprint = file_fingerprint(self.path, *data)
        return self._fingerprint

    def info(self) -> dict[str, Any]:
        """What runs where: backend, device, providers in use, threads, context, KV type."""
        return {
            "backend": self.backend,
            "device": self.device,
            "providers": list(self._session.get_providers()) if self._session else [],
            "threads": self.threads,
            "threads_reason": self.thread_choice.reason,
            "n_ctx": self.default_ctx,
            "n_batch": self.n_batch,
            "kv_precision": self.kv_precision,
            "model_file": str(self.path),
            "external_data": sorted({r.location for r in self.external_data}),
            "onnxruntime_version": ort.__version__,
            "huge_pages": self.huge_pages,
        }

    def close(self) -> None:
        """Release the InferenceSession (open sessions then fail with a clear error)."""
        self._session = None


class ORTSession:
    """One conversation: two banks of flat KV buffers bound with I/O binding (a ``BackendSession``)."""

    def __init__(self, engine: ORTEngine, n_ctx: int) -> None:
        self._engine = engine
        self.n_ctx = n_ctx
        self.n_batch = min(engine.n_batch, n_ctx)
        e = engine
        self._token_ids = np.zeros(self.n_batch, dtype=e.ids_dtype)
        self._mask = np.ones(n_ctx, dtype=e.mask_dtype)
        self._positions = np.arange(n_ctx, dtype=e.pos_dtype)
        self._logits = np.zeros(self.n_batch * e.n_vocab, dtype=e.logits_dtype)
        # Two banks of flat KV buffers; np.zeros commits pages only when they are written.
        self._kv = [[np.zeros(s.elements(n_ctx), dtype=e.kv_dtype) for s in e.slots] for _ in range(2)]
        # Addresses taken once: the arrays are never reallocated while the session lives.
        self._kv_ptrs = [[int(a.ctypes.data) for a in bank] for bank in self._kv]
        self._ptrs = {name: int(a.ctypes.data) for name, a in (
            ("input_ids", self._token_ids), ("attention_mask", self._mask),
            ("position_ids", self._positions), ("logits", self._logits))}
        self._binding = e._session.io_binding()
        self._past = 0
        self._bank = 0  # which of the two buffers of each KV tensor holds the past
        abilities = frozenset(KVAbility) if e.rope_omega is not None else \
            frozenset({KVAbility.TRIM, KVAbility.SNAPSHOT})
        self.cache = KVCache(n_ctx, e.kv_bytes_per_token(), e.kv_precision, abilities,
                             self._held_bytes, lambda: self._past)

    def _held_bytes(self) -> int:
        """The written part of both banks (np.zeros pages beyond it are never committed)."""
        if self._binding is None:
            return 0
        return self._engine.kv_bytes_per_token() * self._past

    @property
    def n_past(self) -> int:
        """Number of positions currently held in the KV cache."""
        return self._past

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the cache (in ``n_batch`` chunks); last or all logits, float32."""
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        eng = self._engine
        if self._binding is None or eng._session is None:
            raise ModelClosedError(f"{eng.path}: this session is closed; open another")
        if self._past + n > self.n_ctx:
            raise ContextOverflowError(
                f"{self._past} tokens in the cache + {n} new > its {self.n_ctx} tokens; "
                "open the session with a larger n_ctx"
            )
        ids = check_tokens(tokens, eng.n_vocab)
        out = np.empty((n, eng.n_vocab), dtype=np.float32) if all_logits else None
        for start in range(0, n, self.n_batch):
            rows = self._run(ids[start:start + self.n_batch])
            if out is not None:
                out[start:start + len(rows)] = rows
        return out if out is not None else rows[-1].astype(np.float32)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        """One graph run over ``ids`` (at most n_batch); a view of the logits buffer."""
        eng = self._engine
        m, past = len(ids), self._past
        total = past + m
        self._token_ids[:m] = ids
        bind, ptrs = self._binding, self._ptrs
        bind.bind_input("input_ids", "cpu", 0, eng.ids_dtype, [1, m], ptrs["input_ids"])
        bind.bind_input("attention_mask", "cpu", 0, eng.mask_dtype, [1, total], ptrs["attention_mask"])
        if eng.has_positions:  # a contiguous slice of 0..n_ctx-1: no copy
            ptr = ptrs["position_ids"] + past * self._positions.itemsize
            bind.bind_input("position_ids", "cpu", 0, eng.pos_dtype, [1, m], ptr)
        src, dst = self._kv_ptrs[self._bank], self._kv_ptrs[1 - self._bank]
        for slot, a, b in zip(eng.slots, src, dst, strict=True):
            bind.bind_input(slot.past, "cpu", 0, eng.kv_dtype, [1, slot.heads, past, slot.head_dim], a)
            bind.bind_output(slot.present, "cpu", 0, eng.kv_dtype,
                             [1, slot.heads, total, slot.head_dim], b)
        bind.bind_output("logits", "cpu", 0, eng.logits_dtype, [1, m, eng.n_vocab], ptrs["logits"])
        eng.run(bind)  # on failure the present buffers may be half written; the past bank is untouched
        self._bank, self._past = 1 - self._bank, total
        return self._logits[: m * eng.n_vocab].reshape(m, eng.n_vocab)

    def _views(self, bank: int, positions: int) -> list[np.ndarray]:
        """Each KV tensor of ``bank`` as ``[heads, positions, head_dim]``."""
        return [a[: s.elements(positions)].reshape(s.heads, positions, s.head_dim)
                for s, a in zip(self._engine.slots, self._kv[bank], strict=True)]

    def trim(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions: re-lay them into the other buffer of each tensor."""
        n_keep = max(0, int(n_keep))
        if n_keep >= self._past:
            return
        if n_keep:
            held, kept = self._views(self._bank, self._past), self._views(1 - self._bank, n_keep)
            for src, dst in zip(held, kept, strict=True):
                np.copyto(dst, src[:, :n_keep])
            self._bank = 1 - self._bank
        self._past = n_keep

    def shift(self, start: int, n_discard: int) -> None:
        """Drop positions ``[start, start + n_discard)``: the rest is re-laid into the other buffer,
        later keys re-rotated to their new positions (:mod:`edgellm.kvcache.rope`)."""
        omega = self._engine.rope_omega
        if omega is None:
            raise BackendError(f"{self._engine.path}: this model's RoPE cannot be shifted; re-prefill")
        past, n = self._past, n_discard
        held, dst = self._views(self._bank, past), self._views(1 - self._bank, past - n)
        for slot, src, out in zip(self._engine.slots, held, dst, strict=True):
            out[:, :start] = src[:, :start]
            moved = src[:, start + n:]
            out[:, start:] = rotate_keys(moved, -n, omega) if slot.is_key else moved
        self._bank, self._past = 1 - self._bank, past - n
        release_freed_memory()

    def save_state(self) -> bytes:
        """The filled part of every KV tensor, named by its graph input."""
        names = [s.past for s in self._engine.slots]
        return pack_arrays(zip(names, self._views(self._bank, self._past), strict=True))

    def load_state(self, data: bytes, n_tokens: int) -> None:
        """Put back what :meth:`save_state` gave."""
        arrays = unpack_arrays(data, str(self._engine.path))
        slots = self._engine.slots
        if [n for n, _ in arrays] != [s.past for s in slots] or n_tokens > self.n_ctx:
            raise SessionStateError(f"{self._engine.path}: the saved KV tensors do not match this model's")
        for dst, (_, src) in zip(self._views(0, n_tokens), arrays, strict=True):
            if src.shape != dst.shape:
                raise SessionStateError(f"{self._engine.path}: a saved KV tensor has shape {src.shape}, "
                                        f"this model's is {dst.shape}")
            np.copyto(dst, src)
        self._bank, self._past = 0, n_tokens

    def reset(self) -> None:
        """Empty the KV cache (the buffers stay allocated)."""
        self._past = 0

    def close(self) -> None:
        """Release the binding and the buffers."""
        self._binding = None
        self._kv = [[], []]
        self._kv_ptrs = [[], []]


def check_tokens(tokens: Sequence[int], n_vocab: int) -> np.ndarray:
    """``tokens`` as int64 ids, refused when empty or outside ``[0, n_vocab)``."""
    if len(tokens) == 0:
        raise ValueError("forward() needs at least one token")
    ids = np.asarray(tokens, dtype=np.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= n_vocab:
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InvalidInputError(f"token id {bad} is outside the vocabulary [0, {n_vocab})")
    return ids


def _positive(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (an int, or digits from a command line)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


#: The manifest's ``graph.contract`` -> module whose ``GQAEngine``-style class runs it
#: (``None``: :class:`ORTEngine`). A folder without a record is an optimum export.
GRAPH_ENGINES: dict[str, tuple[str, str] | None] = {
    "optimum-concat/1": None,
    "gqa-shared-kv/1": ("edgellm.runtimes.ort_gqa", "GQAEngine"),
}


def open(path: Path, options: RuntimeOptions) -> ORTEngine:  # noqa: A001 - registry hook
    """Open an ONNX decoder (model.onnx) with the engine its manifest's graph record names."""
    import importlib

    from edgellm.runtimes.ort_gqa import graph_record

    record = graph_record(Path(path).parent)
    contract = None if record is None else record.get("contract")
    if contract is not None and contract not in GRAPH_ENGINES:
        raise InvalidModelError(
            f"{path}: graph contract {contract!r} in its manifest is not one this edgellm runs "
            f"({', '.join(GRAPH_ENGINES)}); upgrade edgellm or re-convert the model")
    target = GRAPH_ENGINES.get(contract) if contract else None
    if target is None:
        return ORTEngine(path, options)
    module, cls = target
    return getattr(importlib.import_module(module), cls)(path, options, record)
