"""DeviceProfile: what a device offers a model, read from a TOML file and checked.

A profile says how much memory a model may use on a device (``budget_bytes``: weights,
KV cache and runtime overhead together), what its CPU, GPU and NPU are, and which
``(backend, device)`` pairs run there, best first. Built-in profiles ship as package data
in ``edgellm/devices/profiles/*.toml``; a user adds or overrides one by dropping a file
named ``<name>.toml`` in :func:`user_profiles_dir`.

A profile file looks like this (memory values are written the way people write them)::

    name = "raspberry-pi-5-8gb"          # must equal the file name without .toml
    description = "Raspberry Pi 5, 8 GB"
    memory = "8 GiB"                     # "512 MiB", "7.5 GiB", "8 GB" or an integer of bytes
    budget = "5.6 GiB"
    backends = [["llamacpp", "cpu"], ["onnxruntime", "cpu"]]

    [cpu]
    arch = "aarch64"
    cores = 4
    threads = 4
    isa = ["neon", "fp16", "dotprod"]

    [gpu]            # optional: kind, memory, shared_with_host, notes
    [npu]            # optional: kind, tops, static_shapes, symmetric_int4, max_prompt_len, notes

Every mistake raises one :class:`~edgellm.errors.DeviceProfileError` naming the file, the
field, the offending value and what to write instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from edgellm.errors import DeviceProfileError, UnknownBackendError, UnknownDeviceError
from edgellm.runtimes.base import DEVICES, backend_names, get_backend

if TYPE_CHECKING:
    from importlib.abc import Traversable

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHES",
    "ARM_ISA",
    "GPU_KINDS",
    "ISA_NAMES",
    "NPU_KINDS",
    "X86_ISA",
    "CpuSpec",
    "DeviceProfile",
    "GpuSpec",
    "NpuSpec",
    "list_profiles",
    "load_profile",
    "parse_memory",
    "profile_from_dict",
    "profile_names",
    "user_profiles_dir",
]

#: CPU architectures, as ``platform.machine()`` spells them on Linux.
ARCHES = ("x86_64", "aarch64")

#: ISA features a profile may list: the ones llama.cpp, OpenVINO and ONNX Runtime choose
#: kernels by. x86 names are Linux's /proc/cpuinfo flags; Arm names are the common ones
#: (neon = asimd, fp16 = asimdhp, dotprod = asimddp in /proc/cpuinfo).
X86_ISA = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
           "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
ARM_ISA = ("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme")
ISA_NAMES = X86_ISA + ARM_ISA

#: GPU families. "unknown": detection saw a GPU but could not tell which.
GPU_KINDS = ("nvidia-cuda", "amd-rocm", "intel-xe", "apple-metal", "adreno", "mali", "unknown")

#: NPU families.
NPU_KINDS = ("intel-npu", "qualcomm-hexagon", "rockchip-rknpu", "apple-ane", "amd-xdna")

#: Size units: binary (IEC) and decimal (SI) multiples of a byte, matched case-insensitively.
_UNITS = {
    "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*$")
_SIZE_HELP = ('a size such as "8 GiB", "512 MiB" or "7.5 GiB" (units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB) '
              "or an integer number of bytes")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class CpuSpec:
    """The CPU: architecture, physical cores, hardware threads and ISA features."""

    arch: str
    cores: int
    threads: int
    isa: tuple[str, ...]
    performance_cores: int | None = None  # big cores on big.LITTLE / hybrid CPUs
    model: str = ""


@dataclass(frozen=True)
class GpuSpec:
    """A GPU. ``memory_bytes`` is what the GPU may address; ``shared_with_host`` means that
    memory is the host RAM (integrated GPUs). Detected GPUs may leave both unknown (None)."""

    kind: str
    memory_bytes: int | None
    shared_with_host: bool | None
    notes: str = ""


@dataclass(frozen=True)
class NpuSpec:
    """An NPU and the constraints a model must meet to run on it."""

    kind: str
    static_shapes: bool  # compiled for fixed prompt / KV lengths
    symmetric_int4: bool  # int4 weights must be symmetric (no zero point)
    tops: float | None = None  # None: the vendor publishes no figure
    max_prompt_len: int | None = None
    notes: str = ""


@dataclass(frozen=True)
class DeviceProfile:
    """One device: memory, budget, CPU, optional GPU and NPU, and the backends that run there.

    ``backends`` is ordered by preference: ``(("openvino", "gpu"), ("llamacpp", "cpu"))``.
    ``source`` is the file the profile came from ("" for detected or in-memory profiles).
    """

    name: str
    description: str
    total_memory_bytes: int
    budget_bytes: int
    cpu: CpuSpec
    backends: tuple[tuple[str, str], ...]
    gpu: GpuSpec | None = None
    npu: NpuSpec | None = None
    available_memory_bytes: int | None = None  # only known for the host (detect())
    source: str = ""
    memory_bandwidth: float | None = None  # bytes/s, the datasheet's peak (``bandwidth = "17 GB/s"``)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> DeviceProfile:
        """A profile from parsed TOML data; see :func:`profile_from_dict`."""
        return profile_from_dict(data, source)


# -- value converters: each returns the value or raises _Bad(what was expected) ----------------


class _Bad(Exception):
    """A field value is wrong; ``expected`` says what to write instead."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _show(value: Any) -> str:
    """A value as it would be written in TOML/JSON: "four", 4, ["a"], true."""
    return json.dumps(value, default=str)


