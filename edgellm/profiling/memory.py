"""A background sampler of this process's resident memory (RSS).

``ru_maxrss`` alone cannot say *when* memory peaked or what the process held before a
step began, so :class:`MemorySampler` records a timeline::

    with MemorySampler(interval_ms=10) as mem:
        model = edgellm.load(path)
        model.generate("Hi")
    print(mem.peak_rss_bytes - mem.baseline_rss_bytes)

The OS high-water mark (:attr:`MemorySampler.os_peak_rss_bytes`) is kept as a
cross-check: it cannot miss a short spike between two samples, but it covers the whole
life of the process, not just the ``with`` block.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import psutil

from edgellm.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["MemorySampler", "ProcessSampler", "current_rss_bytes", "os_peak_rss_bytes"]


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def os_peak_rss_bytes() -> int | None:
    """The OS high-water mark of this process's RSS in bytes, or None where unavailable.

    ``getrusage(...).ru_maxrss`` is in KiB on Linux and in bytes on macOS
    (see getrusage(2) on each system).
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


class MemorySampler:
    """Context manager sampling this process's RSS every ``interval_ms`` on a thread.

    ``timeline`` holds ``(t_ms, rss_bytes)`` pairs, ``t_ms`` measured from ``__enter__``.
    A sample is also taken on entry and on exit, so even a block shorter than the
    interval has a baseline and a final value. :meth:`sample` adds one by hand.
    """

    def __init__(self, interval_ms: float = 10.0) -> None:
        if interval_ms <= 0:
            raise InvalidInputError(f"interval_ms must be a positive number, got {interval_ms!r}")
        self.interval_ms = float(interval_ms)
        self._process = psutil.Process()
        self._samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._os_peak_before: int | None = None
        self._os_peak_after: int | None = None
        self.probe: Callable[[], int] | None = None
        self._probed: list[tuple[float, int]] = []

    # -- sampling -------------------------------------------------------------------

    def sample(self) -> int:
        """Take one sample now and return it (bytes)."""
        rss = int(self._process.memory_info().rss)
        t_ms = (time.perf_counter() - self._t0) * 1000.0
        probe = self.probe
        value = None if probe is None else int(probe())
        with self._lock:
            self._samples.append((t_ms, rss))
            if value is not None:
                self._probed.append((t_ms, value))
        return rss

    def now_ms(self) -> float:
        """Milliseconds since sampling started, on the timeline's clock (for marking phases)."""
        return (time.perf_counter() - self._t0) * 1000.0

    def _run(self) -> None:
        interval_s = self.interval_ms / 1000.0
        while not self._stop.wait(interval_s):
            try:
                self.sample()
            except Exception as exc:  # never let the sampler (or a probe) kill the measured work
                logger.warning("memory sampling stopped: %s", exc)
                return

    def start(self) -> MemorySampler:
        """Start sampling (what ``__enter__`` does)."""
        if self._thread is not None:
            raise RuntimeError("MemorySampler is already running; use a new sampler")
        self._t0 = time.perf_counter()
        self._os_peak_before = os_peak_rss_bytes()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="edgellm-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and take a final sample (what ``__exit__`` does)."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self.sample()
        self._os_peak_after = os_peak_rss_bytes()

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- results --------------------------------------------------------------------

    @property
    def timeline(self) -> list[tuple[float, int]]:
        """A copy of the samples so far: ``[(t_ms, rss_bytes), ...]``."""
        with self._lock:
            return list(self._samples)

    @property
    def probe_timeline(self) -> list[tuple[float, int]]:
        """A copy of the probe's readings: ``[(t_ms, value), ...]``."""
        with self._lock:
            return list(self._probed)

    @property
    def baseline_rss_bytes(self) -> int:
        """RSS when sampling started."""
        with self._lock:
            return self._samples[0][1] if self._samples else 0

    @property
    def peak_rss_bytes(self) -> int:
        """Highest RSS sampled inside the block."""
        with self._lock:
            return max((rss for _, rss in self._samples), default=0)

    @property
    def peak_rise_bytes(self) -> int:
        """How far the sampled RSS rose above the baseline."""
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)

    @property
    def os_peak_rss_bytes(self) -> int | None:
        """The OS high-water mark for the whole process (at exit, or now while running)."""
        return self._os_peak_after if self._os_peak_after is not None else os_peak_rss_bytes()

    def to_dict(self) -> dict[str, object]:
        """The summary (not the timeline) as a JSON-ready dict."""
        return {
            "interval_ms": self.interval_ms,
            "samples": len(self.timeline),
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rise_bytes": self.peak_rise_bytes,
            "os_peak_rss_bytes": self.os_peak_rss_bytes,
        }


# The watcher: reads the parent's /proc/<pid>/statm every interval, appends (monotonic s, RSS
# bytes) records to a file; stops when the parent is gone or the file is removed.
_WATCHER = r"""
import os, struct, sys, time
pid, interval, out = int(sys.argv[1]), float(sys.argv[2]) / 1000.0, sys.argv[3]
page = os.sysconf("SC_PAGE_SIZE")
fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
with open(out, "ab", buffering=0) as f:
    due = time.monotonic()
    while os.path.exists(out):
        try:
            rss = int(os.pread(fd, 128, 0).split()[1]) * page
        except (OSError, IndexError, ValueError):
            break
        f.write(struct.pack("<dq", time.monotonic(), rss))
        due += interval
        time.sleep(max(0.0, due - time.monotonic()))
"""


class ProcessSampler(MemorySampler):
    """A :class:`MemorySampler` whose RSS samples also come from a watcher *process*.

    A sampler thread needs the GIL, which a native call holding it (an ONNX Runtime or
    OpenVINO load) or a busy Python decode loop delays; a small separate process reading
    ``/proc/<pid>/statm`` is never held up by this interpreter (measured with OpenVINO under a
    load average of 5: the thread's largest gap 213 ms). The thread still runs (the ``probe``
    reads this process's objects); the watcher's samples join the timeline at :meth:`stop`.
    Linux only (``/proc``); elsewhere it is a plain MemorySampler.
    """

    def start(self) -> ProcessSampler:
        """Start the thread and the watcher process."""
        import subprocess
        import sys
        import tempfile

        super().start()
        self._mono0 = time.monotonic()
        self._watcher: subprocess.Popen[bytes] | None = None
        if not os.path.exists(f"/proc/{os.getpid()}/statm"):
            return self
        fd, self._file = tempfile.mkstemp(prefix="edgellm-rss-", suffix=".bin")
        os.close(fd)
        self._watcher = subprocess.Popen([sys.executable, "-S", "-c", _WATCHER, str(os.getpid()),
                                          str(self.interval_ms), self._file], stdin=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        """Stop both; merge the watcher's samples into the timeline."""
        super().stop()
        watcher, self._watcher = getattr(self, "_watcher", None), None
        if watcher is None:
            return
        watcher.terminate()
        watcher.wait()
        path = Path(self._file)
        try:
            data = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        records = [struct.unpack_from("<dq", data, i) for i in range(0, len(data) - 15, 16)]
        with self._lock:
            self._samples += [((t - self._mono0) * 1000.0, rss) for t, rss in records]
            self._samples.sort()
