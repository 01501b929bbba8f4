"""Reports of a profile: Markdown, the ``--report DIR`` folder, and the memory picture.

``profile.md`` is rendered from the same dict as ``profile.json`` (every number in it is one
of the JSON's, rounded), so the two cannot disagree. ``memory.png`` needs matplotlib (the
``plot`` extra); without it the folder still gets the JSON and Markdown, and
:func:`write_report` says how to get the picture.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.errors import InvalidInputError

if TYPE_CHECKING:
    from edgellm.profiling.emulate import EmulationReport
    from edgellm.profiling.profile import ProfileReport

logger = logging.getLogger(__name__)

__all__ = ["PLOT_HINT", "ReportFiles", "emulation_markdown", "plot_memory", "profile_markdown",
           "write_report"]

MiB = 2**20

#: What to do when matplotlib is missing.
PLOT_HINT = 'memory.png needs matplotlib: pip install "edgellm[plot]"'

#: Phase colours of the picture (load, prefill, decode).
PHASE_COLOURS = {"load": "#c6dbef", "prefill": "#fdd0a2", "decode": "#c7e9c0"}


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MiB:.1f} MiB"


def _pct(p: float | None) -> str:
    return "n/a" if p is None else f"{p:+.1f}%"


def profile_markdown(report: ProfileReport) -> str:
    """The Markdown report of ``report``."""
    d = report.to_dict()
    name = Path(d["model_path"]).name
    b = d["backend"]
    lines = [
        f"## edgellm profile: {name}", "",
        f"{b.get('backend', '?')} on {b.get('device', '?')}, {b.get('threads', '?')} threads, "
        f"n_ctx {b.get('n_ctx', '?')}, KV {b.get('kv_precision', '?')}; "
        f"{d['prompt_tokens']} prompt tokens, {d['gen_tokens']} generated (greedy).", "",
        "| metric | value |", "|---|---|",
        f"| load | {d['load_ms']:.1f} ms |",
        f"| TTFT | {d['ttft_ms']:.1f} ms |",
        f"| prefill | {d['prefill_tps']:.1f} tok/s |",
        f"| decode | {d['decode_tps']:.1f} tok/s |",
        f"| total (prefill + decode) | {d['total_ms']:.1f} ms |",
        f"| peak RSS (sampled) | {_mib(d['peak_rss_bytes'])} |",
        f"| peak RSS (OS high-water, whole process) | {_mib(d['os_peak_rss_bytes'])} |",
        f"| baseline RSS | {_mib(d['baseline_rss_bytes'])} |",
        f"| samples | {len(d['timeline'])} every {d['interval_ms']:.1f} ms (largest gap "
        f"{d['max_gap_ms']:.1f} ms) |",
        f"| KV evictions | {len(d['evictions'])} |", "",
        "| phase | start ms | end ms |", "|---|---|---|",
        *(f"| {p['name']} | {p['start_ms']:.1f} | {p['end_ms']:.1f} |" for p in d["phases"]),
        "", f"Memory at the end against the prediction ({d['prediction']}):", "",
        "| part | measured | predicted | error |", "|---|---|---|---|",
        *(f"| {row} | {_mib(v['measured'])} | {_mib(v['predicted'])} | {_pct(v['error_pct'])} |"
          for row, v in d["breakdown"].items()),
        "",
        "weights, KV and scratch are the runtime's own accounting; other = peak RSS minus them "
        "(Python, runtime libraries, tokenizer); total = peak RSS against the predicted peak. "
        "The rows are not always the same thing on both sides: the runtime's weights are its files "
        "(the planner's add the working copies a runtime makes, e.g. OpenVINO's float32 lm_head), and "
        "llama.cpp's scratch is the compute buffer it allocated (the planner predicts the pages touched).",
    ]
    for e in d["evictions"]:
        lines.append(f"- eviction at {e['t_ms']:.1f} ms: KV {e['tokens_before']} -> "
                     f"{e['tokens_after']} tokens")
    m = d["machine"]
    lines += ["", f"Machine: {m.get('cpu_model', '?')}, {m.get('physical_cores', '?')} cores, "
                  f"{m.get('total_ram_bytes', 0) / 2**30:.1f} GiB RAM, {m.get('os', '?')}."]
    return "\n".join(lines) + "\n"


def has_matplotlib() -> bool:
    """True when matplotlib can be imported (checked, not imported)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_memory(report: ProfileReport, path: Path) -> Path:
    """Draw RSS over time with the phases shaded and labelled and evictions marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    try:
        t = [p[0] for p in report.timeline]
        ax.plot(t, [p[1] / MiB for p in report.timeline], color="#08519c", lw=1.2, label="RSS")
        for ph in report.phases:
            ax.axvspan(ph.start_ms, max(ph.end_ms, ph.start_ms + 0.5),
                       color=PHASE_COLOURS.get(ph.name, "#eeeeee"), alpha=0.7, label=ph.name)
            ax.text((ph.start_ms + ph.end_ms) / 2, 0.98, ph.name, transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=9)
        for i, e in enumerate(report.evictions):
            ax.axvline(e["t_ms"], color="#a50f15", ls="--", lw=0.8,
                       label="KV eviction" if i == 0 else None)
        ax.set_xlabel("time (ms)")
        ax.set_ylabel("resident memory (MiB)")
        ax.set_title(f"{Path(report.model_path).name}: {report.backend.get('backend', '?')}, "
                     f"peak {report.peak_rss_bytes / MiB:.1f} MiB")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report` by kind (json, markdown, png); ``note`` says
    what was left out and how to get it."""

    paths: dict[str, Path]
    note: str | None = None


