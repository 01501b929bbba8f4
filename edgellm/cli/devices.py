"""``edgellm devices list|show NAME|FILE|detect``: device profiles and this host."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgellm.cli._common import add_command, format_bytes, print_json
from edgellm.cli.inspect import format_tree

if TYPE_CHECKING:
    from edgellm.devices import DeviceProfile

__all__ = ["add_parser", "run", "profile_table", "profile_lines"]

_DESCRIPTION = """\
Device profiles say how much memory a model may use on a device (the budget), what its CPU,
GPU and NPU are, and which backends run there, best first. Built-in profiles ship with
edgellm; add or override one with a <name>.toml file in $EDGELLM_DEVICES_DIR
(default ~/.config/edgellm/devices).

  edgellm devices list
  edgellm devices show raspberry-pi-5-8gb
  edgellm devices show ./my-board.toml --json
  edgellm devices detect"""

_COLUMNS = ("NAME", "MEMORY", "BUDGET", "CPU", "GPU", "NPU", "BACKENDS")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``devices`` and its actions ``list``, ``show`` and ``detect``."""
    p = add_command(subparsers, "devices", "list, show and detect device profiles", _DESCRIPTION)
    actions = p.add_subparsers(dest="devices_action", metavar="<action>", required=True)
    listing = add_command(actions, "list", "a table of every known device profile")
    show = add_command(actions, "show", "one profile in full, by name or .toml file")
    show.add_argument("profile", metavar="NAME|FILE",
                      help="profile name (see 'devices list') or a .toml path")
    detect = add_command(actions, "detect", "describe this machine as a profile named this-host")
    for action in (listing, show, detect):
        action.add_argument("--json", action="store_true", help="print JSON")
    return p


def _cpu_cell(p: DeviceProfile) -> str:
    return f"{p.cpu.cores}c/{p.cpu.threads}t {p.cpu.arch}"


def _gpu_cell(p: DeviceProfile) -> str:
    if p.gpu is None:
        return "-"
    where = "shared" if p.gpu.shared_with_host else format_bytes(p.gpu.memory_bytes)
    return f"{p.gpu.kind} ({where})" if p.gpu.memory_bytes is not None else p.gpu.kind


def _npu_cell(p: DeviceProfile) -> str:
    if p.npu is None:
        return "-"
    return f"{p.npu.kind} ({p.npu.tops:g} TOPS)" if p.npu.tops is not None else p.npu.kind


def _backends_cell(p: DeviceProfile) -> str:
    return " ".join(f"{backend}:{device}" for backend, device in p.backends) or "-"


def profile_table(profiles: list[DeviceProfile]) -> list[str]:
    """Aligned text rows: name, memory, budget, cpu, gpu, npu, backends."""
    rows = [_COLUMNS] + [
        (p.name, format_bytes(p.total_memory_bytes), format_bytes(p.budget_bytes), _cpu_cell(p),
         _gpu_cell(p), _npu_cell(p), _backends_cell(p))
        for p in profiles
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _sized(n: int) -> str:
    return f"{format_bytes(n)} ({n} bytes)"


def _part(data: dict[str, Any] | None) -> dict[str, Any] | str:
    """A cpu/gpu/npu table without its unset fields, memory in GiB; "none" when absent."""
    if data is None:
        return "none"
    shown = {k: v for k, v in data.items() if v is not None and v != ""}
    if "memory_bytes" in shown:
        shown["memory"] = _sized(shown.pop("memory_bytes"))
    return shown


def _human(p: DeviceProfile) -> dict[str, Any]:
    """The profile for reading: sizes in GiB/MiB, unset fields left out."""
    raw = p.to_dict()
    data: dict[str, Any] = {"name": p.name, "description": p.description,
                            "memory": _sized(p.total_memory_bytes), "budget": _sized(p.budget_bytes)}
    if p.available_memory_bytes is not None:
        data["available memory"] = _sized(p.available_memory_bytes)
    if p.memory_bandwidth is not None:
        data["memory bandwidth"] = f"{p.memory_bandwidth / 1e9:.1f} GB/s (datasheet peak)"
    data.update(cpu=_part(raw["cpu"]), gpu=_part(raw["gpu"]), npu=_part(raw["npu"]),
                backends=[f"{backend}:{device}" for backend, device in p.backends])
    if p.source:
        data["source"] = p.source
    return data


def profile_lines(p: DeviceProfile) -> list[str]:
    """One profile as indented ``key: value`` lines."""
    return format_tree(_human(p))


def _print_profile(p: DeviceProfile, as_json: bool) -> None:
    if as_json:
        print_json(p.to_dict())
    else:
        print("\n".join(profile_lines(p)))


def _list(args: argparse.Namespace) -> None:
    from edgellm.devices import list_profiles

    profiles = list_profiles()
    if args.json:
        print_json([p.to_dict() for p in profiles])
    else:
        print("\n".join(profile_table(profiles)))


def _show(args: argparse.Namespace) -> None:
    from edgellm.devices import load_profile

    _print_profile(load_profile(args.profile), args.json)


def _detect(args: argparse.Namespace) -> None:
    from edgellm.devices import detect

    _print_profile(detect(), args.json)


_ACTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "list": _list,
    "show": _show,
    "detect": _detect,
}


def run(args: argparse.Namespace) -> int:
    """Run the chosen action."""
    _ACTIONS[args.devices_action](args)
    return 0
