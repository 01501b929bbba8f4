"""Collapse a loaded model's resident memory into transparent huge pages (Linux).

ONNX Runtime copies every weight into its own heap buffers when it opens a model (prepacking:
MatMulNBits' int4 blocks, MatMul's packed panels), and that heap is mapped in 4 KiB pages. A
decode step reads all of it, so it walks through tens of thousands of pages per token and
spends a large part of the step on TLB misses, more so in a virtual machine, where every miss
walks two page tables. ``benchmarks/bench_onnx.py`` measures it side by side (SmolLM2-135M,
2 threads, this project's 2-core Firecracker VM): int4 decodes 1.15x faster with the heap
collapsed than with ``huge_pages=False``, fp32 1.04x (it is bound by memory bandwidth). The
same runs show onnxruntime-genai gaining from ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which
makes malloc itself hand out huge pages; a library cannot set that after its host process
started, so :func:`collapse_resident` does it after the fact with ``madvise(MADV_COLLAPSE)``
(Linux 6.1+), which copies each 2 MiB range into one huge page, synchronously.

Only ranges the load added (:func:`resident_ranges` is taken before it) and that are
resident (by ``mincore``, at least :data:`MIN_RESIDENT` of their pages) are collapsed, so
the host application's own memory is not touched, resident memory grows by at most the holes
of those ranges (at most a tenth of what is collapsed), and a sparse buffer (a KV cache whose
pages are committed as the context fills) is left alone. Nothing changes but where the bytes sit:
contents and addresses are the same. On another OS, an older kernel or with THP set to
``never`` it does nothing and says why. Only the ONNX Runtime backend asks for it: in a
one-off probe (not a benchmark script) the same collapse made no measurable difference to
llama.cpp without mmap or to OpenVINO.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["MIN_RESIDENT", "HugePageReport", "collapse_resident", "resident_ranges"]

_HUGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) PMD size
_PAGE = 4096
_MADV_COLLAPSE = 25  # include/uapi/asm-generic/mman-common.h, Linux 6.1
#: Fraction of a 2 MiB range that must be resident before it is collapsed.
MIN_RESIDENT = 0.9
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class HugePageReport:
    """What :func:`collapse_resident` did: ``status`` is "collapsed" or why it did nothing."""

    status: str
    ranges: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (for ``info()`` and profiles)."""
        return {"status": self.status, "collapsed_mib": round(self.bytes / 2**20, 1),
                "ranges": self.ranges, "ms": round(self.seconds * 1e3, 1)}


def _kernel(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as ``6.18.44-fc-v857``."""
    parts = re.findall(r"\d+", release)[:2]
    return (int(parts[0]), int(parts[1])) if len(parts) == 2 else (0, 0)


def _unsupported() -> str | None:
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    if _kernel(platform.release()) < (6, 1):
        return f"Linux {platform.release()} has no MADV_COLLAPSE (6.1 and later do)"
    try:
        mode = _THP_ENABLED.read_text(encoding="ascii")
    except OSError:
        return "no transparent huge pages in this kernel"
    return "transparent huge pages are set to never" if "[never]" in mode else None


def _anonymous_ranges() -> list[tuple[int, int]]:
    """2 MiB-aligned spans of this process's private writable anonymous mappings and heap."""
    spans = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) > 5 else ""
            if fields[1][:2] != "rw" or fields[1][3] != "p" or fields[4] != "0" or path not in ("", "[heap]"):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            start, end = (lo + _HUGE - 1) & ~(_HUGE - 1), hi & ~(_HUGE - 1)
            if end > start:
                spans.append((start, end))
    return spans


class _Libc:
    """``madvise`` and ``mincore`` through ctypes, and one reusable residency vector."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        self.vec = ctypes.create_string_buffer(_HUGE // _PAGE)

    def resident(self, addr: int) -> int:
        """Resident 4 KiB pages of the 2 MiB range at ``addr`` (0 if it is gone)."""
        if self.libc.mincore(addr, _HUGE, self.vec) != 0:
            return 0
        return _HUGE // _PAGE - self.vec.raw.count(0)


def resident_ranges(min_resident: float = MIN_RESIDENT) -> frozenset[int]:
    """Start addresses of the 2 MiB anonymous ranges resident now (empty where unsupported).

    Taken before a model loads, it lets :func:`collapse_resident` touch only what the load
    added, not the host application's own memory.
    """
    if _unsupported():
        return frozenset()
    libc, need = _Libc(), int(min_resident * (_HUGE // _PAGE))
    return frozenset(a for lo, hi in _anonymous_ranges() for a in range(lo, hi, _HUGE)
                     if libc.resident(a) >= need)


def collapse_resident(min_resident: float = MIN_RESIDENT,
                      skip: frozenset[int] = frozenset()) -> HugePageReport:
    """Collapse every mostly-resident 2 MiB range of anonymous memory into a huge page.

    ``skip``: ranges to leave alone (:func:`resident_ranges` from before a load). Never raises:
    a kernel that refuses (no ``MADV_COLLAPSE``, no memory for a huge page right now) leaves the
    memory as it was, and the report says so.
    """
    reason = _unsupported()
    if reason:
        return HugePageReport(f"skipped: {reason}")
    libc, need = _Libc(), int(min_resident * (_HUGE // _PAGE))
    started, ranges, failed = time.perf_counter(), 0, 0
    for start, end in _anonymous_ranges():
        for addr in range(start, end, _HUGE):
            if addr in skip or libc.resident(addr) < need:
                continue  # the host's own, unmapped meanwhile, or sparse
            if libc.libc.madvise(addr, _HUGE, _MADV_COLLAPSE) == 0:
                ranges += 1
                continue
            # EAGAIN / ENOMEM: no huge page free now; EINVAL: a range the kernel will not
            # collapse (marked MADV_NOHUGEPAGE, or THP off for this process). It stays as it was.
            failed += 1
            logger.debug("huge pages: %#x not collapsed (errno %d)", addr, ctypes.get_errno())
    seconds = time.perf_counter() - started
    if failed and not ranges:
        return HugePageReport(f"skipped: the kernel collapsed none of {failed} ranges", 0, 0, seconds)
    return HugePageReport("collapsed", ranges, ranges * _HUGE, seconds)
