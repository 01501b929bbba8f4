"""Collapsing resident memory into transparent huge pages (edgellm.runtimes.hugepages).

The collapse must move the bytes of mostly-resident 2 MiB ranges onto huge pages, leave their
contents alone, and leave sparse memory (a KV buffer committed as the context fills) as it is.
On a host without the feature (another OS, a kernel before 6.1, THP set to never) it must do
nothing and say why; the tests check whichever of the two this host is.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from edgellm.runtimes import hugepages

MIB = 2**20


def _mapping(array: np.ndarray) -> dict[str, int]:
    """The smaps counters (kB) of the mapping holding the middle of ``array``."""
    addr = array.ctypes.data + array.nbytes // 2
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


def _own_mapping(array: np.ndarray) -> np.ndarray:
    """Give ``array``'s pages a mapping of their own (MADV_DONTDUMP changes only core dumps), so
    smaps counts them apart from neighbouring memory the kernel would otherwise merge in (two
    such arrays are never adjacent: malloc's header page sits between them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = (array.ctypes.data + 4095) & ~4095
    end = (array.ctypes.data + array.nbytes) & ~4095
    assert libc.madvise(start, end - start, 16) == 0  # MADV_DONTDUMP
    return array


@pytest.fixture
def small_pages():
    """numpy's own MADV_HUGEPAGE for large arrays off, so arrays start in 4 KiB pages."""
    setter = (np._core.multiarray if hasattr(np, "_core") else np.core.multiarray)._set_madvise_hugepage
    before = setter(False)
    yield
    setter(before)


def test_resident_memory_moves_onto_huge_pages_with_its_contents(small_pages) -> None:
    data = _own_mapping(np.arange(10 * MIB, dtype=np.float32))  # 40 MiB, every page written
    expected = float(data.sum(dtype=np.float64))
    before = _mapping(data)
    report = hugepages.collapse_resident()
    after = _mapping(data)
    assert float(data.sum(dtype=np.float64)) == expected and data[12345] == 12345
    if hugepages._unsupported():
        assert report.status.startswith("skipped: ") and report.bytes == 0
        return
    assert report.status == "collapsed", report
    assert before["AnonHugePages"] == 0
    assert after["AnonHugePages"] >= 36 * 1024  # 40 MiB less the unaligned ends
    assert report.bytes >= after["AnonHugePages"] * 1024 - 4 * MIB
    assert after["Rss"] - before["Rss"] <= 2 * 1024  # no hole was filled to speak of
    assert report.to_dict()["collapsed_mib"] == round(report.bytes / MIB, 1)


def test_sparse_memory_is_left_alone(small_pages) -> None:
    sparse = _own_mapping(np.zeros(10 * MIB, dtype=np.float32))  # 40 MiB, nothing committed
    sparse[:: (2 * MIB) // 4] = 1.0  # one page in every 2 MiB
    before = _mapping(sparse)
    hugepages.collapse_resident()
    after = _mapping(sparse)
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


def test_ranges_resident_before_a_load_are_skipped(small_pages) -> None:
    """The host's own memory (resident before the model loaded) is not collapsed."""
    if hugepages._unsupported():
        assert hugepages.resident_ranges() == frozenset()
        return
    host = _own_mapping(np.arange(10 * MIB, dtype=np.float32))  # resident before the "load"
    before = hugepages.resident_ranges()
    loaded = _own_mapping(np.arange(10 * MIB, dtype=np.float32))  # what the "load" added
    hugepages.collapse_resident(skip=before)
    assert _mapping(host).get("AnonHugePages", 0) == 0
    assert _mapping(loaded)["AnonHugePages"] >= 36 * 1024


def test_a_kernel_before_6_1_is_reported(monkeypatch) -> None:
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    monkeypatch.setattr(hugepages.platform, "release", lambda: "5.15.0-91-generic")
    assert hugepages.collapse_resident().status == \
        "skipped: Linux 5.15.0-91-generic has no MADV_COLLAPSE (6.1 and later do)"
    assert hugepages.resident_ranges() == frozenset()


def test_a_range_the_kernel_refuses_does_not_stop_the_rest(small_pages) -> None:
    """A mapping marked MADV_NOHUGEPAGE is refused (EINVAL); the ranges after it still collapse."""
    if hugepages._unsupported():
        return
    refused = _own_mapping(np.arange(10 * MIB, dtype=np.float32))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = (refused.ctypes.data + 4095) & ~4095
    assert libc.madvise(start, (refused.ctypes.data + refused.nbytes - start) & ~4095, 15) == 0  # NOHUGEPAGE
    wanted = _own_mapping(np.arange(10 * MIB, dtype=np.float32))
    report = hugepages.collapse_resident()
    assert report.status == "collapsed"
    assert _mapping(refused).get("AnonHugePages", 0) == 0
    assert _mapping(wanted)["AnonHugePages"] >= 36 * 1024
