"""ONNX Runtime binding for edgellm's builder graphs (contract ``gqa-shared-kv/1``).

The graph (:mod:`edgellm.converters.onnx_decoder`) runs GroupQueryAttention with past and
present sharing one buffer, so the KV cache is updated *in place*: each layer owns one key
and one value buffer of ``[1, kv_heads, capacity, head_dim]``, allocated once (``np.zeros``:
pages are committed only as the context fills) and bound with I/O binding as both the past
input and the present output. One copy of the KV cache, never moved, never grown; ``trim``
only lowers the position count (the next run overwrites what lies beyond it).

Everything is bound by the manifest's ``graph`` record (input, output and KV names, layout,
dtype, sharing): nothing is guessed from names. Token ids, the attention mask (ones),
``logits_to_keep`` and the logits are preallocated too, so a decode step allocates no array.
This module imports onnxruntime, numpy and edgellm only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ContextOverflowError, InvalidInputError, InvalidModelError
from edgellm.runtimes.base import RuntimeOptions
from edgellm.runtimes.onnxruntime import (
    _CAUGHT,
    external_data_files,
    ort,
    select_providers,
    session_options,
    translate_error,
)
from edgellm.spec import ModelSpec
from edgellm.text.tokenizer import HFTokenizer

logger = logging.getLogger(__name__)

__all__ = ["CONTRACTS", "GQASharedKV", "graph_record", "open"]

#: Graph contracts this module binds (the manifest's ``graph.contract``).
CONTRACTS = ("gqa-shared-kv/1",)
_DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "float16": np.float16}
_DEFAULT_N_BATCH = 512


def graph_record(folder: Path) -> dict[str, Any] | None:
    """The manifest's ``graph`` record of an artifact folder, or None when it has none."""
    from edgellm.artifact import MANIFEST_NAME, read_manifest

    if not (folder / MANIFEST_NAME).is_file():
        return None
    record = read_manifest(folder).get("graph")
    return record if isinstance(record, dict) else None