def write_report(report: ProfileReport, folder: str | Path) -> ReportFiles:
    """Write ``profile.json``, ``profile.md`` and (with matplotlib) ``memory.png`` into ``folder``."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--report {out}: is a file, not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"--report {out}: cannot create the folder ({exc.strerror})") from None
    paths = {"json": out / "profile.json", "markdown": out / "profile.md"}
    _write(paths["json"], lambda tmp: tmp.write_text(json.dumps(report.to_dict(), indent=1) + "\n",
                                                     encoding="utf-8"))
    _write(paths["markdown"], lambda tmp: tmp.write_text(profile_markdown(report), encoding="utf-8"))
    if not has_matplotlib():
        logger.info(PLOT_HINT)
        return ReportFiles(paths, PLOT_HINT)
    paths["png"] = _write(out / "memory.png", lambda tmp: plot_memory(report, tmp))
    return ReportFiles(paths)


def _write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` into a temporary name beside ``path``, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def emulation_markdown(report: EmulationReport) -> str:
    """The Markdown of an emulation: the verdict, the device, the estimate, then the profile."""
    d = report.to_dict()
    bw = d["bandwidth_bytes_per_s"]
    bound = d["decode_upper_bound_tps"]
    lines = [
        f"## edgellm profile --emulate {d['device']}", "", f"**{d['message']}**", "",
        "| | |", "|---|---|",
        f"| device | {d['description']} |",
        f"| cores (device / pinned here) | {d['device_cores']} / {len(d['pinned_cpus'])} |",
        f"| memory budget | {_mib(d['budget_bytes'])} |",
        f"| peak RSS seen | {_mib(d['peak_rss_bytes'])} |",
        f"| memory bandwidth | {'n/a' if bw is None else f'{bw / 1e9:.1f} GB/s'} |",
        f"| decode on the device (upper bound) | {'n/a' if bound is None else f'{bound:.0f} tok/s'} |",
        "", f"Decode estimate: {d['estimate_note']}. Speeds measured here are this host's, on "
            f"{len(d['pinned_cpus'])} of its CPUs, not the device's.", "",
    ]
    text = "\n".join(lines) + "\n"
    if report.profile is not None:
        from edgellm.profiling.profile import ProfileReport

        text += "\n" + profile_markdown(ProfileReport.from_dict(report.profile))
    return text
