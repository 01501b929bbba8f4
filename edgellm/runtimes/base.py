"""The engine and session protocols every backend implements, and the backend registry.

A backend turns an artifact on disk into an :class:`Engine`: what is loaded once and
shared (weights, compiled model, tokenizer). An engine opens :class:`BackendSession` objects,
one per conversation, each owning its KV cache (a :class:`~edgellm.kvcache.KVCache`) and
mapping token ids to logits. Everything above that (sampling, stop strings, streaming, chat
templates, token accounting, the KV overflow policy) lives once in
:mod:`edgellm.runtimes.loop` and :mod:`edgellm.session`, so switching backend never changes
what an application sees.

Backends are declared by a :class:`BackendSpec` row: the registry answers "which backends
could run this format on this device, and why not the others", and checks a backend's
options against its declared schema, without importing any native library. Third-party
backends join through the ``edgellm.backends`` entry-point group (each entry point resolves
to a ``BackendSpec``).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from edgellm.errors import (
    InvalidInputError,
    MissingDependencyError,
    NoCompatibleRuntimeError,
    UnknownBackendError,
    UnknownDeviceError,
)
from edgellm.runtimes.threads import ThreadChoice, choose_threads

if TYPE_CHECKING:
    import numpy as np

    from edgellm.kvcache import KVCache
    from edgellm.spec import ModelSpec
    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICES",
    "BackendSession",
    "BackendSpec",
    "Engine",
    "OneSession",
    "file_fingerprint",
    "Option",
    "RuntimeOptions",
    "register_backend",
    "get_backend",
    "backend_names",
    "select_backend",
    "open_engine",
    "open_runtime",
]

#: Device kinds a runtime can be asked for. "auto" lets the backend choose.
DEVICES = ("cpu", "gpu", "npu", "auto")


#: Default context cap when the caller gives none: trained contexts can be 128k tokens,
#: and a KV cache that large does not fit a small device.
DEFAULT_MAX_CTX = 4096


@dataclass(frozen=True)
class RuntimeOptions:
    """How to open an engine: default context, threads, device, KV precision, backend extras.

    ``extra`` holds the backend's own options, already checked against its schema
    (:attr:`BackendSpec.options`). ``kv_precision`` None means the backend's default.
    """

    n_ctx: int | None = None  # None: the model's trained context, capped by the backend
    threads: int | str | None = None  # None or "auto": the cores free at load (runtimes.threads)
    device: str = "cpu"
    seed: int = 0
    kv_precision: str | None = None
    kv_budget_bytes: int | None = None  # every session's KV together (engines size pools by it)
    extra: dict[str, Any] = field(default_factory=dict)

    def thread_choice(self) -> ThreadChoice:
        """``threads`` when it is a number, else ``$EDGELLM_THREADS``, else the physical cores
        free now (:func:`~edgellm.runtimes.threads.choose_threads`); ``auto`` says which."""
        return choose_threads(self.threads)

    def thread_count(self) -> int:
        """The number of :meth:`thread_choice`."""
        return self.thread_choice().count

    def context_for(self, spec: ModelSpec) -> int:
        """``n_ctx``, or the model's trained context capped at :data:`DEFAULT_MAX_CTX`."""
        return self.n_ctx or min(spec.max_positions, DEFAULT_MAX_CTX)


@runtime_checkable
class BackendSession(Protocol):
    """One conversation on an engine: its KV cache and a forward pass over it.

    ``forward`` appends ``tokens`` at position ``n_past`` and returns float32 logits: shape
    ``(vocab,)`` for the last token, or ``(len(tokens), vocab)`` when ``all_logits``.
    ``trim(n)`` keeps the first ``n`` positions; ``reset()`` empties the cache. With
    :attr:`KVAbility.SHIFT <edgellm.kvcache.KVAbility.SHIFT>`, ``shift(start, n)`` drops
    positions ``[start, start + n)`` and moves the later ones down by ``n`` (keys re-rotated);
    with ``SNAPSHOT``, ``save_state()`` returns the cache as bytes and ``load_state(data,
    n_tokens)`` puts it back. ``n_ctx`` is the cache's capacity in tokens.
    """

    n_ctx: int
    cache: KVCache

    @property
    def n_past(self) -> int: ...

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray: ...

    def trim(self, n_keep: int) -> None: ...

    def reset(self) -> None: ...

    def shift(self, start: int, n_discard: int) -> None: ...

    def save_state(self) -> bytes: ...

    def load_state(self, data: bytes, n_tokens: int) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """A model loaded once by one backend; opens sessions that share its weights.

    ``default_ctx`` is the context a session gets when nobody asks for a size (``n_ctx``, or
    the trained context capped); ``max_ctx`` the most one session can hold.
    ``kv_bytes_per_token`` counts every copy a session keeps. ``memory()`` gives the
    engine's own bytes under the planner's keys (``weights``, ``compute``), measured from
    the backend where it reports them (None where it does not). ``fingerprint()`` names
    the weights (saved sessions refuse to load onto other weights).
    """

    backend: str
    tokenizer: Tokenizer
    spec: ModelSpec
    n_vocab: int
    kv_precision: str
    default_ctx: int
    max_ctx: int

    def kv_bytes_per_token(self) -> int: ...

    def open_session(self, n_ctx: int) -> BackendSession: ...

    def memory(self) -> dict[str, int | None]: ...

    def fingerprint(self) -> str: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Option:
    """One backend option of the declared schema: its name and what it does."""

    name: str
    help: str