def _size_bytes(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Bad(f"expected {_SIZE_HELP}, not a negative number")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise _Bad(f"expected {_SIZE_HELP}")
    return int(round(float(match.group(1)) * unit))


_BANDWIDTH = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(GB|MB|GiB|MiB)/s\s*$")
_BANDWIDTH_UNITS = {"GB": 1e9, "MB": 1e6, "GiB": 2.0**30, "MiB": 2.0**20}


def _bandwidth(value: Any) -> float:
    """``"17.1 GB/s"`` -> bytes per second (GB is 10^9 bytes, as datasheets write it)."""
    m = _BANDWIDTH.match(value) if isinstance(value, str) else None
    if m is None or float(m.group(1)) <= 0:
        raise _Bad('a memory bandwidth such as "17.1 GB/s" (GB, MB, GiB or MiB per second)')
    return float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2)]


def parse_memory(value: int | str) -> int:
    """Bytes from a human size: ``"8 GiB"`` -> 8589934592, ``"512 MiB"``, ``"7.5 GiB"``,
    ``"8 GB"`` (decimal); a bare integer is bytes. Raises DeviceProfileError otherwise."""
    try:
        return _size_bytes(value)
    except _Bad as bad:
        raise DeviceProfileError(f"memory size {_show(value)}: {bad.expected}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("expected a string in double quotes")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _Bad("expected a lowercase name of letters, digits, '.', '_' and '-', "
                   'such as "raspberry-pi-5-8gb"')
    return value


def _positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _Bad("expected an integer >= 1")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("expected true or false")
    return value


