"""What every manifest records about where an artifact came from and what made it."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["source_fingerprint", "tool_versions"]


def source_fingerprint(src: Path) -> dict[str, Any]:
    """Cheap identity of the source: names, sizes and mtimes of its files (no full hash)."""
    h = hashlib.sha256()
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return {"path": str(src.resolve()), "fingerprint": h.hexdigest()[:16]}


def tool_versions(*dists: str) -> dict[str, str]:
    """edgellm's version plus those of the named distributions that are installed."""
    from edgellm import __version__

    tools = {"edgellm": __version__}
    for dist in dists:
        try:
            tools[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return tools