@dataclass(frozen=True)
class BackendSpec:
    """One row of the backend table: what a backend reads, drives, needs and accepts.

    ``module`` must define ``open(path, options) -> Engine``. ``requires`` is the import
    name that must be installed (``None`` for pure-Python backends) and ``extra`` the pip
    extra that brings it. ``kv_precisions`` lists the KV precisions it stores (the first is
    its default); ``options`` its own load options, so a misspelt one is refused before
    anything is imported.

    A plugin backend (entry point group ``edgellm.backends``) is planned like a built-in one
    when its row also says how it uses memory and what it drives here: ``memory`` is an
    :class:`edgellm.devices.memory.BackendModel`, and ``probe()`` returns the devices
    ("cpu", "gpu", "npu") it can drive on this host without loading a model (``None``: its
    ``devices`` when installed). The built-in rows keep those facts in the planner's tables
    (``devices/memory.py``) and ``devices/detect.py``.
    """

    name: str
    module: str
    formats: tuple[str, ...]
    devices: tuple[str, ...]
    requires: str | None
    extra: str
    description: str = ""
    kv_precisions: tuple[str, ...] = ("f16",)
    options: tuple[Option, ...] = ()
    memory: Any = None  # an edgellm.devices.memory.BackendModel: the planner sizes it
    probe: Callable[[], Sequence[str]] | None = None

    def host_devices(self) -> tuple[str, ...]:
        """The devices this backend can drive here: ``probe()``, else its devices when installed."""
        if not self.installed():
            return ()
        if self.probe is None:
            return tuple(self.devices)
        try:
            found = tuple(self.probe())
        except Exception as exc:  # a plugin's probe must not break planning
            logger.warning("backend %s: its device probe failed: %s", self.name, exc)
            return ()
        return tuple(d for d in found if d in self.devices)

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

    def check_options(self, extra: Mapping[str, Any]) -> None:
        """Refuse an option this backend does not declare, listing the ones it does."""
        valid = {o.name for o in self.options}
        for key in extra:
            if key not in valid:
                close = [RENAMED[key]] if key in RENAMED else \
                    difflib.get_close_matches(key, [*valid, *SESSION_OPTIONS], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                names = ", ".join(sorted([*valid, *SESSION_OPTIONS]))
                raise InvalidInputError(
                    f"unknown option {key!r} for backend {self.name!r}{hint}; valid options: {names}"
                )

    def kv_precision(self, value: Any) -> str:
        """``value`` checked against this backend's KV precisions (None: its default)."""
        from edgellm.kvcache import normalize_precision

        if value is None:
            return self.kv_precisions[0]
        return normalize_precision(value, self.kv_precisions, f"backend {self.name!r}")


#: Options of earlier releases and their one spelling now (the error says which to use).
RENAMED = {"kv_type": "kv_precision", "kv_cache_precision": "kv_precision", "context": "n_ctx"}

#: Options every backend accepts because edgellm itself handles them.
SESSION_OPTIONS = ("kv_precision", "kv_budget", "kv_overflow", "kv_sinks", "n_ctx", "threads",
                   "device", "seed", "backend")


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


def open_engine(
    path: str | Path, fmt: str, options: RuntimeOptions, backend: str | None = None
) -> Engine:
    """Check the options against the backend's schema, import it (only now), open ``path``."""
    spec = select_backend(fmt, options.device, backend)
    spec.check_options(options.extra)
    if options.kv_precision is not None:  # None: the backend's default (ONNX: the graph's type)
        options = replace(options, kv_precision=spec.kv_precision(options.kv_precision))
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise MissingDependencyError(
            spec.requires or spec.module, spec.extra, f"backend {spec.name!r}"
        ) from exc
    return module.open(Path(path), options)


def file_fingerprint(*paths: Path) -> str:
    """Names model files without reading them whole: sizes, plus SHA-256 of 1 MiB samples.

    The header, the end and eight evenly spaced samples of each file: a re-quantized or
    re-converted model differs in its header or tensors' bytes; hashing 4 GB on every save
    would not be worth it.
    """
    import hashlib

    digest = hashlib.sha256()
    sample = 2**20
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}|".encode())
        with path.open("rb") as f:
            for k in range(10):
                f.seek(min(max(0, size - sample), k * max(0, size - sample) // 9))
                digest.update(f.read(sample))
    return digest.hexdigest()[:32]


class OneSession:
    """An engine with one session, for code that needs raw logits (parity checks, tests).

    It has the engine's ``backend``, ``tokenizer``, ``spec``, ``n_vocab`` and ``info()``,
    and the session's ``n_ctx``, ``n_past``, ``forward``, ``trim``, ``reset`` and ``cache``;
    ``close()`` closes both. Applications use :func:`edgellm.load` instead.
    """

    def __init__(self, engine: Engine, n_ctx: int | None = None) -> None:
        self.engine = engine
        try:
            self.session = engine.open_session(n_ctx or engine.default_ctx)
        except BaseException:
            engine.close()
            raise
        self.backend, self.tokenizer, self.spec = engine.backend, engine.tokenizer, engine.spec
        self.n_vocab = engine.n_vocab
        self.n_ctx = self.session.n_ctx
        self.cache = self.session.cache

    @property
    def n_past(self) -> int:
        """Positions held by the session's cache."""
        return self.session.n_past

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """The session's forward pass."""
        return self.session.forward(tokens, all_logits)

    def trim(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions."""
        self.session.trim(n_keep)

    def reset(self) -> None:
        """Empty the cache."""
        self.session.reset()

    def info(self) -> dict[str, Any]:
        """The engine's facts, with this session's context."""
        return {**self.engine.info(), "n_ctx": self.n_ctx}

    def close(self) -> None:
        """Close the session, then the engine."""
        self.session.close()
        self.engine.close()

    def __getattr__(self, name: str) -> Any:
        """Anything else is the engine's (``properties``, ``device``, ``path``, ...)."""
        if name in ("engine", "session"):  # not set yet: __init__ failed
            raise AttributeError(name)
        return getattr(self.engine, name)


def open_runtime(
    path: str | Path, fmt: str, options: RuntimeOptions, backend: str | None = None
) -> OneSession:
    """:func:`open_engine` and one session of ``options.n_ctx`` tokens (or the default)."""
    return OneSession(open_engine(path, fmt, options, backend), options.n_ctx)


_LLAMA_OPTIONS = (
    Option("n_batch", "prompt tokens per llama_decode call (default 512)"),
    Option("n_gpu_layers", "layers offloaded to the GPU (default: all on a GPU build, else 0)"),
    Option("use_mmap", "memory-map the GGUF file (default true)"),
    Option("flash_attn", "true/false: force flash attention on or off (default: llama.cpp decides; "
                         "always on for a quantized KV cache)"),
)
_OPENVINO_OPTIONS = (
    Option("precision", "inference precision hint: f32, f16 or bf16 (default: the device's)"),
    Option("cache_dir", "compiled-model cache folder (default $EDGELLM_CACHE/ov-cache)"),
    Option("max_prompt_len", "NPU static prompt length (default: the manifest's, else 1024)"),
    Option("min_response_len", "NPU static response length (default: the manifest's, else 128)"),
)
_ORT_OPTIONS = (
    Option("providers", "execution providers to use, as a list or comma-separated string"),
    Option("n_batch", "prompt tokens per graph run (default 512)"),
    Option("huge_pages", "true/false: move the weights onto transparent huge pages after loading "
                         "(Linux, CPU; default true: SmolLM2 int4 decoded 1.15x faster, bench_onnx)"),
)
_FAKE_OPTIONS = (
    Option("script", "the text the fake model replies with"),
    Option("chat_template", "a Jinja chat template for the fake tokenizer"),
    Option("n_vocab", "vocabulary size (padded with unused ids)"),
    Option("echo", "true: reply with the last user message of a ChatML prompt instead of the script"),
    Option("step_seconds", "seconds each forward pass sleeps (to simulate a slow device)"),
)


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
        kv_precisions=("f16", "q8_0", "q4_0", "f32"),
        options=_LLAMA_OPTIONS,
    ),
    BackendSpec(
        name="openvino",
        module="edgellm.runtimes.openvino",
        formats=("openvino",),
        devices=("cpu", "gpu", "npu"),
        requires="openvino",
        extra="openvino",
        description="OpenVINO Runtime (stateful IR)",
        kv_precisions=("f16", "u8", "f32"),
        options=_OPENVINO_OPTIONS,
    ),
    BackendSpec(
        name="onnxruntime",
        module="edgellm.runtimes.onnxruntime",
        formats=("onnx",),
        devices=("cpu", "gpu", "npu"),
        requires="onnxruntime",
        extra="onnx",
        description="ONNX Runtime (optimum decoder with KV inputs, I/O binding)",
        kv_precisions=("f32", "f16"),
        options=_ORT_OPTIONS,
    ),
    BackendSpec(
        name="fake",
        module="edgellm.runtimes.fake",
        formats=("fake",),
        devices=("cpu",),
        requires=None,
        extra="dev",
        description="deterministic in-process test double (no model files)",
        kv_precisions=("f32", "f16"),
        options=_FAKE_OPTIONS,
    ),
):
    register_backend(_row)
