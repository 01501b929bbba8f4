"""Host detection: a :class:`DeviceProfile` named "this-host" for the machine edgellm runs on.

What is read, and from where:

- cores and threads: psutil (physical and logical counts);
- ISA features: the ``flags`` (x86) or ``Features`` (Arm) line of /proc/cpuinfo, or
  ``sysctl hw.optional`` on macOS; no third-party cpuinfo package;
- memory total and available: psutil;
- accelerators: only through the runtimes that are installed, and each only if it is:
  ``openvino.Core().available_devices``, ``onnxruntime.get_available_providers()`` and
  ``llama_cpp.llama_supports_gpu_offload()``. A GPU or NPU entry appears only when one of
  them reports one. A runtime that is not installed is never imported.

The probes are thin; the decisions are pure functions of their results
(:func:`parse_isa_flags`, :func:`host_backends`, :func:`host_gpu`, :func:`host_npu`,
:func:`host_budget`) so they can be tested with made-up inputs.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import subprocess
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

import psutil

from edgellm.devices.profile import ISA_NAMES, X86_ISA, CpuSpec, DeviceProfile, GpuSpec, NpuSpec

logger = logging.getLogger(__name__)

__all__ = [
    "CPUINFO_FLAGS",
    "HOST_NAME",
    "ORT_PROVIDERS",
    "OV_DEVICES",
    "SYSCTL_FLAGS",
    "detect",
    "host_backends",
    "host_budget",
    "host_gpu",
    "host_npu",
    "parse_cpu_model",
    "parse_isa_flags",
    "parse_sysctl_flags",
]

HOST_NAME = "this-host"

#: /proc/cpuinfo flag -> edgellm ISA name. x86 flags keep their Linux names; arm64 hwcaps
#: (Linux arch/arm64/kernel/cpuinfo.c) are renamed: asimd is NEON, asimdhp the FP16 vector
#: arithmetic, asimddp the dot product; 32-bit Arm kernels print "neon" itself.
CPUINFO_FLAGS: dict[str, str] = {
    **{name: name for name in X86_ISA},
    "asimd": "neon", "neon": "neon", "asimdhp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm",
    "bf16": "bf16", "sve": "sve", "sve2": "sve2", "sme": "sme",
}

#: macOS ``sysctl hw.optional`` key -> edgellm ISA name (keys set to 1 when present).
SYSCTL_FLAGS: dict[str, str] = {
    "hw.optional.neon": "neon", "hw.optional.AdvSIMD": "neon",
    "hw.optional.neon_fp16": "fp16", "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.arm.FEAT_DotProd": "dotprod", "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_SME": "sme",
    "hw.optional.avx1_0": "avx", "hw.optional.avx2_0": "avx2", "hw.optional.fma": "fma",
    "hw.optional.avx512f": "avx512f", "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vl": "avx512vl", "hw.optional.avx512vnni": "avx512_vnni",
}

#: OpenVINO device name (before any ".0" index) -> edgellm device. OpenVINO's GPU plugin
#: drives Intel GPUs only, and its NPU plugin the Intel NPU, so the name also says the kind.
OV_DEVICES: dict[str, tuple[str, str | None]] = {
    "CPU": ("cpu", None),
    "GPU": ("gpu", "intel-xe"),
    "NPU": ("npu", "intel-npu"),
}

#: ONNX Runtime provider -> (edgellm device, hardware kind it proves present). Only providers
#: edgellm.runtimes.onnxruntime maps to a device are listed. DirectML runs on any DirectX 12
#: GPU, so its kind is unknown; the OpenVINO provider is left out because its presence says
#: nothing about which Intel device exists.
ORT_PROVIDERS: dict[str, tuple[str, str | None]] = {
    "CPUExecutionProvider": ("cpu", None),
    "CUDAExecutionProvider": ("gpu", "nvidia-cuda"),
    "ROCMExecutionProvider": ("gpu", "amd-rocm"),
    "DmlExecutionProvider": ("gpu", "unknown"),
    "CoreMLExecutionProvider": ("gpu", "apple-metal"),
    "QNNExecutionProvider": ("npu", "qualcomm-hexagon"),
    "VitisAIExecutionProvider": ("npu", "amd-xdna"),
}

#: NPU kind -> (static_shapes, symmetric_int4) for a detected NPU. Intel: OpenVINO GenAI
#: compiles LLMs for the NPU with fixed prompt/response lengths and wants symmetric int4
#: (docs.openvino.ai .../inference-with-genai-on-npu.html). Hexagon (QNN HTP) graphs are
#: compiled for static shapes; its int4 encodings take an offset, so symmetry is not required
#: (docs.qualcomm.com .../htp_guidelines_int4_weights.md). AMD XDNA via Ryzen AI: static shapes.
_NPU_CONSTRAINTS: dict[str, tuple[bool, bool]] = {
    "intel-npu": (True, True),
    "qualcomm-hexagon": (True, False),
    "amd-xdna": (True, False),
}

#: Memory kept free when budgeting this host: the larger of 512 MiB and 10% of total RAM,
#: for the OS, the page cache and the application around the model.
_MARGIN_MIN_BYTES = 512 * 2**20
_MARGIN_FRACTION = 0.10

#: platform.machine() spellings on macOS and Windows -> the Linux names profiles use.
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}

# /proc/cpuinfo keys naming the CPU, best first (x86 "model name"; arm boards "Model"/"Hardware").
_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model", "Processor")


# -- pure functions over probe results ------------------------------------------------------------


def _ordered(names: set[str]) -> tuple[str, ...]:
    return tuple(n for n in ISA_NAMES if n in names)


def parse_isa_flags(cpuinfo_text: str) -> tuple[str, ...]:
    """edgellm ISA names from the first ``flags`` (x86) or ``Features`` (Arm) line of
    /proc/cpuinfo text, in :data:`ISA_NAMES` order; () when there is no such line."""
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return _ordered({CPUINFO_FLAGS[f] for f in value.split() if f in CPUINFO_FLAGS})
    return ()


def parse_sysctl_flags(sysctl_text: str) -> tuple[str, ...]:
    """edgellm ISA names from ``sysctl hw.optional`` output (``key: 1`` lines) on macOS."""
    found = set()
    for line in sysctl_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip() == "1" and key.strip() in SYSCTL_FLAGS:
            found.add(SYSCTL_FLAGS[key.strip()])
    return _ordered(found)


def parse_cpu_model(cpuinfo_text: str) -> str:
    """The CPU (or board) name from /proc/cpuinfo text, "" when none is given."""
    found: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            found.setdefault(key.strip(), value.strip())
    return next((found[k] for k in _MODEL_KEYS if k in found), "")


def _ov_device(name: str) -> tuple[str, str | None] | None:
    return OV_DEVICES.get(name.split(".")[0].upper())


def host_backends(ov_devices: Sequence[str] | None, ort_providers: Sequence[str] | None,
                  llama_gpu: bool | None) -> tuple[tuple[str, str], ...]:
    """(backend, device) pairs this host can run, best first: GPUs, then NPUs, then CPUs,
    and within a device in backend-table order. ``None`` means that runtime is not installed."""
    offered: dict[str, set[str]] = {"llamacpp": set(), "openvino": set(), "onnxruntime": set()}
    if llama_gpu is not None:
        offered["llamacpp"] |= {"cpu", "gpu"} if llama_gpu else {"cpu"}
    for name in ov_devices or ():
        if (found := _ov_device(name)) is not None:
            offered["openvino"].add(found[0])
    for provider in ort_providers or ():
        if provider in ORT_PROVIDERS:
            offered["onnxruntime"].add(ORT_PROVIDERS[provider][0])
    return tuple((backend, device) for device in ("gpu", "npu", "cpu")
                 for backend, devices in offered.items() if device in devices)


#: Backends whose devices the probes above find; every other registered one is a plugin.
BUILTIN_BACKENDS = frozenset({"llamacpp", "openvino", "onnxruntime", "fake"})


def plugin_backends(formats: Collection[str] | None = None) -> tuple[tuple[str, str], ...]:
    """(backend, device) pairs of the plugin backends (entry points) that can run here, GPUs first.

    They come after the built-in pairs, so a plan prefers a built-in backend unless only the
    plugin fits; ``formats`` keeps the plugins that read one of them.
    """
    from edgellm.runtimes.base import backend_names, get_backend

    pairs: list[tuple[str, str]] = []
    for name in backend_names():
        spec = get_backend(name)
        if name in BUILTIN_BACKENDS or (formats is not None and not set(spec.formats) & set(formats)):
            continue
        found = spec.host_devices()
        pairs += [(name, d) for d in ("gpu", "npu", "cpu") if d in found]
    return tuple(pairs)


def _kinds(device: str, ov_devices: Sequence[str] | None, ort_providers: Sequence[str] | None
           ) -> list[str]:
    """Hardware kinds of ``device`` that OpenVINO or ONNX Runtime report, in that order."""
    kinds = [found[1] for name in ov_devices or () if (found := _ov_device(name)) and found[0] == device]
    kinds += [ORT_PROVIDERS[p][1] for p in ort_providers or ()
              if p in ORT_PROVIDERS and ORT_PROVIDERS[p][0] == device]
    return [k for k in kinds if k is not None]


def host_gpu(ov_devices: Sequence[str] | None, ort_providers: Sequence[str] | None,
             llama_gpu: bool | None, system: str = "") -> GpuSpec | None:
    """The GPU some installed runtime reports, else None. Its memory is not probed (None).

    llama.cpp says only that it can offload; on macOS that is Metal, elsewhere the kind
    comes from OpenVINO / ONNX Runtime or stays "unknown".
    """
    kinds = _kinds("gpu", ov_devices, ort_providers)
    if llama_gpu:
        kinds.append("apple-metal" if system == "Darwin" else "unknown")
    if not kinds:
        return None
    known = [k for k in kinds if k != "unknown"]
    kind = known[0] if known else "unknown"
    reported = ", ".join(sorted(set(kinds)))
    return GpuSpec(kind=kind, memory_bytes=None, shared_with_host=None, notes=f"reported as: {reported}")


def host_npu(ov_devices: Sequence[str] | None, ort_providers: Sequence[str] | None) -> NpuSpec | None:
    """The NPU OpenVINO or ONNX Runtime reports, else None, with its kind's known constraints."""
    kinds = _kinds("npu", ov_devices, ort_providers)
    if not kinds:
        return None
    static_shapes, symmetric_int4 = _NPU_CONSTRAINTS.get(kinds[0], (True, False))
    return NpuSpec(kind=kinds[0], tops=None, static_shapes=static_shapes, symmetric_int4=symmetric_int4)


