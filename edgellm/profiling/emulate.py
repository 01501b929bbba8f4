"""Run a profile as if on a smaller device: its core count and its memory budget.

:func:`emulate` starts :func:`~edgellm.profiling.profile.profile` in a child process pinned
(``sched_setaffinity``) to as many of this host's CPUs as the device has cores, and watches the
child's resident memory from here every ``interval_ms``. When the child goes over the device
profile's memory budget it is killed (never this process) and the report says at which token
it happened. Speed on the device itself is not emulated (this host's cores and memory are
not the device's); the report gives an upper bound instead: bytes read per decoded token
(the weights, plus the KV cache at the average context) divided by the device's memory
bandwidth (``bandwidth`` in the profile, sourced from its datasheet).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from edgellm.errors import EdgeLLMError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["EmulationReport", "decode_upper_bound", "emulate"]

# The child: pin itself, profile, print one JSON line per generated token and one at the end.
_CHILD = """
import json, os, sys
cpus, kwargs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if cpus and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, cpus)
from edgellm.errors import EdgeLLMError
from edgellm.profiling.profile import profile
def tick(n, rss):
    print(json.dumps({"token": n, "rss": rss}), flush=True)
try:
    report = profile(**kwargs, on_token=tick)
except EdgeLLMError as exc:
    print(json.dumps({"error": str(exc), "kind": type(exc).__name__}), flush=True)
    sys.exit(2)
print(json.dumps({"report": report.to_dict()}), flush=True)
"""


@dataclass(frozen=True)
class EmulationReport:
    """What :func:`emulate` saw. ``oom`` is None when the run fit the budget, else
    ``{"token", "needed_bytes", "budget_bytes"}`` (token 0: before the first token)."""

    device: str
    description: str
    device_cores: int
    pinned_cpus: tuple[int, ...]
    budget_bytes: int
    peak_rss_bytes: int
    oom: dict[str, int] | None
    message: str
    bandwidth_bytes_per_s: float | None
    bytes_per_token: int | None
    decode_upper_bound_tps: float | None
    estimate_note: str
    profile: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["pinned_cpus"] = list(self.pinned_cpus)
        return data

    def to_markdown(self) -> str:
        """The emulation summary, then the child's profile when it finished."""
        from edgellm.profiling.report import emulation_markdown

        return emulation_markdown(self)


def _pin(cores: int) -> tuple[int, ...]:
    try:
        usable = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return ()
    return tuple(usable[:cores])


def decode_upper_bound(model_path: str | os.PathLike[str], bandwidth: float | None, kv_precision: str,
                       avg_context: int) -> tuple[int | None, float | None, str]:
    """(bytes read per token, tokens/s upper bound, how it was computed) for ``bandwidth`` B/s."""
    from edgellm.devices.planner import describe_model, kv_bytes_per_token

    if bandwidth is None:
        return None, None, "no estimate: the profile gives no memory bandwidth"
    try:
        info = describe_model(model_path)
    except EdgeLLMError as exc:
        return None, None, f"no estimate: {exc}"
    if info.file_bytes is None:
        return None, None, "no estimate: the weight bytes of this model are unknown"
    kv = kv_bytes_per_token(info.spec, kv_precision if kv_precision in ("f32", "f16", "q8_0", "q4_0", "u8")
                            else "f16") * avg_context
    total = info.file_bytes + kv
    note = (f"upper-bound estimate: weights {info.file_bytes / 2**20:.1f} MiB + KV {kv / 2**20:.1f} MiB "
            f"at {avg_context} tokens read per token / {bandwidth / 1e9:.1f} GB/s")
    return total, bandwidth / total, note


