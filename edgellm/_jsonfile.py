"""Read a JSON object from a model file, with one error shape for every caller."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidModelError, one_line

__all__ = ["read_json_object"]


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; damage is an InvalidModelError naming the file and ``fix``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelError(f"{path}: not valid JSON ({one_line(exc)}); {fix}") from None
    if not isinstance(data, dict):
        raise InvalidModelError(f"{path}: must hold a JSON object, not {type(data).__name__}; {fix}")
    return data
