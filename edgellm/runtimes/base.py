"""The Runtime protocol every backend implements, and the backend registry.

A backend is a module that turns an artifact on disk into a :class:`Runtime`: an object
that holds a KV state and maps token ids to logits. Everything above that (sampling, stop
strings, streaming, chat templates, token accounting) lives once in
:mod:`edgellm.runtimes.loop` and :mod:`edgellm.model`, so switching backend never changes
what an application sees.

Backends are declared by a :class:`BackendSpec` row: the registry answers "which backends
could run this format on this device, and why not the others" without importing any
native library. Third-party backends join through the ``edgellm.backends`` entry-point
group (each entry point resolves to a ``BackendSpec``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from edgellm.errors import (
    InvalidInputError,
    MissingDependencyError,
    NoCompatibleRuntimeError,
    UnknownBackendError,
    UnknownDeviceError,
)

if TYPE_CHECKING:
    import numpy as np

    from edgellm.spec import ModelSpec
    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICES",
    "BackendSpec",
    "Runtime",
    "RuntimeOptions",
    "register_backend",
    "get_backend",
    "backend_names",
    "select_backend",
    "open_runtime",
]

#: Device kinds a runtime can be asked for. "auto" lets the backend choose.
DEVICES = ("cpu", "gpu", "npu", "auto")


#: Environment variable: the thread count when the caller gives none. On a device shared with
#: other busy processes, spinning thread pools collapse (DESIGN.md: llama.cpp at 2 threads beside
#: one busy process, 11 tokens/s; at 1 thread, 85); EDGELLM_THREADS=1 says so once per process.
THREADS_ENV = "EDGELLM_THREADS"

#: Default context cap when the caller gives none: trained contexts can be 128k tokens,
#: and a KV cache that large does not fit a small device.
DEFAULT_MAX_CTX = 4096


def env_threads() -> int | None:
    """``$EDGELLM_THREADS`` as a thread count, or None when it is unset or empty."""
    import os

    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInputError(f"{THREADS_ENV}={raw!r} is not a thread count; set a positive integer "
                                f"(1 on a device shared with other busy work) or unset it")
    return int(raw)


@dataclass(frozen=True)
class RuntimeOptions:
    """How to open a runtime: context size, threads, device and backend-specific extras."""

    n_ctx: int | None = None  # None: the model's trained context, capped by the backend
    threads: int | None = None  # None: physical cores
    device: str = "cpu"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def thread_count(self) -> int:
        """``threads``, else ``$EDGELLM_THREADS``, else the physical core count (hyper-threads
        slow matmul-bound decoding)."""
        import os

        import psutil

        return self.threads or env_threads() or psutil.cpu_count(logical=False) or os.cpu_count() or 1

    def context_for(self, spec: ModelSpec) -> int:
        """``n_ctx``, or the model's trained context capped at :data:`DEFAULT_MAX_CTX`."""
        return self.n_ctx or min(spec.max_positions, DEFAULT_MAX_CTX)


@runtime_checkable
class Runtime(Protocol):
    """A model loaded by one backend: a KV state plus a forward pass.

    ``forward`` appends ``tokens`` to the state at position ``n_past`` and returns
    float32 logits: shape ``(vocab,)`` for the last token, or ``(len(tokens), vocab)``
    when ``all_logits`` is true. ``trim(n)`` keeps the first ``n`` positions of the state
    (prefix reuse between requests); ``reset()`` empties it.
    """

    backend: str
    tokenizer: Tokenizer
    spec: ModelSpec
    n_ctx: int
    n_vocab: int

    @property
    def n_past(self) -> int: ...

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray: ...

    def trim(self, n_keep: int) -> None: ...

    def reset(self) -> None: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendSpec:
    """One row of the backend table: what a backend reads, drives and needs.

    ``module`` must define ``open(path, options) -> Runtime``. ``requires`` is the import
    name that must be installed (``None`` for pure-Python backends) and ``extra`` the pip
    extra that brings it.
    """

    name: str
    module: str
    formats: tuple[str, ...]
    devices: tuple[str, ...]
    requires: str | None
    extra: str
    description: str = ""

    def installed(self) -> bool:
        """True when the backend's native dependency can be imported (checked, not imported)."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def why_not(self, fmt: str, device: str) -> str | None:
        """Reason this backend cannot run ``fmt`` on ``device``, or None when it can."""
        if fmt not in self.formats:
            return f"reads {', '.join(self.formats)}, not {fmt}"
        if device != "auto" and device not in self.devices:
            return f"drives {', '.join(self.devices)}, not {device}"
        if not self.installed():
            return f"module {self.requires!r} not installed (pip install \"edgellm[{self.extra}]\")"
        return None


_REGISTRY: dict[str, BackendSpec] = {}
_ENTRY_POINTS_LOADED = False


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Add a backend row; a second row under the same name is refused."""
    if spec.name in _REGISTRY:
        raise InvalidInputError(
            f"backend {spec.name!r} is already registered (by {_REGISTRY[spec.name].module}); "
            "choose another name"
        )
    _REGISTRY[spec.name] = spec
    return spec


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="edgellm.backends"):
        try:
            spec = ep.load()
        except Exception as exc:  # a broken plugin must not break edgellm
            logger.warning("backend entry point %s could not be loaded: %s", ep.name, exc)
            continue
        if isinstance(spec, BackendSpec) and spec.name not in _REGISTRY:
            register_backend(spec)


