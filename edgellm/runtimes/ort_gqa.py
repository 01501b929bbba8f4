"""ONNX Runtime engine for edgellm's builder graphs (graph contract ``gqa-shared-kv/1``).

The graph (:mod:`edgellm.converters.onnx_decoder`) runs GroupQueryAttention with past and
present sharing one buffer, so a session's KV cache is updated *in place*: each layer owns
one key and one value buffer of ``[1, kv_heads, n_ctx, head_dim]``, allocated when the session
opens (``np.zeros``: pages are committed only as the context fills) and bound with I/O binding
as both the past input and the present output. One copy of the KV cache, never moved, never
grown; ``trim`` only lowers the position count (the next run overwrites what lies beyond it).

Everything is bound by the manifest's ``graph`` record (input, output and KV names, layout,
dtype, sharing): nothing is guessed from names, and a graph that does not have exactly the
recorded inputs and outputs is refused. :func:`edgellm.runtimes.onnxruntime.open` picks this
engine when the record's contract is in :data:`CONTRACTS`. Token ids, the attention mask
(ones), ``logits_to_keep`` (1 unless every row is asked for) and the logits are preallocated,
so a decode step allocates no array. This module imports onnxruntime, numpy and edgellm only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import (
    BackendError,
    ContextOverflowError,
    InvalidInputError,
    InvalidModelError,
    ModelClosedError,
    SessionStateError,
)
from edgellm.kvcache import KVAbility, KVCache
from edgellm.kvcache.arrays import pack_arrays, unpack_arrays
from edgellm.kvcache.rope import rotate_keys
from edgellm.runtimes.base import RuntimeOptions
from edgellm.runtimes.onnxruntime import ORTEngine, _KVSlot, check_tokens

logger = logging.getLogger(__name__)

__all__ = ["CONTRACTS", "GQAEngine", "GQASession", "graph_record"]

#: Graph contracts this engine binds (the manifest's ``graph.contract``).
CONTRACTS = ("gqa-shared-kv/1",)


def graph_record(folder: Path) -> dict[str, Any] | None:
    """The manifest's ``graph`` record of an artifact folder, or None when it has none."""
    from edgellm.artifact import MANIFEST_NAME, read_manifest

    if not (folder / MANIFEST_NAME).is_file():
        return None
    record = read_manifest(folder).get("graph")
    return record if isinstance(record, dict) else None


