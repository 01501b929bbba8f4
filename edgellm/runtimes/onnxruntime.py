"""The ONNX Runtime backend: a decoder with explicit KV inputs, as exported by optimum.

The artifact is a folder: ``model.onnx`` (plus an optional external-data file such as
``model.onnx.data``), ``config.json`` (read into a :class:`~edgellm.spec.ModelSpec`) and the
tokenizer files (read by :class:`~edgellm.text.tokenizer.HFTokenizer`). The graph is what
``optimum.exporters.onnx.main_export(..., task="text-generation-with-past")`` writes: inputs
``input_ids``, ``attention_mask``, optionally ``position_ids`` (Gemma's graphs compute them)
and ``past_key_values.{i}.key|value`` shaped ``[batch, kv_heads, past, head_dim]``; outputs
``logits`` and ``present.{i}.key|value`` shaped ``[batch, kv_heads, past + n, head_dim]``.
At run time this module imports only onnxruntime, numpy and edgellm, never optimum, onnx,
transformers or torch.

The KV cache never moves and never grows. The graph concatenates past and new
(``present = concat(past, new)``), so each KV tensor owns two flat buffers of
``n_ctx * kv_heads * head_dim`` elements, allocated once (``np.zeros``: pages are only
committed as the context fills) and bound with ONNX Runtime's I/O binding: past is the first
``kv_heads * past * head_dim`` elements of one buffer viewed as ``[1, h, past, d]``, present
is written into the other viewed as ``[1, h, past + n, d]``, and the two swap roles after
each run (ping-pong, twice the KV bytes of an in-place cache, which this graph cannot do).
Logits, token ids, positions and the attention mask are preallocated too, so a decode step
allocates no array. :meth:`ORTRuntime.trim` re-lays the kept prefix into the other buffer.

Execution providers are chosen by :func:`select_providers`, a pure function over tables,
so it is tested against faked provider lists. Before ONNX Runtime opens the model,
:func:`external_data_files` reads the external-data locations from the ONNX protobuf
itself (a minimal field scan, no ``onnx`` package) and refuses any that leave the model
folder or are missing.
"""

from __future__ import annotations

import logging
import mmap
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import (
    BackendError,
    ContextOverflowError,
    EdgeLLMError,
    InvalidInputError,
    InvalidModelError,
    MissingDependencyError,
    ModelNotFoundError,
    NoCompatibleRuntimeError,
    UnknownDeviceError,
    one_line,
)
from edgellm.runtimes.base import RuntimeOptions
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
    "ORTRuntime",
    "external_data_files",
    "open",
    "select_providers",
    "session_options",
]

_CPU = "CPUExecutionProvider"

#: edgellm device -> ONNX Runtime execution providers that drive it, in preference order.
DEVICE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": (_CPU,),
    "gpu": ("CUDAExecutionProvider", "DmlExecutionProvider", "ROCMExecutionProvider",
            "CoreMLExecutionProvider"),
    "npu": ("QNNExecutionProvider", "OpenVINOExecutionProvider", "VitisAIExecutionProvider"),
}

#: "auto" tries the devices in this order.
AUTO_ORDER = ("gpu", "npu", "cpu")

#: How to get a provider the installed onnxruntime lacks (each is a separate wheel).
PROVIDER_INSTALL: dict[str, str] = {
    _CPU: "pip install onnxruntime",
    "CUDAExecutionProvider": "pip uninstall onnxruntime && pip install onnxruntime-gpu",
    "DmlExecutionProvider": "pip uninstall onnxruntime && pip install onnxruntime-directml (Windows)",
    "ROCMExecutionProvider": "install the ROCm build of onnxruntime (onnxruntime-rocm)",
    "CoreMLExecutionProvider": "use the macOS onnxruntime wheel (pip install onnxruntime on macOS)",
    "QNNExecutionProvider": "pip uninstall onnxruntime && pip install onnxruntime-qnn",
    "OpenVINOExecutionProvider": "pip uninstall onnxruntime && pip install onnxruntime-openvino",
    "VitisAIExecutionProvider": "install AMD Ryzen AI Software (its onnxruntime-vitisai wheel)",
}

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


