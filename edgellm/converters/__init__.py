"""Converters, one file per target format, found through a table (format -> module)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from edgellm.artifact import Format
from edgellm.errors import UnsupportedFormatError

__all__ = ["CONVERTERS", "ProgressFn", "get_converter"]

#: Progress callback every converter takes: ``(done_bytes, total_bytes, step_name)``.
ProgressFn = Callable[[int, int, str], None]

#: format -> (module, function). Adding a format is adding a row and a file.
CONVERTERS: dict[Format, tuple[str, str]] = {
    Format.GGUF: ("edgellm.converters.gguf", "convert_to_gguf"),
    Format.OPENVINO: ("edgellm.converters.openvino", "convert_to_openvino"),
    Format.ONNX: ("edgellm.converters.onnx", "convert_to_onnx"),
}


def get_converter(fmt: Format) -> Callable[..., Any]:
    """The converter function for ``fmt``; the error lists the formats that can be written."""
    try:
        module, func = CONVERTERS[fmt]
    except KeyError:
        known = ", ".join(f.value for f in CONVERTERS)
        raise UnsupportedFormatError(
            f"edgellm cannot write {fmt.value!r} yet; formats it converts to: {known}"
        ) from None
    return getattr(importlib.import_module(module), func)
