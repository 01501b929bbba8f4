"""Collapsing resident memory into transparent huge pages (edgellm.runtimes.hugepages).

The collapse must move the bytes of mostly-resident 2 MiB ranges onto huge pages, leave their
contents alone, and leave sparse memory (a KV buffer committed as the context fills) as it is.
On a host without the feature (another OS, a kernel before 6.1, THP set to never) it must do
nothing and say why; the tests check whichever of the two this host is.
"""

from __future__ import annotations

import platform
import re

import numpy as np
import pytest

from edgellm.runtimes import hugepages

MIB = 2**20


def _mapping(addr: int) -> dict[str, int]:
    """The smaps counters (kB) of the mapping holding ``addr``."""
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                if inside:
                    break
                inside = int(head[1], 16) <= addr < int(head[2], 16)
            elif inside and ":" in line:
                key, value = line.split(":", 1)
                if value.strip().endswith("kB"):
                    fields[key] = int(value.split()[0])
    return fields


def _kernel_has_collapse() -> bool:
    major, minor = (int(x) for x in re.findall(r"\d+", platform.release())[:2])
    return (major, minor) >= (6, 1)


@pytest.fixture
def small_pages():
    """numpy's own MADV_HUGEPAGE for large arrays off, so arrays start in 4 KiB pages."""
    setter = getattr(np._core.multiarray if hasattr(np, "_core") else np.core.multiarray,
                     "_set_madvise_hugepage")
    before = setter(False)
    yield
    setter(before)


def test_resident_memory_moves_onto_huge_pages_with_its_contents(small_pages) -> None:
    data = np.arange(8 * MIB, dtype=np.float32)  # 32 MiB, every page written
    expected = float(data.sum(dtype=np.float64))
    before = _mapping(data.ctypes.data)
    report = hugepages.collapse_resident()
    after = _mapping(data.ctypes.data)
    assert float(data.sum(dtype=np.float64)) == expected and data[12345] == 12345
    if hugepages._unsupported() or not _kernel_has_collapse():
        assert report.status.startswith("skipped: ") and report.bytes == 0
        return
    assert report.status == "collapsed", report
    assert before["AnonHugePages"] == 0
    assert after["AnonHugePages"] >= 28 * 1024  # 32 MiB less the unaligned ends
    assert report.bytes >= after["AnonHugePages"] * 1024 - 4 * MIB
    assert after["Rss"] - before["Rss"] <= 2 * 1024  # no hole was filled to speak of
    assert report.to_dict()["collapsed_mib"] == round(report.bytes / MIB, 1)


def test_sparse_memory_is_left_alone(small_pages) -> None:
    sparse = np.zeros(8 * MIB, dtype=np.float32)  # 32 MiB reserved, nothing committed yet
    sparse[:: (2 * MIB) // 4] = 1.0  # one page in every 2 MiB
    before = _mapping(sparse.ctypes.data)
    hugepages.collapse_resident()
    after = _mapping(sparse.ctypes.data)
    assert after.get("AnonHugePages", 0) == 0
    assert after["Rss"] == before["Rss"]  # no range was filled in


def test_a_host_without_the_feature_is_reported_not_raised(monkeypatch) -> None:
    monkeypatch.setattr(hugepages.sys, "platform", "darwin")
    report = hugepages.collapse_resident()
    assert report == hugepages.HugePageReport("skipped: not Linux (darwin)")
    assert report.to_dict() == {"status": "skipped: not Linux (darwin)", "collapsed_mib": 0.0,
                                "ranges": 0, "ms": 0.0}


def test_thp_set_to_never_is_reported(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "enabled"
    fake.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_THP_ENABLED", fake)
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    assert hugepages.collapse_resident().status == "skipped: transparent huge pages are set to never"