def host_budget(total_bytes: int, available_bytes: int) -> int:
    """Bytes a model may use here: available memory minus max(512 MiB, 10% of total), >= 0."""
    margin = max(_MARGIN_MIN_BYTES, int(total_bytes * _MARGIN_FRACTION))
    return max(0, available_bytes - margin)


# -- probes: each returns None when its runtime is not installed -----------------------------------


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def probe_openvino() -> list[str] | None:
    """``openvino.Core().available_devices``, or None when OpenVINO is not installed or fails."""
    if not _installed("openvino"):
        return None
    try:
        import openvino

        return [str(d) for d in openvino.Core().available_devices]
    except Exception as exc:  # a broken driver must not break detection
        logger.warning("OpenVINO is installed but could not list devices: %s", exc)
        return None


def probe_onnxruntime() -> list[str] | None:
    """``onnxruntime.get_available_providers()``, or None when ONNX Runtime is not installed."""
    if not _installed("onnxruntime"):
        return None
    try:
        import onnxruntime

        return [str(p) for p in onnxruntime.get_available_providers()]
    except Exception as exc:
        logger.warning("ONNX Runtime is installed but could not list providers: %s", exc)
        return None


def probe_llama_gpu() -> bool | None:
    """``llama_cpp.llama_supports_gpu_offload()``, or None when llama-cpp-python is not installed."""
    if not _installed("llama_cpp"):
        return None
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:
        logger.warning("llama-cpp-python is installed but could not be queried: %s", exc)
        return None


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _sysctl_text() -> str:
    try:
        done = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def host_cpu() -> CpuSpec:
    """Architecture, physical cores, threads, ISA features and model of this host's CPU."""
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    threads = max(psutil.cpu_count() or cores, cores)
    cpuinfo = _cpuinfo_text()
    if sys.platform == "darwin":
        isa, model = parse_sysctl_flags(_sysctl_text()), platform.processor()
    else:
        isa, model = parse_isa_flags(cpuinfo), parse_cpu_model(cpuinfo)
    arch = _ARCH_ALIASES.get(platform.machine().lower(), platform.machine())
    return CpuSpec(arch=arch, cores=cores, threads=threads, isa=isa, model=model)


def detect() -> DeviceProfile:
    """Describe this machine as a profile named "this-host" (see the module docstring)."""
    ov, ort, llama_gpu = probe_openvino(), probe_onnxruntime(), probe_llama_gpu()
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    return DeviceProfile(
        name=HOST_NAME,
        description=f"this machine, as detected: {platform.platform()}",
        total_memory_bytes=total,
        budget_bytes=host_budget(total, available),
        cpu=host_cpu(),
        backends=host_backends(ov, ort, llama_gpu) + plugin_backends(),
        gpu=host_gpu(ov, ort, llama_gpu, platform.system()),
        npu=host_npu(ov, ort),
        available_memory_bytes=available,
    )
