"""How an ONNX Runtime session is opened: execution providers, session options, errors.

Shared by both graph engines (:mod:`edgellm.runtimes.onnxruntime` for optimum's graphs,
:mod:`edgellm.runtimes.ort_gqa` for edgellm's builder graphs). :func:`select_providers` is a
pure function over tables, tested against faked provider lists; :func:`translate_error` turns
every exception class ONNX Runtime defines into a one-line edgellm error with its fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgellm.errors import (
    BackendError,
    EdgeLLMError,
    InvalidModelError,
    MissingDependencyError,
    NoCompatibleRuntimeError,
    UnknownDeviceError,
    one_line,
)

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("onnxruntime", "onnx", "the ONNX Runtime backend") from exc

__all__ = ["AUTO_ORDER", "DEVICE_PROVIDERS", "PROVIDER_INSTALL", "select_providers", "session_options",
           "translate_error"]

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


def session_options(threads: int, spin: bool = True) -> Any:
    """``SessionOptions`` for one chat session: ``threads`` intra-op, sequential, all fusions.

    ``spin=False`` (an automatic count that found other work on the CPU) stops idle pool threads
    from spinning (``session.intra_op.allow_spinning``, onnxruntime_session_options_config_keys.h).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; they are raised (and translated) anyway
    return opts


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
