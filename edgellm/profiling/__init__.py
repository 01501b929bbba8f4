"""Profiling on the device: RSS timeline, benchmarks, and what machine they ran on.

``edgellm.profiling.bench`` imports the runtime only when called, so importing this
package stays light.
"""

from __future__ import annotations

from edgellm.profiling.bench import DEFAULT_PROMPT, BenchReport, bench
from edgellm.profiling.machine import machine_info
from edgellm.profiling.memory import MemorySampler, current_rss_bytes, os_peak_rss_bytes

__all__ = [
    "DEFAULT_PROMPT",
    "BenchReport",
    "bench",
    "machine_info",
    "MemorySampler",
    "current_rss_bytes",
    "os_peak_rss_bytes",
]