class GQASharedKV:
    """A builder graph with one in-place KV buffer per layer and tensor (a ``Runtime``)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, options: RuntimeOptions, record: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        folder = self.path.parent
        self.record = dict(record or graph_record(folder) or {})
        self._check_record()
        self.external_data = external_data_files(self.path)
        self.spec = ModelSpec.from_hf_dir(folder)
        self.tokenizer = HFTokenizer.from_dir(folder)
        self.device = options.device
        self.providers = select_providers(options.device, ort.get_available_providers(),
                                          options.extra.get("providers"))
        self.threads = options.thread_count()
        self.n_ctx = options.context_for(self.spec)
        limit = int(self.record.get("max_positions") or self.spec.max_positions)
        if self.n_ctx > limit:
            raise InvalidInputError(f"n_ctx {self.n_ctx} is beyond the {limit} positions {self.path.name}'s "
                                    f"rotary tables cover; load it with n_ctx <= {limit}")
        self.n_batch = min(int(options.extra.get("n_batch", _DEFAULT_N_BATCH)), self.n_ctx)
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=session_options(self.threads),
                                                 providers=self.providers)
        except _CAUGHT as exc:
            raise translate_error(exc, self.path, "to load the model") from None
        self._check_session()
        self.n_vocab = int(self.spec.vocab_size)
        self._allocate()
        self._past = 0

    # -- checks ---------------------------------------------------------------------------
    def _check_record(self) -> None:
        contract = self.record.get("contract")
        if contract not in CONTRACTS:
            raise InvalidModelError(
                f"{self.path}: graph contract {contract!r} is not one this binding runs "
                f"({', '.join(CONTRACTS)}); re-convert with `edgellm convert ... --format onnx`")
        kv = self.record["kv"]
        if not kv.get("past_present_share_buffer") or kv.get("layout") != "BNSH":
            raise InvalidModelError(f"{self.path}: the graph record says KV layout {kv.get('layout')!r}, "
                                    f"shared={kv.get('past_present_share_buffer')}; this binding needs "
                                    "BNSH with one shared buffer: re-convert the model")
        if kv.get("dtype") not in _DTYPES:
            raise InvalidModelError(f"{self.path}: KV dtype {kv.get('dtype')!r} is not supported "
                                    f"({', '.join(_DTYPES)}); re-convert the model")

    def _names(self) -> tuple[list[str], list[str]]:
        kv, rec = self.record["kv"], self.record
        layers = range(int(kv["n_layers"]))
        past = [kv[k] % i for i in layers for k in ("past_key", "past_value")]
        present = [kv[k] % i for i in layers for k in ("present_key", "present_value")]
        inputs = [rec["inputs"]["input_ids"], rec["inputs"]["attention_mask"], *past]
        return inputs, [rec["outputs"]["logits"], *present]

    def _check_session(self) -> None:
        """The graph must have exactly the inputs and outputs the record names."""
        want_in, want_out = self._names()
        have_in = {i.name for i in self._session.get_inputs()}
        have_out = {o.name for o in self._session.get_outputs()}
        missing = [n for n in want_in if n not in have_in] + [n for n in want_out if n not in have_out]
        extra = sorted(have_in - set(want_in))
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unrecorded input {extra[0]!r}"
            raise InvalidModelError(f"{self.path}: the graph does not match its manifest record ({what}); "
                                    "re-convert the model")

    # -- buffers --------------------------------------------------------------------------
    def _allocate(self) -> None:
        kv = self.record["kv"]
        self._kv_dtype = _DTYPES[kv["dtype"]]
        self._kv_shape = [1, int(kv["kv_heads"]), self.n_ctx, int(kv["head_dim"])]
        past, present = self._names()[0][2:], self._names()[1][1:]
        self._kv = [np.zeros(self._kv_shape, dtype=self._kv_dtype) for _ in past]
        self._kv_bind = list(zip(past, present, [int(a.ctypes.data) for a in self._kv], strict=True))
        self._ids = np.zeros(self.n_batch, dtype=np.int64)
        self._mask = np.ones(self.n_ctx, dtype=np.int64)
        self._keep = np.ones(1, dtype=np.int64)
        self._logits = np.zeros(self.n_batch * self.n_vocab, dtype=np.float32)
        self._binding = self._session.io_binding()
        names = self.record["inputs"]
        self._in_ids, self._in_mask = names["input_ids"], names["attention_mask"]
        self._in_keep = names.get("logits_to_keep")
        self._out_logits = self.record["outputs"]["logits"]
        bind = self._binding
        for past_name, present_name, ptr in self._kv_bind:  # the same memory, both directions
            bind.bind_input(past_name, "cpu", 0, self._kv_dtype, self._kv_shape, ptr)
            bind.bind_output(present_name, "cpu", 0, self._kv_dtype, self._kv_shape, ptr)

    # -- Runtime protocol -----------------------------------------------------------------
    @property
    def n_past(self) -> int:
        """Positions currently held in the KV buffers."""
        return self._past

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` (in ``n_batch`` chunks); float32 logits of the last or every token."""
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        if self._session is None:
            raise InvalidInputError(f"{self.path}: this runtime is closed; open the model again")
        if self._past + n > self.n_ctx:
            raise ContextOverflowError(f"{self._past} tokens in context + {n} new > context {self.n_ctx}; "
                                       "load the model with a larger n_ctx")
        ids = np.asarray(tokens, dtype=np.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InvalidInputError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        out = np.empty((n, self.n_vocab), dtype=np.float32) if all_logits else None
        for start in range(0, n, self.n_batch):
            rows = self._run(ids[start:start + self.n_batch], all_logits)
            if out is not None:
                out[start:start + len(rows)] = rows
        return out if out is not None else rows[-1].copy()

    def _run(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        m, bind = len(ids), self._binding
        total = self._past + m
        keep = m if all_logits or self._in_keep is None else 1
        self._ids[:m] = ids
        self._keep[0] = keep
        bind.bind_input(self._in_ids, "cpu", 0, np.int64, [1, m], int(self._ids.ctypes.data))
        bind.bind_input(self._in_mask, "cpu", 0, np.int64, [1, total], int(self._mask.ctypes.data))
        if self._in_keep is not None:
            bind.bind_input(self._in_keep, "cpu", 0, np.int64, [1], int(self._keep.ctypes.data))
        bind.bind_output(self._out_logits, "cpu", 0, np.float32, [1, keep, self.n_vocab],
                         int(self._logits.ctypes.data))
        try:
            self._session.run_with_iobinding(bind)
        except _CAUGHT as exc:
            raise translate_error(exc, self.path, "to run the model") from None
        self._past = total
        return self._logits[: keep * self.n_vocab].reshape(keep, self.n_vocab)

    def trim(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions (no copy: later runs overwrite the rest)."""
        self._past = min(self._past, max(0, int(n_keep)))

    def reset(self) -> None:
        """Empty the KV cache (the buffers stay allocated)."""
        self._past = 0

    def kv_bytes_held(self) -> int:
        """Bytes of KV buffers allocated: one copy, ``capacity`` positions (pages commit lazily)."""
        return sum(a.nbytes for a in self._kv)

    def info(self) -> dict[str, Any]:
        """What runs where: backend, providers, threads, context, KV layout and bytes."""
        return {
            "backend": self.backend, "device": self.device,
            "providers": list(self._session.get_providers()) if self._session else [],
            "threads": self.threads, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
            "graph_contract": self.record.get("contract"),
            "kv_dtype": np.dtype(self._kv_dtype).name, "kv_shared_buffer": True,
            "kv_buffer_bytes": self.kv_bytes_held() if self._session else 0,
            "model_file": str(self.path),
            "external_data": sorted({r.location for r in self.external_data}),
            "onnxruntime_version": ort.__version__,
        }

    def close(self) -> None:
        """Release the session, its binding and the buffers."""
        self._binding = None
        self._session = None
        self._kv = []
        self._kv_bind = []


def open(path: Path, options: RuntimeOptions) -> GQASharedKV:  # noqa: A001 - registry-style hook
    """Open a builder graph folder's ``model.onnx`` by its manifest's graph record."""
    return GQASharedKV(path, options)
