"""The one exception tree of edgellm.

Every error edgellm raises derives from :class:`EdgeLLMError`. Mistakes in what the
caller passed also derive from :class:`ValueError`, a missing optional dependency from
:class:`ImportError`, so callers can catch them the ordinary way::

    EdgeLLMError
    ├── InvalidInputError (ValueError)            bad input: the caller can fix it
    │   ├── ModelNotFoundError                    path does not exist / no model in it
    │   ├── InvalidModelError                     corrupt, truncated or inconsistent files
    │   │   └── UnsafeCheckpointError             pickle checkpoint without --allow-pickle
    │   ├── UnsupportedArchitectureError          architecture not in the supported table
    │   ├── UnsupportedFormatError                artifact format no backend/converter reads
    │   ├── UnknownQuantizationError              quantization type not known for a format
    │   ├── UnknownBackendError                   backend name not registered
    │   ├── UnknownDeviceError                    device name not known
    │   ├── DeviceProfileError                    a device profile (TOML) is malformed
    │   ├── OutputExistsError                     output exists and --force was not given
    │   ├── ContextOverflowError                  prompt + generation exceed the context
    │   ├── KVBudgetError                         a session's KV cache does not fit the budget
    │   ├── SessionStateError                     a saved session is damaged or for another model
    │   └── ModelClosedError                      a call on a model or session after close()
    ├── MissingDependencyError (ImportError)      an optional extra is not installed
    ├── NoCompatibleRuntimeError                  no backend can run this artifact here
    ├── ConversionError                           a converter step failed
    ├── BackendError                              a native runtime failed (translated)
    └── VerificationError                         parity check could not run or failed

Messages are one line: what failed, the offending value, what is allowed, the fix.
"""

from __future__ import annotations

__all__ = [
    "EdgeLLMError",
    "InvalidInputError",
    "ModelNotFoundError",
    "InvalidModelError",
    "UnsafeCheckpointError",
    "UnsupportedArchitectureError",
    "UnsupportedFormatError",
    "UnknownQuantizationError",
    "UnknownBackendError",
    "UnknownDeviceError",
    "DeviceProfileError",
    "OutputExistsError",
    "ContextOverflowError",
    "KVBudgetError",
    "SessionStateError",
    "ModelClosedError",
    "MissingDependencyError",
    "NoCompatibleRuntimeError",
    "ConversionError",
    "BackendError",
    "VerificationError",
]


def one_line(exc: BaseException) -> str:
    """A library exception's text folded onto one line (for quoting it in an edgellm error)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class EdgeLLMError(Exception):
    """Root of every error raised by edgellm."""


class InvalidInputError(EdgeLLMError, ValueError):
    """The caller passed something edgellm cannot use; the message says how to fix it."""


class ModelNotFoundError(InvalidInputError, FileNotFoundError):
    """A model path does not exist or holds no model."""


class InvalidModelError(InvalidInputError):
    """Model files exist but are corrupt, truncated or inconsistent."""


class UnsafeCheckpointError(InvalidModelError):
    """A pickle checkpoint (.bin/.pt) was refused because it can run arbitrary code."""


class UnsupportedArchitectureError(InvalidInputError):
    """The model's architecture is not one edgellm supports."""


class UnsupportedFormatError(InvalidInputError):
    """The artifact format is not one edgellm can read or write."""


class UnknownQuantizationError(InvalidInputError):
    """The quantization type is unknown for the target format."""


class UnknownBackendError(InvalidInputError):
    """No backend is registered under that name."""


class UnknownDeviceError(InvalidInputError):
    """The device name is not one edgellm knows."""


class DeviceProfileError(InvalidInputError):
    """A device profile is malformed: the message names the file, the field, the value and the fix."""


class OutputExistsError(InvalidInputError, FileExistsError):
    """The output path exists and overwriting was not requested."""


class ContextOverflowError(InvalidInputError):
    """The prompt and requested tokens do not fit in the model's context."""


class KVBudgetError(InvalidInputError):
    """A session's KV cache does not fit in what is left of the model's ``kv_budget``."""


class SessionStateError(InvalidInputError):
    """A saved session file is damaged, truncated, or was saved from another model or backend."""


class ModelClosedError(InvalidInputError):
    """A model or session was used after ``close()`` (or closed while a stream was running)."""


class MissingDependencyError(EdgeLLMError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python module {module!r}, which is not installed; "
            f'install it with: pip install "edgellm[{extra}]"'
        )
        self.module = module
        self.extra = extra


class NoCompatibleRuntimeError(EdgeLLMError):
    """No registered backend can run the artifact on the requested device."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})


class ConversionError(EdgeLLMError):
    """A conversion step failed; nothing was written at the output path."""


class BackendError(EdgeLLMError):
    """A native runtime (llama.cpp, OpenVINO, ONNX Runtime) failed."""


class VerificationError(EdgeLLMError):
    """A parity check could not run, or its result is outside the tolerance."""