def _tops(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise _Bad("expected a number > 0 (tera-operations per second)")
    return float(value)


def _one_of(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in allowed:
            raise _Bad(f"expected one of {', '.join(allowed)}")
        return str(value)

    return convert


def _isa(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad(f'expected a list of strings such as ["avx2", "fma"] from: {", ".join(ISA_NAMES)}')
    unknown = [v for v in value if v not in ISA_NAMES]
    if unknown:
        raise _Bad(f"{_show(unknown[0])} is not a known ISA feature; use names from: {', '.join(ISA_NAMES)}")
    return tuple(value)


def _backends(value: Any) -> tuple[tuple[str, str], ...]:
    names = [n for n in backend_names() if n != "fake"]  # the test double is not a device backend
    shape = f'expected a list of [backend, device] pairs such as [["llamacpp", "cpu"]] with backend ' \
            f"one of {', '.join(names)}"
    if not isinstance(value, list) or not value:
        raise _Bad(shape)
    pairs = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise _Bad(f"{_show(item)} is not a pair; {shape}")
        pairs.append(_backend_pair(item[0], item[1], names))
    return tuple(pairs)


def _backend_pair(backend: str, device: str, names: list[str]) -> tuple[str, str]:
    if backend not in names:
        raise _Bad(f"unknown backend {_show(backend)}; use one of {', '.join(names)}")
    try:
        drives = get_backend(backend).devices
    except UnknownBackendError as exc:  # pragma: no cover - names come from the registry
        raise _Bad(str(exc)) from None
    if device not in drives:
        devices = [d for d in DEVICES if d != "auto"]
        raise _Bad(f"backend {backend} drives {', '.join(drives)}, not {_show(device)} "
                   f"(devices: {', '.join(devices)})")
    return (backend, device)


# -- the schema: one row per field ---------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    key: str  # TOML key
    attr: str  # dataclass attribute
    convert: Callable[[Any], Any]
    hint: str  # shown when the field is missing: what to add
    required: bool = True


_TOP = (
    _Field("name", "name", _name, '"<file name without .toml>"'),
    _Field("description", "description", _text, '"<what the device is>"'),
    _Field("memory", "total_memory_bytes", _size_bytes, '"8 GiB"'),
    _Field("budget", "budget_bytes", _size_bytes, '"5.6 GiB"'),
    _Field("backends", "backends", _backends, '[["llamacpp", "cpu"]]'),
    _Field("bandwidth", "memory_bandwidth", _bandwidth, '"17 GB/s"', required=False),
)
_CPU = (
    _Field("arch", "arch", _one_of(ARCHES), '"x86_64" or "aarch64"'),
    _Field("cores", "cores", _positive_int, "<integer>"),
    _Field("threads", "threads", _positive_int, "<integer>"),
    _Field("isa", "isa", _isa, '["avx2", "fma"]'),
    _Field("performance_cores", "performance_cores", _positive_int, "<integer>", required=False),
    _Field("model", "model", _text, '"<CPU name>"', required=False),
)
_GPU = (
    _Field("kind", "kind", _one_of(GPU_KINDS), '"nvidia-cuda"'),
    _Field("memory", "memory_bytes", _size_bytes, '"8 GiB"'),
    _Field("shared_with_host", "shared_with_host", _flag, "true or false"),
    _Field("notes", "notes", _text, '"..."', required=False),
)
_NPU = (
    _Field("kind", "kind", _one_of(NPU_KINDS), '"intel-npu"'),
    _Field("tops", "tops", _tops, "<number>", required=False),
    _Field("static_shapes", "static_shapes", _flag, "true or false"),
    _Field("symmetric_int4", "symmetric_int4", _flag, "true or false"),
    _Field("max_prompt_len", "max_prompt_len", _positive_int, "<integer>", required=False),
    _Field("notes", "notes", _text, '"..."', required=False),
)
_SECTIONS = {"cpu": _CPU, "gpu": _GPU, "npu": _NPU}


class _Reader:
    """Reads one profile's fields, turning every mistake into one DeviceProfileError line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, message: str) -> DeviceProfileError:
        return DeviceProfileError(f"{self.source}: field {field} {message}")

    def section(self, data: Mapping[str, Any], fields: tuple[_Field, ...], prefix: str = ""
                ) -> dict[str, Any]:
        known = {f.key for f in fields} | (set() if prefix else set(_SECTIONS))
        for key in data:
            if key not in known:
                logger.warning("%s: unknown field %s%s ignored", self.source, prefix, key)
        return dict(pair for f in fields if (pair := self.field(data, f, prefix)) is not None)

    def field(self, data: Mapping[str, Any], f: _Field, prefix: str) -> tuple[str, Any] | None:
        """(attribute, converted value), or None for an optional field that is absent."""
        if f.key not in data:
            if not f.required:
                return None
            table = f" under [{prefix[:-1]}]" if prefix else ""
            raise self.fail(f"{prefix}{f.key}", f"is missing: add {f.key} = {f.hint}{table}")
        try:
            return f.attr, f.convert(data[f.key])
        except _Bad as bad:
            raise self.fail(f"{prefix}{f.key}", f"= {_show(data[f.key])}: {bad.expected}") from None

    def table(self, data: Mapping[str, Any], key: str, required: bool) -> dict[str, Any] | None:
        if key not in data:
            if required:
                raise self.fail(key, f"is missing: add a [{key}] table")
            return None
        if not isinstance(data[key], dict):
            raise self.fail(key, f"= {_show(data[key])}: expected a [{key}] table")
        return self.section(data[key], _SECTIONS[key], prefix=f"{key}.")


def profile_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> DeviceProfile:
    """Check parsed profile data and build the profile; ``source`` names it in errors.

    Unknown keys are logged and ignored (newer profiles may carry more). Errors name the
    source, the field, the offending value and what to write instead.
    """
    reader = _Reader(source)
    top = reader.section(data, _TOP)
    cpu_values = reader.table(data, "cpu", required=True)
    gpu_values = reader.table(data, "gpu", required=False)
    npu_values = reader.table(data, "npu", required=False)
    profile = DeviceProfile(
        **top,
        cpu=CpuSpec(**cpu_values or {}),
        gpu=GpuSpec(**gpu_values) if gpu_values is not None else None,
        npu=NpuSpec(**npu_values) if npu_values is not None else None,
        source=source,
    )
    _check_consistency(profile, data, reader)
    return profile


def _check_consistency(p: DeviceProfile, data: Mapping[str, Any], reader: _Reader) -> None:
    """Rules between fields: thread counts, memory sums, backends only for present devices.
    Errors quote the values as written (``data``) and in bytes."""
    cpu, gpu = p.cpu, p.gpu
    if cpu.threads < cpu.cores:
        raise reader.fail("cpu.threads", f"= {cpu.threads}: expected at least cpu.cores ({cpu.cores})")
    if cpu.performance_cores is not None and cpu.performance_cores > cpu.cores:
        raise reader.fail("cpu.performance_cores",
                          f"= {cpu.performance_cores}: expected at most cpu.cores ({cpu.cores})")
    memory = f"memory = {_show(data['memory'])} ({p.total_memory_bytes} bytes)"
    if gpu is not None and gpu.shared_with_host and (gpu.memory_bytes or 0) > p.total_memory_bytes:
        raise reader.fail("gpu.memory", f"= {_show(data['gpu']['memory'])}: a GPU that shares host memory "
                                        f"cannot address more than {memory}; lower gpu.memory")
    discrete = (gpu.memory_bytes or 0) if gpu is not None and not gpu.shared_with_host else 0
    if p.budget_bytes > p.total_memory_bytes + discrete:
        limit = f"{memory} + gpu.memory of the discrete GPU ({discrete} bytes)" if discrete else memory
        raise reader.fail("budget", f"= {_show(data['budget'])} ({p.budget_bytes} bytes): expected at most "
                                    f"{limit}; lower the budget")
    for backend, device in p.backends:
        if device != "cpu" and getattr(p, device) is None:
            raise reader.fail("backends", f"= {_show(data['backends'])}: pair {_show([backend, device])} "
                                          f"needs a [{device}] table; add one or remove the pair")


# -- files: built-in package data, the user directory, explicit paths ---------------------------


def user_profiles_dir() -> Path:
    """``$EDGELLM_DEVICES_DIR``, else ``$XDG_CONFIG_HOME/edgellm/devices`` (``~/.config/...``)."""
    explicit = os.environ.get("EDGELLM_DEVICES_DIR")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edgellm" / "devices"


def _builtin_files() -> dict[str, Traversable]:
    root = resources.files("edgellm.devices").joinpath("profiles")
    return {f.name[: -len(".toml")]: f for f in root.iterdir() if f.name.endswith(".toml")}


def _profile_files() -> dict[str, Traversable]:
    """Profile name -> file; a user file replaces the built-in of the same name."""
    files = _builtin_files()
    user_dir = user_profiles_dir()
    if user_dir.is_dir():
        files.update({p.stem: p for p in sorted(user_dir.glob("*.toml"))})
    return dict(sorted(files.items()))


def profile_names() -> list[str]:
    """Names of every known profile: built-in and user, sorted."""
    return list(_profile_files())


def _read_file(file: Traversable) -> DeviceProfile:
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceProfileError(f"{source}: cannot read the device profile: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line N, column M)"
        raise DeviceProfileError(f"{source}: invalid TOML: {exc}; fix the syntax there") from None
    profile = profile_from_dict(data, source)
    stem = file.name[: -len(".toml")] if file.name.endswith(".toml") else file.name
    if profile.name != stem:
        raise DeviceProfileError(f"{source}: field name = {_show(profile.name)}: expected {_show(stem)}, "
                                 "the file name without .toml (rename the file or the profile)")
    return profile


def list_profiles() -> list[DeviceProfile]:
    """Every known profile, sorted by name; a malformed user file raises DeviceProfileError."""
    return [_read_file(f) for f in _profile_files().values()]


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or os.sep in text


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """A profile by name (user profiles override built-ins) or from a ``.toml`` file path."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        path = Path(text)
        if not path.is_file():
            raise DeviceProfileError(f"device profile file {text!r} does not exist; pass an existing "
                                     ".toml file or a profile name (edgellm devices list)")
        return _read_file(path)
    files = _profile_files()
    if text not in files:
        raise UnknownDeviceError(
            f"unknown device profile {text!r}; known profiles: {', '.join(files)} "
            f"(or pass a path to a .toml file; user profiles go in {user_profiles_dir()})"
        )
    return _read_file(files[text])
