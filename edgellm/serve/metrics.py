"""Server metrics in Prometheus' text exposition format (version 0.0.4), without a client library.

Counters and histograms are updated on the event loop's thread (a finished request reports
there); gauges are read when ``/metrics`` is scraped. Names follow Prometheus' conventions
(base units, ``_total`` counters) and vLLM's for the latency histograms
(``time_to_first_token_seconds``, ``time_per_output_token_seconds``).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["Histogram", "Metrics"]

PREFIX = "edgellm_"
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are exposed."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self) -> list[str]:
        """The exposition lines of this histogram."""
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for le, n in zip([*map(repr, self.buckets), "+Inf"], self.counts, strict=True):
            running += n
            out.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        out += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {running}"]
        return out


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


class Metrics:
    """What ``/metrics`` reports: request and token counters, latency histograms, gauges."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.requests: Counter[tuple[tuple[str, str], ...]] = Counter()
        self.tokens: Counter[str] = Counter()
        self.cancelled = 0
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from request to the first generated token.", TTFT_BUCKETS_S)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean decode time per generated token after the first, per request.",
                              TPOT_BUCKETS_S)
        self.gauges = gauges  # name -> (help, read())

    def request(self, endpoint: str, status: int) -> None:
        """Count a finished request by endpoint and HTTP status."""
        self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1

    def generation(self, prompt: int, completion: int, cached: int, ttft_s: float,
                   tpot_s: float | None, cancelled: bool) -> None:
        """Count one finished generation."""
        self.tokens["prompt"] += prompt
        self.tokens["completion"] += completion
        self.tokens["cached"] += cached
        self.cancelled += cancelled
        if completion:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def read_gauges(self) -> dict[str, float]:
        """Every gauge's value now (may wait for a backend: call it off the event loop)."""
        return {name: read() for name, (_, read) in self.gauges.items()}

    def render(self, gauges: dict[str, float]) -> str:
        """The whole exposition text, with the gauges' values read by :meth:`read_gauges`."""
        out = [f"# HELP {PREFIX}requests_total Requests answered, by endpoint and HTTP status.",
               f"# TYPE {PREFIX}requests_total counter"]
        out += [f"{PREFIX}requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
        out += [f"# HELP {PREFIX}tokens_total Tokens by kind: prompt, completion, cached (prompt "
                "tokens reused from a session's KV cache).", f"# TYPE {PREFIX}tokens_total counter"]
        kinds = ("prompt", "completion", "cached")
        out += [f'{PREFIX}tokens_total{{kind="{k}"}} {self.tokens[k]}' for k in kinds]
        cancelled = PREFIX + "requests_cancelled_total"
        out += [f"# HELP {cancelled} Generations stopped because the client left.",
                f"# TYPE {cancelled} counter", f"{cancelled} {self.cancelled}"]
        out += self.ttft.lines() + self.tpot.lines()
        for name, (help, _) in self.gauges.items():
            full = PREFIX + name
            out += [f"# HELP {full} {help}", f"# TYPE {full} gauge", f"{full} {gauges[name]}"]
        return "\n".join(out) + "\n"