def emulate(
    model_path: str | os.PathLike[str],
    device: str,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    *,
    kv_budget: int | str | None = None,
    backend: str | None = None,
    interval_ms: float = 5.0,
    timeout_s: float = 600.0,
) -> EmulationReport:
    """Profile ``model_path`` in a child pinned to ``device``'s cores, killed past its budget."""
    from edgellm.devices.profile import load_profile

    prof = load_profile(device)
    cpus = _pin(prof.cpu.cores)
    kwargs = {"model_path": str(model_path), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
              "kv_budget": kv_budget, "backend": backend, "device": "cpu"}
    watch = _Watch(cpus, kwargs, prof.budget_bytes, interval_ms, timeout_s)
    watch.run()
    report = watch.result.get("report")
    kv = (report or {}).get("backend", {}).get("kv_precision") or "f16"
    est = decode_upper_bound(model_path, prof.memory_bandwidth, kv, prompt_tokens + gen_tokens // 2)
    return EmulationReport(
        device=prof.name, description=prof.description, device_cores=prof.cpu.cores,
        pinned_cpus=cpus, budget_bytes=prof.budget_bytes, peak_rss_bytes=watch.peak,
        oom=watch.oom, message=_message(prof.name, watch, cpus, prof.cpu.cores),
        bandwidth_bytes_per_s=prof.memory_bandwidth, bytes_per_token=est[0],
        decode_upper_bound_tps=est[1], estimate_note=est[2], profile=report,
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _message(device: str, watch: _Watch, cpus: tuple[int, ...], cores: int) -> str:
    pinned = (f"pinned to {len(cpus)} CPU(s) {list(cpus)}" + (f" (the device has {cores} cores; this host "
              f"has fewer)" if len(cpus) < cores else "")) if cpus else "not pinned (no sched_setaffinity)"
    if watch.oom is not None:
        o = watch.oom
        where = f"at token {o['token']}" if o["token"] else "before the first token"
        return (f"would run out of memory on {device} {where} (needed {_mib(o['needed_bytes'])}, "
                f"budget {_mib(o['budget_bytes'])}); {pinned}")
    return f"fits {device}: peak {_mib(watch.peak)} of a {_mib(watch.budget)} budget; {pinned}"


class _Watch:
    """The child process and what was seen of it: tokens, RSS, the final report or error."""

    def __init__(self, cpus: tuple[int, ...], kwargs: dict[str, Any], budget: int,
                 interval_ms: float, timeout_s: float) -> None:
        self.cpus, self.kwargs, self.budget = cpus, kwargs, budget
        self.interval_s, self.timeout_s = interval_ms / 1000.0, timeout_s
        self.token = 0
        self.peak = 0
        self.oom: dict[str, int] | None = None
        self.result: dict[str, Any] = {}
        self.stderr: list[str] = []

    def _tail(self, stream: Any) -> None:
        """Keep the child's last stderr lines (a pipe nobody reads would block it)."""
        for line in stream:
            if line.strip():
                self.stderr = [*self.stderr[-4:], line.strip()]

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "token" in msg:
                self.token = int(msg["token"])
            else:
                self.result.update(msg)

    def run(self) -> None:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(list(self.cpus)),
                                 json.dumps(self.kwargs)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        readers = [threading.Thread(target=self._read, args=(proc.stdout,), daemon=True),
                   threading.Thread(target=self._tail, args=(proc.stderr,), daemon=True)]
        for r in readers:
            r.start()
        try:
            self._watch(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for r in readers:
                r.join(timeout=5)
        if self.oom is None:
            self._check_child(proc)

    def _watch(self, proc: subprocess.Popen[str]) -> None:
        child = psutil.Process(proc.pid)
        deadline = time.monotonic() + self.timeout_s
        while proc.poll() is None:
            try:
                rss = int(child.memory_info().rss)
            except psutil.Error:
                return  # it just exited
            self.peak = max(self.peak, rss)
            if rss > self.budget:
                proc.kill()  # the emulated device's OOM killer: the child, never this process
                self.oom = {"token": self.token, "needed_bytes": rss, "budget_bytes": self.budget}
                return
            if time.monotonic() > deadline:
                raise InvalidInputError(f"emulation of {self.kwargs['model_path']} took longer than "
                                        f"{self.timeout_s:.0f} s; lower --gen-tokens or --prompt-tokens")
            time.sleep(self.interval_s)

    def _check_child(self, proc: subprocess.Popen[str]) -> None:
        if "report" in self.result:
            self.peak = max(self.peak, int(self.result["report"].get("peak_rss_bytes") or 0))
            return
        if "error" in self.result:  # the child's one-line error, as an input mistake or not
            from edgellm import errors

            kind = getattr(errors, str(self.result.get("kind")), EdgeLLMError)
            bad_input = isinstance(kind, type) and issubclass(kind, ValueError)
            raise (InvalidInputError if bad_input else EdgeLLMError)(self.result["error"])
        last = self.stderr[-1] if self.stderr else "no output"
        raise EdgeLLMError(f"the emulation child exited with code {proc.returncode}: {last}")
