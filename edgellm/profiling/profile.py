"""Profile one model on this host: where the time went, and where the memory went over time.

:func:`profile` loads a model, feeds it a prompt of exactly ``prompt_tokens`` tokens and
decodes ``gen_tokens`` greedily (past EOS, so the work is fixed), while a
:class:`~edgellm.profiling.memory.ProcessSampler` reads the process's RSS every ``interval_ms``
from a watcher process (and a thread, which also reads the session's KV token count). The
phases (load, prefill, decode) are marked on the same clock from the generation's timings; a
drop of the KV token count seen by the sampler is a KV eviction. The memory breakdown at the
end comes from the runtime's own accounting (:meth:`edgellm.model.Model.memory`) and is set
beside the planner's prediction for the same artifact, backend, context and KV budget, with
the error in percent.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from edgellm.errors import EdgeLLMError, InvalidInputError
from edgellm.profiling.bench import DEFAULT_PROMPT
from edgellm.profiling.machine import machine_info
from edgellm.profiling.memory import MemorySampler, ProcessSampler

if TYPE_CHECKING:
    from edgellm.model import Model
    from edgellm.runtimes.loop import Timings

logger = logging.getLogger(__name__)

__all__ = ["BREAKDOWN_ROWS", "Phase", "ProfileReport", "profile"]

#: Breakdown rows: (row, the Model.memory() keys measured, the planner breakdown keys predicted).
#: "other" is measured as peak RSS minus the rows above it (Python, runtime libraries, tokenizer).
BREAKDOWN_ROWS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("weights", ("weights",), ("weights",)),
    ("kv", ("kv",), ("kv",)),
    ("scratch", ("compute",), ("compute",)),
    ("other", (), ("runtime", "tokenizer")),
)


@dataclass(frozen=True)
class Phase:
    """A stretch of the timeline: ``name`` from ``start_ms`` to ``end_ms`` (sampler clock)."""

    name: str
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class ProfileReport:
    """What :func:`profile` measured. Times in ms, speeds in tokens/s, memory in bytes.

    ``timeline`` is ``[(t_ms, rss_bytes)]``; ``kv_timeline`` ``[(t_ms, kv_tokens)]``;
    ``evictions`` one dict per KV drop seen (``t_ms``, ``tokens_before``, ``tokens_after``).
    ``breakdown`` rows hold ``measured``, ``predicted`` and ``error_pct`` (None where a side
    is unknown). ``peak_rss_bytes`` is the highest sample; ``os_peak_rss_bytes`` the kernel's
    high-water mark for the whole process (what ``/usr/bin/time -v`` reports).
    """

    model_path: str
    prompt_tokens: int
    gen_tokens: int
    load_ms: float
    ttft_ms: float
    prefill_tps: float
    decode_tps: float
    total_ms: float
    peak_rss_bytes: int
    baseline_rss_bytes: int
    os_peak_rss_bytes: int | None
    interval_ms: float
    max_gap_ms: float
    phases: tuple[Phase, ...]
    evictions: tuple[dict[str, float], ...]
    breakdown: dict[str, dict[str, float | None]]
    prediction: str
    timeline: tuple[tuple[float, int], ...] = field(repr=False)
    kv_timeline: tuple[tuple[float, int], ...] = field(repr=False)
    backend: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        data = asdict(self)
        data["timeline"] = [list(p) for p in self.timeline]
        data["kv_timeline"] = [list(p) for p in self.kv_timeline]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileReport:
        """The report :meth:`to_dict` gave (the emulator reads its child's this way)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["phases"] = tuple(Phase(**p) for p in data["phases"])
        known["evictions"] = tuple(data["evictions"])
        for key in ("timeline", "kv_timeline"):
            known[key] = tuple((float(t), int(v)) for t, v in data[key])
        return cls(**known)

    def to_markdown(self) -> str:
        """The human report (same numbers as :meth:`to_dict`)."""
        from edgellm.profiling.report import profile_markdown

        return profile_markdown(self)


def _check(prompt_tokens: int, gen_tokens: int, interval_ms: float) -> None:
    for name, value in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 < interval_ms <= 10:
        raise InvalidInputError(f"interval_ms must be in (0, 10] (a timeline finer than 10 ms), "
                                f"got {interval_ms!r}")


def prompt_ids(model: Model, n: int) -> list[int]:
    """Exactly ``n`` token ids: the bench prompt repeated, cut to length (BOS first if used)."""
    text, ids = DEFAULT_PROMPT, model.tokenize(DEFAULT_PROMPT)
    while len(ids) < n:
        text += " " + DEFAULT_PROMPT
        ids = model.tokenize(text)
    return ids[:n]


def profile(
    model_path: str | os.PathLike[str],
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    *,
    kv_budget: int | str | None = None,
    device: str = "auto",
    backend: str | None = None,
    threads: int | str | None = "auto",
    interval_ms: float = 5.0,
    on_token: Any = None,
) -> ProfileReport:
    """Load ``model_path``, prefill ``prompt_tokens``, decode ``gen_tokens``; time and sample it.

    Without ``kv_budget`` the session holds exactly ``prompt_tokens + gen_tokens``; with one
    (bytes or ``"8MiB"``) it holds what the budget allows and slides past it (4 sink tokens
    kept), so evictions show on the timeline. ``on_token(n, rss_bytes)`` is called after
    each generated token (the emulator reports progress this way).
    """
    from edgellm.api import load

    _check(prompt_tokens, gen_tokens, interval_ms)
    n_ctx = None if kv_budget is not None else prompt_tokens + gen_tokens
    with ProcessSampler(interval_ms=interval_ms) as mem:
        model = load(model_path, backend=backend, device=device, threads=threads, n_ctx=n_ctx,
                     kv_budget=kv_budget, kv_overflow="error" if kv_budget is None else "sliding")
        load_end = mem.now_ms()
        try:
            ids = prompt_ids(model, prompt_tokens)
            session = model.session()
            mem.probe = lambda: session.cache.n_tokens
            mem.sample()  # the phase edges are sampled even when a phase is shorter than interval_ms
            started = mem.now_ms()
            timings = _generate(session, ids, gen_tokens, on_token)
            mem.sample()
            measured = model.memory()
            info = dict(model.info())
        finally:
            mem.probe = None
            model.close()
    phases = _phases(load_end, started, timings)
    return _report(model_path, mem, phases, timings, load_end, measured, info,
                   _predicted(model_path, info, kv_budget))


def _generate(session: Any, ids: list[int], gen_tokens: int, on_token: Any) -> Timings:
    """Greedy decode of ``gen_tokens`` past EOS; ``on_token(n, rss)`` sees each text piece."""
    from edgellm.profiling.memory import current_rss_bytes

    pieces = session.stream(ids, max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    for n, _piece in enumerate(pieces, 1):
        if on_token is not None:
            on_token(n, current_rss_bytes())
    return session.last_result.timings


def _phases(load_end: float, started: float, t: Timings) -> tuple[Phase, ...]:
    first = started + t.ttft_ms
    return (Phase("load", 0.0, load_end), Phase("prefill", started, first),
            Phase("decode", first, started + t.total_ms))


def _evictions(kv: list[tuple[float, int]]) -> tuple[dict[str, float], ...]:
    """Each drop of the KV token count between two samples."""
    return tuple({"t_ms": t1, "tokens_before": n0, "tokens_after": n1}
                 for (_, n0), (t1, n1) in itertools.pairwise(kv) if n1 < n0)


def _max_gap(timeline: list[tuple[float, int]]) -> float:
    return max((b[0] - a[0] for a, b in itertools.pairwise(timeline)), default=0.0)


def _report(model_path: str | os.PathLike[str], mem: MemorySampler, phases: tuple[Phase, ...],
            t: Timings, load_ms: float, measured: dict[str, Any], info: dict[str, Any],
            predicted: tuple[dict[str, int] | None, str]) -> ProfileReport:
    timeline, kv = mem.timeline, mem.probe_timeline
    return ProfileReport(
        model_path=str(model_path), prompt_tokens=t.prompt_tokens, gen_tokens=t.completion_tokens,
        load_ms=load_ms, ttft_ms=t.ttft_ms, prefill_tps=t.prefill_tps, decode_tps=t.decode_tps,
        total_ms=t.total_ms, peak_rss_bytes=mem.peak_rss_bytes,
        baseline_rss_bytes=mem.baseline_rss_bytes, os_peak_rss_bytes=mem.os_peak_rss_bytes,
        interval_ms=mem.interval_ms, max_gap_ms=_max_gap(timeline), phases=phases,
        evictions=_evictions(kv), breakdown=breakdown(measured, mem.peak_rss_bytes, predicted[0]),
        prediction=predicted[1], timeline=tuple(timeline), kv_timeline=tuple(kv),
        backend=info, machine=machine_info(),
    )


def _error_pct(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or not predicted:
        return None
    return (measured - predicted) / predicted * 100.0


def breakdown(measured: dict[str, Any], peak_rss: int,
              predicted: dict[str, int] | None) -> dict[str, dict[str, float | None]]:
    """Rows of :data:`BREAKDOWN_ROWS` plus "total" (peak RSS vs predicted peak), each with
    ``measured``, ``predicted`` and ``error_pct``. A part the runtime does not report is None."""
    rows: dict[str, dict[str, float | None]] = {}
    known = 0
    for row, m_keys, p_keys in BREAKDOWN_ROWS:
        if m_keys:
            values = [measured.get(k) for k in m_keys]
            got = None if any(v is None for v in values) else float(sum(values))
            known += int(got or 0)
        else:
            got = float(peak_rss - known)
        want = None if predicted is None else float(sum(predicted.get(k, 0) for k in p_keys))
        rows[row] = {"measured": got, "predicted": want, "error_pct": _error_pct(got, want)}
    want_total = None if predicted is None else float(sum(predicted.values()))
    rows["total"] = {"measured": float(peak_rss), "predicted": want_total,
                     "error_pct": _error_pct(float(peak_rss), want_total)}
    return rows


def _predicted(model_path: str | os.PathLike[str], info: dict[str, Any],
               kv_budget: int | str | None) -> tuple[dict[str, int] | None, str]:
    """The planner's breakdown for this artifact on this host with the same backend, device,
    context, KV precision and budget, and a line saying what was compared (or why not)."""
    from edgellm.artifact import find_artifact
    from edgellm.devices.planner import PLANNED_FORMATS, host_profile, plan
    from edgellm.kvcache import parse_bytes

    fmt = find_artifact(model_path).format.value
    if fmt not in PLANNED_FORMATS:
        return None, f"no prediction: the planner does not size {fmt} models"
    budget = None if kv_budget is None else parse_bytes(kv_budget)
    try:
        result = plan(model_path, host_profile([fmt]), info.get("n_ctx"), backends=[info["backend"]],
                      kv_budget=budget, kv_precision=info.get("kv_precision"))
    except EdgeLLMError as exc:
        return None, f"no prediction: {exc}"
    device = info.get("device")
    match = [c for c in result.candidates if c.breakdown and c.device in (device, None)]
    if not match:
        return None, f"no prediction for {info['backend']} on {device}"
    c = match[0]
    return dict(c.breakdown), f"planner: {c.label} at {c.context} tokens"