def backend_names() -> list[str]:
    """Names of every registered backend, built-in and plugin."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_backend(name: str) -> BackendSpec:
    """The registered backend called ``name``; the error lists the valid names."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown backend {name!r}; registered backends: {', '.join(backend_names())}"
        ) from None


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise UnknownDeviceError(
            f"unknown device {device!r}; use one of: {', '.join(DEVICES)}"
        )


def select_backend(fmt: str, device: str = "cpu", backend: str | None = None) -> BackendSpec:
    """Pick the backend for an artifact format on a device, or explain why none fits.

    With ``backend`` given, that backend is checked and returned or refused with its
    reason. Without it, the first registered backend (table order) that can run the
    format is chosen. Nothing is imported.
    """
    _check_device(device)
    if backend is not None:
        spec = get_backend(backend)
        reason = spec.why_not(fmt, device)
        if reason is not None:
            if fmt in spec.formats and device in (*spec.devices, "auto") and not spec.installed():
                raise MissingDependencyError(spec.requires or "", spec.extra, f"backend {spec.name!r}")
            raise NoCompatibleRuntimeError(
                f"backend {spec.name!r} cannot run a {fmt} model on {device}: {reason}",
                {spec.name: reason},
            )
        return spec
    reasons: dict[str, str] = {}
    for name in backend_names():
        spec = _REGISTRY[name]
        if spec.name == "fake":  # the test double is only used when asked for by name
            continue
        reason = spec.why_not(fmt, device)
        if reason is None:
            return spec
        reasons[spec.name] = reason
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise NoCompatibleRuntimeError(
        f"no installed backend runs a {fmt} model on {device} ({detail})", reasons
    )


def open_runtime(
    path: str | Path, fmt: str, options: RuntimeOptions, backend: str | None = None
) -> Runtime:
    """Import the chosen backend module (only now) and open ``path`` with it."""
    spec = select_backend(fmt, options.device, backend)
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise MissingDependencyError(
            spec.requires or spec.module, spec.extra, f"backend {spec.name!r}"
        ) from exc
    return module.open(Path(path), options)


# The built-in table. Order is preference order when no backend is named.
for _row in (
    BackendSpec(
        name="llamacpp",
        module="edgellm.runtimes.llamacpp",
        formats=("gguf",),
        devices=("cpu", "gpu"),
        requires="llama_cpp",
        extra="llama",
        description="llama.cpp through llama-cpp-python",
    ),
    BackendSpec(
        name="openvino",
        module="edgellm.runtimes.openvino",
        formats=("openvino",),
        devices=("cpu", "gpu", "npu"),
        requires="openvino",
        extra="openvino",
        description="OpenVINO Runtime (stateful IR)",
    ),
    BackendSpec(
        name="onnxruntime",
        module="edgellm.runtimes.onnxruntime",
        formats=("onnx",),
        devices=("cpu", "gpu", "npu"),
        requires="onnxruntime",
        extra="onnx",
        description="ONNX Runtime (optimum decoder with KV inputs, I/O binding)",
    ),
    BackendSpec(
        name="fake",
        module="edgellm.runtimes.fake",
        formats=("fake",),
        devices=("cpu",),
        requires=None,
        extra="dev",
        description="deterministic in-process test double (no model files)",
    ),
):
    register_backend(_row)
