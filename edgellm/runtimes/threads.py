"""How many CPU threads a backend gets: exact when asked, else the cores actually free.

``threads=N`` is used as given; ``$EDGELLM_THREADS`` next; otherwise ("auto", the default)
the count is the physical cores this process may run on (``sched_getaffinity``) scaled by
the share of them that was idle over a short window (``/proc/stat`` through psutil). A
device running other busy work gets fewer threads: spinning thread pools collapse when a
peer is descheduled (DESIGN.md: llama.cpp at 2 threads beside one busy process on 2 cores,
11 tokens/s; at 1 thread, 85). :attr:`ThreadChoice.contended` says when other work held
cores at load; ONNX Runtime then stops its idle threads from spinning (on an idle machine
spinning is worth 1.4x there), OpenVINO unpins its threads for any automatic count, and
llama.cpp's :class:`ThreadTuner` adapts while decoding.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass

from edgellm.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["AUTO", "THREADS_ENV", "ThreadChoice", "ThreadTuner", "check_threads", "choose_threads",
           "env_threads", "free_cores", "max_threads", "parse_threads"]

AUTO = "auto"

#: Environment variable: the thread count when the caller gives none.
THREADS_ENV = "EDGELLM_THREADS"

#: How long the idle share is measured at load (seconds). /proc/stat counts in 10 ms ticks
#: (USER_HZ 100), so 0.1 s gives 10 ticks per CPU: a busy peer shows as ~1.0 core used. The
#: first guess only has to be good for the prefill: :class:`ThreadTuner` corrects decoding.
IDLE_WINDOW_S = 0.1


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count, whether it was chosen automatically, and why; ``limit`` is the most
    an automatic count may grow to (the physical cores usable), else the count itself."""

    count: int
    auto: bool
    reason: str
    limit: int = 0

    @property
    def contended(self) -> bool:
        """An automatic count below the usable cores: other work held some at load."""
        return self.auto and self.count < self.limit

    def tuner(self, apply: Callable[[int], None]) -> ThreadTuner | None:
        """A :class:`ThreadTuner` over ``1 .. limit`` for an automatic count, else None."""
        if not self.auto or self.limit <= 1:
            return None
        return ThreadTuner(list(range(1, self.limit + 1)), self.count, apply)


def max_threads() -> int:
    """The most threads a backend may be given: this machine's logical cores.

    More only oversubscribes the cores, and very large counts crash native runtimes
    (ggml asserts ``n_threads <= GGML_MAX_N_THREADS``, 512: ``threads=100000`` aborted the process).
    """
    return os.cpu_count() or 1


def check_threads(value: object, source: str = "threads") -> int:
    """``value`` as a thread count in ``1..max_threads()``, or a one-line InvalidInputError."""
    most = max_threads()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidInputError(
            f"{source}={value!r} is not a usable thread count; this machine has {most} logical "
            f"core(s): pass an integer from 1 to {most}, or 'auto' (the cores idle at load)"
        )
    return value


def parse_threads(value: object, where: str = "threads") -> int | str | None:
    """``value`` checked: a count in ``1..max_threads()``, "auto", or None (= auto)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None if value is None else AUTO
    return check_threads(value, where)


def env_threads() -> int | None:
    """``$EDGELLM_THREADS`` as a thread count, or None when it is unset, empty or "auto"."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw or raw.lower() == AUTO:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInputError(f"{THREADS_ENV}={raw!r} is not a thread count; set a positive integer, "
                                f"or 'auto' (the cores free at load), or unset it")
    return check_threads(int(raw), THREADS_ENV)


def _usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return list(range(os.cpu_count() or 1))


def free_cores(window_s: float = IDLE_WINDOW_S) -> tuple[float, int]:
    """(idle CPUs among those this process may use, averaged over ``window_s``; how many it may use)."""
    import psutil

    cpus = _usable_cpus()
    try:
        shares = psutil.cpu_percent(interval=window_s, percpu=True)
    except (OSError, RuntimeError) as exc:  # no /proc/stat (a sandbox): assume every CPU is free
        logger.debug("idle CPUs unknown (%s); assuming all free", exc)
        return float(len(cpus)), len(cpus)
    idle = sum(1.0 - shares[c] / 100.0 for c in cpus if c < len(shares))
    return idle, len(cpus)


def cpu_counts() -> tuple[int, int]:
    """(logical CPUs, physical cores) of this host."""
    import psutil

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return logical, psutil.cpu_count(logical=False) or logical


def _physical_share(n_usable: int) -> int:
    """Physical cores among the usable CPUs (hyper-threads slow matmul-bound decoding)."""
    logical, physical = cpu_counts()
    return max(1, round(n_usable * physical / logical))


def choose_threads(threads: int | str | None = None, window_s: float = IDLE_WINDOW_S) -> ThreadChoice:
    """The thread count for ``threads`` (an int is exact; "auto"/None: env, else cores free now)."""
    explicit = parse_threads(threads)
    if isinstance(explicit, int):
        return ThreadChoice(explicit, False, "asked for")
    from_env = env_threads()
    if from_env is not None:
        return ThreadChoice(from_env, False, f"${THREADS_ENV}")
    idle, usable = free_cores(window_s)
    cores = _physical_share(usable)
    count = _share(idle, usable, cores)
    reason = f"auto: {idle:.1f} of {usable} CPUs idle over {window_s * 1000:.0f} ms, {cores} physical"
    logger.info("threads %d (%s)", count, reason)
    return ThreadChoice(count, True, reason, cores)


