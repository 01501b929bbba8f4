"""What machine a measurement was taken on: CPU, cores, RAM, OS, Python, package versions.

Package versions come from installed distribution metadata, so nothing heavy is imported.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

__all__ = ["machine_info", "cpu_model", "package_versions"]

#: Display name -> distribution name of the packages whose versions matter to a benchmark.
PACKAGES: dict[str, str] = {
    "edgellm": "edgellm",
    "llama_cpp": "llama-cpp-python",
    "gguf": "gguf",
    "numpy": "numpy",
    "tokenizers": "tokenizers",
    "torch": "torch",
    "transformers": "transformers",
    "openvino": "openvino",
    "optimum_intel": "optimum-intel",
    "nncf": "nncf",
    "onnxruntime": "onnxruntime",
}

# /proc/cpuinfo keys naming the CPU, best first. x86 has "model name"; arm64 boards such
# as the Raspberry Pi have no "model name" but a board "Model" line and/or "Hardware".
_CPUINFO_KEYS = ("model name", "Model", "Hardware", "cpu model", "Processor")


def _from_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            found.setdefault(key.strip(), value.strip())
    return next((found[k] for k in _CPUINFO_KEYS if k in found), None)


def cpu_model() -> str:
    """The CPU's marketing name (or the board name on SBCs), else the machine type."""
    return _from_cpuinfo() or platform.processor() or platform.machine() or "unknown"


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (None when not installed)."""
    versions: dict[str, str | None] = {}
    for name, dist in PACKAGES.items():
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    """Describe this host: CPU model, physical/logical cores, total RAM, OS, Python, packages."""
    return {
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "total_ram_bytes": int(psutil.virtual_memory().total),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": package_versions(),
    }