class GQAEngine(ORTEngine):
    """A builder graph loaded once; its sessions each own one in-place KV buffer per tensor."""

    def __init__(self, path: Path, options: RuntimeOptions, record: Mapping[str, Any]) -> None:
        self.record = dict(record)
        self._check_record(Path(path))
        super().__init__(path, options)
        self.max_ctx = int(self.record.get("max_positions") or self.spec.max_positions)
        self._check_ctx(self.default_ctx)
        names = self.record["inputs"]
        self.in_ids, self.in_mask = names["input_ids"], names["attention_mask"]
        self.in_keep = names.get("logits_to_keep")
        self.out_logits = self.record["outputs"]["logits"]

    def _check_record(self, path: Path) -> None:
        contract = self.record.get("contract")
        if contract not in CONTRACTS:
            raise InvalidModelError(
                f"{path}: graph contract {contract!r} is not one this engine runs "
                f"({', '.join(CONTRACTS)}); re-convert with `edgellm convert ... --format onnx`")
        kv = self.record.get("kv") or {}
        if not kv.get("past_present_share_buffer") or kv.get("layout") != "BNSH":
            raise InvalidModelError(f"{path}: the graph record says KV layout {kv.get('layout')!r}, "
                                    f"shared={kv.get('past_present_share_buffer')}; this engine needs "
                                    "BNSH with one shared buffer: re-convert the model")

    def _names(self) -> tuple[list[tuple[str, str]], list[str], list[str]]:
        """(past, present) KV name pairs, the token inputs and the outputs the record names."""
        kv, rec = self.record["kv"], self.record
        pairs = [(kv[f"past_{k}"] % i, kv[f"present_{k}"] % i)
                 for i in range(int(kv["n_layers"])) for k in ("key", "value")]
        tokens = [rec["inputs"]["input_ids"], rec["inputs"]["attention_mask"]]
        return pairs, tokens, [rec["outputs"]["logits"]]

    def _kv_slots(self) -> list[_KVSlot]:
        """KV tensors from the record; the graph must have exactly the recorded inputs and outputs."""
        pairs, tokens, outputs = self._names()
        want_in = set(tokens) | {p for p, _ in pairs}
        want_out = set(outputs) | {q for _, q in pairs}
        have_out = {o.name for o in self._session.get_outputs()}
        missing = sorted(want_in - set(self._inputs)) + sorted(want_out - have_out)
        extra = sorted(set(self._inputs) - want_in)
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unrecorded input {extra[0]!r}"
            raise InvalidModelError(f"{self.path}: the graph does not match its manifest record ({what}); "
                                    "re-convert the model")
        kv = self.record["kv"]
        return [_KVSlot(p, q, int(kv["kv_heads"]), int(kv["head_dim"])) for p, q in pairs]

    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer, once: past and present are one buffer."""
        return sum(slot.elements(1) for slot in self.slots) * np.dtype(self.kv_dtype).itemsize

    def open_session(self, n_ctx: int) -> GQASession:
        """A session of ``n_ctx`` tokens with its own in-place KV buffers."""
        if self._session is None:
            raise ModelClosedError(f"{self.path}: this model is closed; load it again")
        self._check_ctx(n_ctx)
        return GQASession(self, n_ctx)

    def _check_ctx(self, n_ctx: int) -> None:
        if n_ctx > self.max_ctx:
            raise InvalidInputError(f"n_ctx {n_ctx} is beyond the {self.max_ctx} positions "
                                    f"{self.path.name}'s rotary tables cover; use n_ctx <= {self.max_ctx}")

    def info(self) -> dict[str, Any]:
        """The engine's facts, with the graph contract and the one-copy KV layout."""
        return {**super().info(), "graph_contract": self.record.get("contract"), "kv_shared_buffer": True}


