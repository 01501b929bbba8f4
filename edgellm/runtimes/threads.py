"""How many CPU threads a backend gets: exact when asked, else the cores actually free.

``threads=N`` is used as given; ``$EDGELLM_THREADS`` next; otherwise ("auto", the default)
the count is the physical cores this process may run on (``sched_getaffinity``) scaled by
the share of them that was idle over a short window (``/proc/stat`` through psutil). A
device running other busy work gets fewer threads: spinning thread pools collapse when a
peer is descheduled (DESIGN.md: llama.cpp at 2 threads beside one busy process on 2 cores,
11 tokens/s; at 1 thread, 85). :data:`SPIN` says, per backend, which knob stops its idle
threads from spinning; backends turn it on only for an automatic count, since an explicit
count on a dedicated machine is better served by spinning.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from edgellm.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["AUTO", "THREADS_ENV", "ThreadChoice", "choose_threads", "free_cores", "parse_threads"]

AUTO = "auto"

#: Environment variable: the thread count when the caller gives none.
THREADS_ENV = "EDGELLM_THREADS"

#: How long the idle share is measured at load (seconds). /proc/stat counts in 10 ms ticks
#: (USER_HZ 100), so 0.2 s gives 20 ticks per CPU: a busy peer shows as ~1.0 core used.
IDLE_WINDOW_S = 0.2


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count, whether it was chosen automatically, and why."""

    count: int
    auto: bool
    reason: str


def parse_threads(value: object, where: str = "threads") -> int | str | None:
    """``value`` checked: a positive int, "auto", or None (= auto)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None if value is None else AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{where} must be a positive integer or 'auto', got {value!r}")
    return value


def env_threads() -> int | None:
    """``$EDGELLM_THREADS`` as a thread count, or None when it is unset, empty or "auto"."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw or raw.lower() == AUTO:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInputError(f"{THREADS_ENV}={raw!r} is not a thread count; set a positive integer, "
                                f"or 'auto' (the cores free at load), or unset it")
    return int(raw)


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
    # a core counts as free when more than half of it was idle; never fewer than one thread
    count = max(1, min(cores, math.floor(idle * cores / usable + 0.5)))
    reason = f"auto: {idle:.1f} of {usable} CPUs idle over {window_s * 1000:.0f} ms, {cores} physical"
    logger.info("threads %d (%s)", count, reason)
    return ThreadChoice(count, True, reason)