def select_providers(device: str, available: Sequence[str],
                     forced: Sequence[str] | str | None = None) -> list[str]:
    """The execution providers for edgellm ``device``, checked against ``available``.

    ``available`` is ``onnxruntime.get_available_providers()``. ``forced`` (a list or a
    comma-separated string) is used as given once every name is available. Otherwise the
    first available provider of :data:`DEVICE_PROVIDERS` for the device is chosen ("auto"
    tries gpu, npu, cpu), with the CPU provider after it for the operators it lacks. A
    provider ONNX Runtime does not see raises :class:`NoCompatibleRuntimeError` listing
    the ones it does see and how to get the missing one.
    """
    seen = ", ".join(available) or "none"
    names = [p.strip() for p in (forced.split(",") if isinstance(forced, str) else forced or ())]
    names = [p for p in names if p]
    if names:
        missing = [p for p in names if p not in available]
        if missing:
            raise _unavailable(missing, seen, f"providers={','.join(names)}")
        return names
    if device != "auto" and device not in DEVICE_PROVIDERS:
        valid = ", ".join([*DEVICE_PROVIDERS, "auto"])
        raise UnknownDeviceError(f"unknown device {device!r}; use one of: {valid}")
    devices = AUTO_ORDER if device == "auto" else (device,)
    wanted = [p for dev in devices for p in DEVICE_PROVIDERS[dev]]
    for provider in wanted:
        if provider in available:
            return [provider] if provider == _CPU else [provider, _CPU]
    raise _unavailable(wanted, seen, f"device {device!r}")


def _unavailable(wanted: list[str], seen: str, what: str) -> NoCompatibleRuntimeError:
    fixes = "; ".join(f"{p}: {PROVIDER_INSTALL[p]}" for p in wanted if p in PROVIDER_INSTALL)
    return NoCompatibleRuntimeError(
        f"{what} needs {' or '.join(wanted)}, which ONNX Runtime does not have (it sees: {seen}); "
        f"{fixes or 'check the provider name against onnxruntime.get_available_providers()'}",
        {"onnxruntime": f"{', '.join(wanted)} not in available providers ({seen})"},
    )