class GQASession:
    """One conversation on a builder graph: one KV buffer per tensor, bound as past and present."""

    def __init__(self, engine: GQAEngine, n_ctx: int) -> None:
        self._engine = engine
        self.n_ctx = n_ctx
        self.n_batch = min(engine.n_batch, n_ctx)
        e = engine
        self._kv = [np.zeros((1, s.heads, n_ctx, s.head_dim), dtype=e.kv_dtype) for s in e.slots]
        self._ids = np.zeros(self.n_batch, dtype=e.ids_dtype)
        self._mask = np.ones(n_ctx, dtype=e.mask_dtype)
        self._keep = np.ones(1, dtype=np.int64)
        self._logits = np.zeros(self.n_batch * e.n_vocab, dtype=np.float32)
        self._binding = e._session.io_binding()
        for slot, buf in zip(e.slots, self._kv, strict=True):  # the same memory, both directions
            shape, ptr = list(buf.shape), int(buf.ctypes.data)
            self._binding.bind_input(slot.past, "cpu", 0, e.kv_dtype, shape, ptr)
            self._binding.bind_output(slot.present, "cpu", 0, e.kv_dtype, shape, ptr)
        self._past = 0
        self._bound: tuple[int, int] = (0, 0)  # (tokens, logits rows) the binding has now
        abilities = frozenset(KVAbility) if e.rope_omega is not None else \
            frozenset({KVAbility.TRIM, KVAbility.SNAPSHOT})
        self.cache = KVCache(n_ctx, e.kv_bytes_per_token(), e.kv_precision, abilities, self._held_bytes,
                             lambda: self._past)

    def _held_bytes(self) -> int:
        """The written part of the buffers (np.zeros pages beyond it are never committed)."""
        return 0 if self._binding is None else self._engine.kv_bytes_per_token() * self._past

    @property
    def n_past(self) -> int:
        """Positions held in the KV buffers."""
        return self._past

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` (in ``n_batch`` chunks); float32 logits of the last or every token."""
        eng = self._engine
        if self._binding is None or eng._session is None:
            raise ModelClosedError(f"{eng.path}: this session is closed; open another")
        if self._past + len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{self._past} tokens in the cache + {len(tokens)} new > its "
                                       f"{self.n_ctx} tokens; open the session with a larger n_ctx")
        ids = check_tokens(tokens, eng.n_vocab)
        out = np.empty((len(ids), eng.n_vocab), dtype=np.float32) if all_logits else None
        for start in range(0, len(ids), self.n_batch):
            rows = self._run(ids[start:start + self.n_batch], all_logits)
            if out is not None:
                out[start:start + len(rows)] = rows
        return out if out is not None else rows[-1].copy()

    def _run(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        eng, bind = self._engine, self._binding
        m = len(ids)
        total = self._past + m
        keep = m if all_logits or eng.in_keep is None else 1
        self._ids[:m] = ids
        self._keep[0] = keep
        if self._bound != (m, keep):  # a decode step rebinds only the mask (its length grows)
            bind.bind_input(eng.in_ids, "cpu", 0, eng.ids_dtype, [1, m], int(self._ids.ctypes.data))
            if eng.in_keep is not None:
                bind.bind_input(eng.in_keep, "cpu", 0, np.int64, [1], int(self._keep.ctypes.data))
            bind.bind_output(eng.out_logits, "cpu", 0, np.float32, [1, keep, eng.n_vocab],
                             int(self._logits.ctypes.data))
            self._bound = (m, keep)
        bind.bind_input(eng.in_mask, "cpu", 0, eng.mask_dtype, [1, total], int(self._mask.ctypes.data))
        eng.run(bind)  # a failed run may leave new positions half written; n_past is unchanged
        self._past = total
        return self._logits[: keep * eng.n_vocab].reshape(keep, eng.n_vocab)

    def trim(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions (no copy: later runs overwrite the rest)."""
        self._past = min(self._past, max(0, int(n_keep)))

    def shift(self, start: int, n_discard: int) -> None:
        """Drop positions ``[start, start + n_discard)`` in place; later keys re-rotated to their
        new positions (GroupQueryAttention caches rotated keys, halves paired: rotary_interleaved=0)."""
        omega = self._engine.rope_omega
        if omega is None:
            raise BackendError(f"{self._engine.path}: this model's RoPE cannot be shifted; re-prefill")
        past, n = self._past, n_discard
        for slot, buf in zip(self._engine.slots, self._kv, strict=True):
            moved = buf[0, :, start + n:past]
            buf[0, :, start:past - n] = rotate_keys(moved, -n, omega) if slot.is_key else moved.copy()
        self._past = past - n

    def save_state(self) -> bytes:
        """The filled part of every KV tensor, named by its graph input."""
        views = [buf[0, :, : self._past] for buf in self._kv]
        return pack_arrays(zip([s.past for s in self._engine.slots], views, strict=True))

    def load_state(self, data: bytes, n_tokens: int) -> None:
        """Put back what :meth:`save_state` gave."""
        eng = self._engine
        arrays = unpack_arrays(data, str(eng.path))
        if [n for n, _ in arrays] != [s.past for s in eng.slots] or n_tokens > self.n_ctx:
            raise SessionStateError(f"{eng.path}: the saved KV tensors do not match this model's")
        for buf, (_, src) in zip(self._kv, arrays, strict=True):
            dst = buf[0, :, :n_tokens]
            if src.shape != dst.shape:
                raise SessionStateError(f"{eng.path}: a saved KV tensor has shape {src.shape}, "
                                        f"this model's is {dst.shape}")
            np.copyto(dst, src)
        self._past = n_tokens

    def reset(self) -> None:
        """Empty the KV cache (the buffers stay allocated)."""
        self._past = 0

    def close(self) -> None:
        """Release the binding and the buffers."""
        self._binding = None
        self._kv = []