class ThreadTuner:
    """Adapts an automatic thread count while decoding, from how busy the *other* work is.

    Every ``CHECK_STEPS`` one-token steps (and at once when the median of the last ``WINDOW``
    steps is ``SLOWDOWN`` times the best seen), the CPU time the usable CPUs spent busy since
    the last check, minus this process's own CPU time, gives the cores other processes took;
    the target is the physical share of the rest (as at load). A change of count needs two
    checks in a row agreeing (no flapping); ``apply(n)`` sets it (llama.cpp:
    ``llama_set_n_threads``, no reload). Reading ``/proc/stat`` costs tens of microseconds.

    More threads are a trial, never before step ``FIRST_TRIAL``: when the median of the first
    ``TRIAL_STEPS`` steps at the higher count is ``TRIAL_WORSE`` times the median before, the
    tuner goes back and does not try again for ``backoff`` steps (doubling after each failed
    trial). Fewer threads are never a trial (a busy peer is reason enough). Idle CPUs do not promise a
    faster decode: on this 2-core VM llama.cpp decoded 78 tokens/s on 1 thread and 9 on 2 with
    the other core only lightly used (load average 2), and an idle-share rule alone cost
    auto 6% against 1 fixed thread. Probing every count in turn was tried first and dropped:
    beside a busy process one step at the collapsing count costs 15x a good step.
    """

    CHECK_STEPS = 16
    WINDOW = 8
    SLOWDOWN = 1.5
    TRIAL_STEPS = 3
    TRIAL_WORSE = 1.15
    BACKOFF = 256
    FIRST_TRIAL = 128

    def __init__(self, counts: list[int], current: int, apply: Callable[[int], None]) -> None:
        self.limit = max(counts)
        self.current = current
        self._apply = apply
        self._lock = threading.Lock()
        self._steps = self._checked = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._best = math.inf
        self._pending: int | None = None
        self._last = _counters()
        self._trial: tuple[int, float] | None = None  # (count before, its median step) on trial
        # no more threads before this step: a short reply keeps the count chosen at load, so
        # only generations long enough to repay a failed trial (~4 slow steps) pay for one
        self._blocked_until = self.FIRST_TRIAL
        self._backoff = self.BACKOFF
        # (step, cores others took, count after) of the last checks; -1: a failed trial
        self.history: collections.deque[tuple[int, float, int]] = collections.deque(maxlen=32)

    def observe(self, seconds: float) -> None:
        """Record one decode step's time; may change the thread count for the next step."""
        with self._lock:
            self._steps += 1
            self._recent.append(seconds)
            med = statistics.median(self._recent)
            if self._trial is not None and len(self._recent) >= self.TRIAL_STEPS:
                self._judge_trial(med)
                return
            slow = len(self._recent) == self.WINDOW and med > self.SLOWDOWN * self._best
            if len(self._recent) == self.WINDOW:
                self._best = min(self._best, med)
            since = self._steps - self._checked
            if since >= self.CHECK_STEPS or (slow and since >= self.WINDOW):
                self._check()

    def _judge_trial(self, med: float) -> None:
        assert self._trial is not None
        before, before_med = self._trial
        self._trial = None
        if med > self.TRIAL_WORSE * before_med:
            logger.debug("thread tuner: %d threads %.1f ms/step, worse than %d at %.1f: back",
                         self.current, med * 1e3, before, before_med * 1e3)
            self._blocked_until = self._steps + self._backoff
            self._backoff *= 2
            self._switch(before)
            self.history.append((self._steps, -1.0, before))
        else:
            self._backoff = self.BACKOFF

    def _switch(self, count: int) -> None:
        self._apply(count)
        self.current = count
        self._recent.clear()
        self._best = math.inf  # step times at the new count start a new baseline
        self._pending = None

    def _check(self) -> None:
        now = _counters()
        others = _others_busy(self._last, now)
        if others is None:  # too short a window: keep counting from the last reading
            return
        self._last, self._checked = now, self._steps
        usable = len(now[0])
        target = _share(usable - others, usable, self.limit)
        if target > self.current and self._steps < self._blocked_until:
            target = self.current  # a recent trial of more threads was slower
        agreed = target == self._pending
        self._pending = target
        if target != self.current and agreed and self._recent:
            logger.debug("thread tuner: others use %.1f of %d CPUs: %d -> %d threads",
                         others, usable, self.current, target)
            if target > self.current:
                self._trial = (self.current, statistics.median(self._recent))
            self._switch(target)
        self.history.append((self._steps, round(others, 2), self.current))


def _counters() -> tuple[list[float], float, float]:
    """(busy seconds of each usable CPU, this process's CPU seconds, wall clock)."""
    import time

    import psutil

    cpus = _usable_cpus()
    try:
        per = psutil.cpu_times(percpu=True)
        busy = [per[c].user + per[c].system + per[c].nice + getattr(per[c], "irq", 0.0)
                + getattr(per[c], "softirq", 0.0) for c in cpus if c < len(per)]
        own = psutil.Process().cpu_times()
    except (OSError, RuntimeError, psutil.Error):
        return [], 0.0, time.perf_counter()
    return busy, own.user + own.system, time.perf_counter()


def _others_busy(before: tuple[list[float], float, float],
                 after: tuple[list[float], float, float]) -> float | None:
    """Cores other processes kept busy between two :func:`_counters` readings (None: unknown)."""
    wall = after[2] - before[2]
    if wall < 0.05 or not before[0] or len(before[0]) != len(after[0]):
        return None  # /proc/stat ticks are 10 ms: a shorter window says nothing
    all_busy = sum(after[0]) - sum(before[0])
    return max(0.0, (all_busy - (after[1] - before[1])) / wall)


def _share(idle: float, usable: int, limit: int) -> int:
    """Threads for ``idle`` free CPUs of ``usable``: a core counts when more than half idle."""
    cores = _physical_share(usable)
    return max(1, min(limit, cores, math.floor(idle * cores / usable + 0.5)))