def session_options(threads: int) -> Any:
    """``SessionOptions`` for one chat session: ``threads`` intra-op, sequential, all fusions."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; they are raised (and translated) anyway
    return opts


# -- external data: a minimal scan of the ONNX protobuf -------------------------------------

#: Per ONNX message, its fields (numbers from onnx/onnx.proto) that hold messages which can
#: contain a TensorProto; every other field is skipped without being read. TensorProto
#: field 13 is ``external_data`` (StringStringEntryProto: key 1, value 2), field 8 ``name``.
_SUBMESSAGES: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},
    "FunctionProto": {7: "NodeProto", 11: "AttributeProto"},
    "AttributeProto": {5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto",
                       22: "SparseTensorProto", 23: "SparseTensorProto"},
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
}
_MODEL_GRAPH_FIELD = 7


@dataclass(frozen=True)
class ExternalData:
    """One tensor stored outside ``model.onnx``: where, and which byte range."""

    tensor: str
    location: str
    offset: int
    length: int | None


class _Corrupt(Exception):
    """The protobuf scan hit bytes that cannot be an ONNX model (internal)."""


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= end:
            raise _Corrupt(f"a field runs past the end of its message at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Corrupt(f"an over-long varint at byte {pos}")


def _fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(field number, start, end)`` of each length-delimited field of one message."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Corrupt(f"field number 0 at byte {pos}")
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            continue
        if wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        if wire != 2:
            raise _Corrupt(f"wire type {wire} at byte {pos} (not written by ONNX)")
        size, pos = _varint(buf, pos, end)
        start, pos = pos, pos + size
        if pos <= end:
            yield field, start, pos
    if pos != end:
        raise _Corrupt(f"a field runs {pos - end} bytes past the end of its message")


def _tensor_external(buf: Any, start: int, end: int) -> ExternalData | None:
    name, entries = "", {}
    for field, a, b in _fields(buf, start, end):
        if field == 8:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif field == 13:
            kv = {f: bytes(buf[x:y]).decode("utf-8", "replace") for f, x, y in _fields(buf, a, b)}
            entries[kv.get(1, "")] = kv.get(2, "")
    if "location" not in entries:
        return None
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise _Corrupt(f"tensor {name!r} has a non-numeric external-data offset/length") from None
    return ExternalData(name, entries["location"], offset, length)


def _walk(buf: Any, start: int, end: int, kind: str, out: list[ExternalData]) -> None:
    if kind == "TensorProto":
        found = _tensor_external(buf, start, end)
        if found is not None:
            out.append(found)
        return
    children = _SUBMESSAGES[kind]
    for field, a, b in _fields(buf, start, end):
        child = children.get(field)
        if child is not None:
            _walk(buf, a, b, child, out)


def _scan_model(buf: Any, size: int) -> list[ExternalData]:
    if not any(field == _MODEL_GRAPH_FIELD for field, _, _ in _fields(buf, 0, size)):
        raise _Corrupt("no graph in the model")
    found: list[ExternalData] = []
    _walk(buf, 0, size, "ModelProto", found)
    return found


def external_data_files(model: Path) -> list[ExternalData]:
    """The external-data references of ``model`` (an .onnx file), read without ONNX Runtime.

    Raises :class:`InvalidModelError` when the file is not a readable ONNX protobuf or a
    location is absolute, climbs out with ``..``, resolves outside the model folder (a
    symlink) or is missing, or the data file is shorter than a tensor's byte range.
    """
    size = model.stat().st_size
    if size == 0:
        raise InvalidModelError(f"{model}: the file is empty; re-convert the model")
    try:
        with model.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            refs = _scan_model(buf, size)
    except _Corrupt as exc:
        raise InvalidModelError(
            f"{model}: not a readable ONNX model ({exc}); the file is corrupt or truncated: "
            "re-convert the model"
        ) from None
    sizes: dict[str, int] = {}
    for ref in refs:
        data = _check_location(model, ref)
        sizes.setdefault(ref.location, data.stat().st_size)
        end = ref.offset + (ref.length or 0)
        if end > sizes[ref.location]:
            raise InvalidModelError(
                f"{model}: external data file {ref.location!r} holds {sizes[ref.location]} bytes but "
                f"tensor {ref.tensor!r} ends at byte {end}; the data file is truncated or from "
                "another export: copy it again or re-convert the model"
            )
    return refs


def _check_location(model: Path, ref: ExternalData) -> Path:
    folder = model.parent.resolve()
    loc = ref.location
    parts = re.split(r"[\\/]", loc)
    if not loc or loc.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", loc) or ".." in parts:
        raise InvalidModelError(
            f"{model}: tensor {ref.tensor!r} names external data {loc!r}, outside the model "
            "folder; refused (external data must be a relative path inside the folder): "
            "re-convert the model"
        )
    data = (folder / loc).resolve()
    if not data.is_relative_to(folder):
        raise InvalidModelError(
            f"{model}: external data {loc!r} resolves to {str(data)!r}, outside the model folder "
            "(a symlink?); refused: copy the data file into the folder"
        )
    if not data.is_file():
        raise InvalidModelError(
            f"{model}: its external data file {loc!r} is missing; copy it beside {model.name} "
            "or re-convert the model"
        )
    return data


# -- translating ONNX Runtime's errors ---------------------------------------------------

#: ONNX Runtime's exception classes (onnxruntime_pybind11_state) -> edgellm error and fix.
#: Every class ORT defines must be listed (a test checks the mapping is complete).
_ORT_ERRORS: dict[str, tuple[type[EdgeLLMError], str]] = {
    "InvalidProtobuf": (InvalidModelError, "the file is corrupt or truncated: re-convert the model"),
    "InvalidGraph": (InvalidModelError, "the graph is invalid: re-export it, or upgrade onnxruntime"),
    "NoModel": (InvalidModelError, "the file holds no model: re-convert the model"),
    "NoSuchFile": (InvalidModelError, "a file the model needs is missing: re-convert the model"),
    "NotFound": (InvalidModelError, "something the model needs was not found: re-convert the model"),
    "ModelRequiresCompilation": (InvalidModelError,
                                 "the model must be compiled for its provider first"),
    "NotImplemented": (BackendError, "an operator is not implemented by the chosen providers: "
                                     "upgrade onnxruntime or pick another device"),
    "InvalidArgument": (BackendError, "ONNX Runtime rejected an argument"),
    "Fail": (BackendError, "check the model and the providers"),
    "EPFail": (BackendError, "the execution provider failed: try device='cpu'"),
    "EngineError": (BackendError, "check the model and the providers"),
    "RuntimeException": (BackendError, "check the model and the providers"),
    "ModelLoaded": (BackendError, "the session was already loaded"),
    "ModelLoadCanceled": (BackendError, "loading was cancelled"),
    "DeviceReset": (BackendError, "the device was reset: load the model again"),
}


def _ort_exceptions() -> tuple[type[BaseException], ...]:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:  # pragma: no cover - the module is part of every onnxruntime wheel
        return ()
    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


_CAUGHT = (*_ort_exceptions(), RuntimeError, ValueError, TypeError, OSError)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


def translate_error(exc: BaseException, path: Path, action: str) -> EdgeLLMError:
    """One-line edgellm error for an ONNX Runtime failure while ``action`` on ``path``."""
    cls, fix = _ORT_ERRORS.get(type(exc).__name__, (BackendError, "check the model and the providers"))
    detail = _ORT_PREFIX.sub("", one_line(exc))[:300]
    return cls(f"{path}: ONNX Runtime failed {action} ({detail}); {fix}")


# -- the runtime ------------------------------------------------------------------------


@dataclass(frozen=True)
class _KVSlot:
    """One KV tensor of the graph: its input and output names and its head layout."""

    past: str
    present: str
    heads: int
    head_dim: int

    def elements(self, positions: int) -> int:
        return self.heads * positions * self.head_dim


class ORTRuntime:
    """An optimum-exported ONNX decoder with a preallocated, I/O-bound KV cache (a ``Runtime``)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        self.path = Path(path)
        self._check_files(self.path)
        self.external_data = external_data_files(self.path)
        folder = self.path.parent
        self.spec = ModelSpec.from_hf_dir(folder)
        self.tokenizer = HFTokenizer.from_dir(folder)
        self.device = options.device
        self.requested_providers = select_providers(
            options.device, ort.get_available_providers(), options.extra.get("providers"))
        self.threads = options.thread_count()
        self.n_ctx = options.context_for(self.spec)
        self.n_batch = min(_positive(options.extra.get("n_batch", _DEFAULT_N_BATCH), "n_batch"),
                           self.n_ctx)
        self._session = self._open_session()
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._slots = self._kv_slots()
        self._kv_dtype = self._kv_type()
        logits = next(o for o in self._session.get_outputs() if o.name == "logits")
        self._logits_dtype = self._dtype(logits.type, "logits")
        last = logits.shape[-1] if logits.shape else None
        self.n_vocab = last if isinstance(last, int) else int(self.spec.vocab_size)
        self._allocate()
        self._past = 0
        self._bank = 0  # which of the two buffers of each KV tensor holds the past

    # -- loading --------------------------------------------------------------------------

    @staticmethod
    def _check_files(path: Path) -> None:
        if not path.is_file():
            raise ModelNotFoundError(f"ONNX model file {str(path)!r} does not exist")
        if path.suffix.lower() != ".onnx":
            raise InvalidModelError(f"{path}: an ONNX model is an .onnx file (model.onnx)")

    def _open_session(self) -> Any:
        try:
            return ort.InferenceSession(str(self.path), sess_options=session_options(self.threads),
                                        providers=self.requested_providers)
        except _CAUGHT as exc:
            raise translate_error(exc, self.path, "to load the model") from None

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
        types = sorted({self._inputs[s.past].type for s in self._slots})
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

    def _allocate(self) -> None:
        """Every buffer a forward pass binds, allocated once for ``n_ctx`` positions."""
        pos = self._inputs.get("position_ids")
        self._ids_dtype = self._dtype(self._inputs["input_ids"].type, "input_ids")
        self._mask_dtype = self._dtype(self._inputs["attention_mask"].type, "attention_mask")
        self._pos_dtype = self._dtype(pos.type, "position_ids") if pos is not None else np.int64
        self._token_ids = np.zeros(self.n_batch, dtype=self._ids_dtype)
        self._mask = np.ones(self.n_ctx, dtype=self._mask_dtype)
        self._positions = np.arange(self.n_ctx, dtype=self._pos_dtype)
        self._logits = np.zeros(self.n_batch * self.n_vocab, dtype=self._logits_dtype)
        # Two banks of flat KV buffers; np.zeros commits pages only when they are written.
        self._kv = [[np.zeros(s.elements(self.n_ctx), dtype=self._kv_dtype) for s in self._slots]
                    for _ in range(2)]
        # Addresses taken once: the arrays are never reallocated while the session lives.
        self._kv_ptrs = [[int(a.ctypes.data) for a in bank] for bank in self._kv]
        self._ptrs = {name: int(a.ctypes.data) for name, a in (
            ("input_ids", self._token_ids), ("attention_mask", self._mask),
            ("position_ids", self._positions), ("logits", self._logits))}
        self._binding = self._session.io_binding()

    # -- Runtime protocol -----------------------------------------------------------------

    @property
    def n_past(self) -> int:
        """Number of positions currently held in the KV cache."""
        return self._past

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the cache (in ``n_batch`` chunks); last or all logits, float32."""
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        if self._session is None:
            raise InvalidInputError(f"{self.path}: this runtime is closed; open the model again")
        if self._past + n > self.n_ctx:
            raise ContextOverflowError(
                f"{self._past} tokens in context + {n} new > context {self.n_ctx}; "
                "load the model with a larger n_ctx"
            )
        ids = np.asarray(tokens, dtype=np.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InvalidInputError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        out = np.empty((n, self.n_vocab), dtype=np.float32) if all_logits else None
        for start in range(0, n, self.n_batch):
            rows = self._run(ids[start:start + self.n_batch])
            if out is not None:
                out[start:start + len(rows)] = rows
        return out if out is not None else rows[-1].astype(np.float32)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        """One graph run over ``ids`` (at most n_batch); a view of the logits buffer."""
        m, past = len(ids), self._past
        total = past + m
        self._token_ids[:m] = ids
        bind, ptrs = self._binding, self._ptrs
        bind.bind_input("input_ids", "cpu", 0, self._ids_dtype, [1, m], ptrs["input_ids"])
        bind.bind_input("attention_mask", "cpu", 0, self._mask_dtype, [1, total], ptrs["attention_mask"])
        if "position_ids" in self._inputs:  # a contiguous slice of 0..n_ctx-1: no copy
            ptr = ptrs["position_ids"] + past * self._positions.itemsize
            bind.bind_input("position_ids", "cpu", 0, self._pos_dtype, [1, m], ptr)
        src, dst = self._kv_ptrs[self._bank], self._kv_ptrs[1 - self._bank]
        for slot, a, b in zip(self._slots, src, dst, strict=True):
            bind.bind_input(slot.past, "cpu", 0, self._kv_dtype, [1, slot.heads, past, slot.head_dim], a)
            bind.bind_output(slot.present, "cpu", 0, self._kv_dtype,
                             [1, slot.heads, total, slot.head_dim], b)
        bind.bind_output("logits", "cpu", 0, self._logits_dtype, [1, m, self.n_vocab], ptrs["logits"])
        try:
            self._session.run_with_iobinding(bind)
        except _CAUGHT as exc:
            # The present buffers may be half written; the past bank is untouched.
            raise translate_error(exc, self.path, "to run the model") from None
        self._bank, self._past = 1 - self._bank, total
        return self._logits[: m * self.n_vocab].reshape(m, self.n_vocab)

    def trim(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions: re-lay them into the other buffer of each tensor."""
        n_keep = max(0, int(n_keep))
        if n_keep >= self._past:
            return
        if n_keep:
            src, dst = self._kv[self._bank], self._kv[1 - self._bank]
            for slot, a, b in zip(self._slots, src, dst, strict=True):
                held = a[: slot.elements(self._past)].reshape(slot.heads, self._past, slot.head_dim)
                kept = b[: slot.elements(n_keep)].reshape(slot.heads, n_keep, slot.head_dim)
                np.copyto(kept, held[:, :n_keep])
            self._bank = 1 - self._bank
        self._past = n_keep

    def reset(self) -> None:
        """Empty the KV cache (the buffers stay allocated)."""
        self._past = 0

    def info(self) -> dict[str, Any]:
        """What runs where: backend, device, providers in use, threads, context, KV type."""
        kv_bytes = sum(a.nbytes for bank in self._kv for a in bank) if self._session else 0
        return {
            "backend": self.backend,
            "device": self.device,
            "providers": list(self._session.get_providers()) if self._session else [],
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "kv_dtype": np.dtype(self._kv_dtype).name,
            "kv_buffer_bytes": kv_bytes,
            "model_file": str(self.path),
            "external_data": sorted({r.location for r in self.external_data}),
            "onnxruntime_version": ort.__version__,
        }

    def close(self) -> None:
        """Release the session, its binding and the buffers."""
        self._binding = None
        self._session = None
        self._kv = [[], []]
        self._kv_ptrs = [[], []]


def _positive(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (an int, or digits from a command line)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def open(path: Path, options: RuntimeOptions) -> ORTRuntime:  # noqa: A001 - registry hook
    """Open an optimum-exported ONNX decoder (model.onnx) with ONNX Runtime (the registry's hook)."""
    return ORTRuntime(path, options)
