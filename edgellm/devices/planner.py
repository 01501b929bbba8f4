"""The memory planner: will a model fit a device, with how much context, on which backend — and why not.

``plan(model, profile, context=None)`` reads only configs, headers and file sizes (nothing is
loaded) and walks the profile's ``(backend, device)`` pairs in preference order. For each it
tries the quantizations of that backend's format from the most precise down (a source
model), or the one the artifact has, and the KV precisions from f16 down; the first option
whose predicted peak resident memory at the requested context fits the budget is chosen.
Every other option is listed with its reason. When nothing fits,
:class:`~edgellm.errors.NoCompatibleRuntimeError` says how much is missing and which
quantization would fit.

The memory each option needs is predicted by :mod:`edgellm.devices.memory`; what a model
is (a source spec or an artifact on disk) is read by :mod:`edgellm.devices.model_info`.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import psutil

from edgellm.devices.detect import (
    HOST_NAME,
    detect,
    host_backends,
    host_budget,
    host_cpu,
    host_gpu,
    host_npu,
    plugin_backends,
    probe_llama_gpu,
    probe_onnxruntime,
    probe_openvino,
)
from edgellm.devices.memory import (
    BACKEND_MODELS,
    KV_BYTES,
    NPU_ALIGN,
    NPU_MAX_PROMPT_LEN,
    NPU_MIN_RESPONSE_LEN,
    PLANNED_FORMATS,
    PROCESS_BYTES,
    QUANTS,
    BackendModel,
    GiB,
    MiB,
    Quant,
    find_quant,
    kv_bytes_per_token,
    memory_model,
    onnx_kv_precision,
    weight_bytes,
)
from edgellm.devices.model_info import ModelInfo, describe_model
from edgellm.devices.profile import DeviceProfile
from edgellm.errors import (
    InvalidInputError,
    NoCompatibleRuntimeError,
)
from edgellm.runtimes.base import DEFAULT_MAX_CTX, get_backend
from edgellm.spec import ModelSpec

logger = logging.getLogger(__name__)

# The memory model and the model readers are re-exported: callers import them from here.
__all__ = ["BACKEND_MODELS", "KV_BYTES", "QUANTS", "Candidate", "ModelInfo", "Plan", "describe_model",
           "find_quant", "host_profile", "kv_bytes_per_token", "plan", "weight_bytes"]

def _npu_shape(prompt: int | None, response: int | None) -> tuple[int, int]:
    """The NPU's static (prompt, response) lengths, each rounded up to 64 as the plugin does."""
    def up(n: int) -> int:
        return -(-n // NPU_ALIGN) * NPU_ALIGN
    return up(prompt or NPU_MAX_PROMPT_LEN), up(response or NPU_MIN_RESPONSE_LEN)


# -- candidates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: format, quantization, backend, device, KV precision — and the verdict.

    Byte figures are None for a candidate refused before sizing (wrong format, no NPU support).
    ``predicted_peak_bytes`` is the predicted peak RSS at ``context``, split in ``breakdown``
    (its "weights" include the runtime's working copies); ``required_bytes`` is the part that
    counts against ``budget_bytes`` (all of it, except host RAM on a discrete GPU).
    """

    backend: str
    device: str
    format: str
    quantization: str | None
    kv_precision: str | None
    status: str  # "chosen", "fits" (a later preference) or "rejected"
    reason: str
    weight_bytes: int | None = None  # the weight files (exact) or their estimate
    weights_exact: bool = False
    kv_bytes_per_token: int | None = None  # every copy the backend keeps
    budget_bytes: int | None = None
    context: int | None = None
    max_context: int | None = None
    context_cap: int | None = None
    predicted_peak_bytes: int | None = None
    required_bytes: int | None = None
    breakdown: Mapping[str, int] = field(default_factory=dict)
    convert_options: Mapping[str, Any] = field(default_factory=dict)
    runtime_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``gguf Q8_0 on llamacpp:cpu, KV f16``."""
        kv = f", KV {self.kv_precision}" if self.kv_precision else ""
        return f"{self.format} {self.quantization or '(any)'} on {self.backend}:{self.device}{kv}"

    @property
    def fits(self) -> bool:
        """True when the prediction at ``context`` is within the budget."""
        return self.status in ("chosen", "fits")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data.update(label=self.label, breakdown=dict(self.breakdown),
                    convert_options=dict(self.convert_options), runtime_options=dict(self.runtime_options))
        return data


@dataclass(frozen=True)
class _Option:
    """A sizable option before its verdict."""

    backend: BackendModel
    device: str
    format: str
    quant: Quant | None
    quant_name: str | None
    kv: str
    file_bytes: int
    exact: bool
    budget: int
    counts_host: bool  # False on a discrete GPU: host RAM is not the budget
    cap: int
    cap_why: str
    convert_options: tuple[tuple[str, Any], ...] = ()
    kv_budget: int | None = None  # KV bytes every session together may hold

    @property
    def kv_copies(self) -> int:
        """KV copies a session keeps: one on a builder graph (past and present share a buffer)."""
        return 1 if self.quant is not None and self.quant.exporter == "builder" else self.backend.kv_copies

    def kv_per_token(self, spec: ModelSpec) -> int:
        return self.kv_copies * kv_bytes_per_token(spec, self.kv)

    def kv_cost(self, spec: ModelSpec, n_ctx: int) -> int:
        """A session of ``n_ctx``; with a budget, the whole budget (sessions may fill it together)."""
        one = self.kv_per_token(spec) * n_ctx
        return one if self.kv_budget is None else max(one, self.kv_budget)

    def costs(self, spec: ModelSpec, n_ctx: int) -> dict[str, int]:
        b = self.backend
        parts = {"weights": b.weights(spec, self.quant, self.file_bytes),
                 "kv": self.kv_cost(spec, n_ctx),
                 "compute": b.compute(spec, n_ctx, self.quant),
                 "runtime": PROCESS_BYTES + b.import_bytes + b.fixed_bytes,
                 "tokenizer": b.tokenizer_bytes_per_entry * spec.vocab_size}
        return {k: int(v) for k, v in parts.items()}

    def required(self, spec: ModelSpec, n_ctx: int) -> int:
        host = () if self.counts_host else ("runtime", "tokenizer")
        return sum(v for k, v in self.costs(spec, n_ctx).items() if k not in host)

    def max_context(self, spec: ModelSpec) -> int:
        """Largest context up to the cap (and the KV budget) whose prediction fits the budget (0: none)."""
        low, high = 0, self.cap
        if self.kv_budget is not None:
            high = min(high, self.kv_budget // max(1, self.kv_per_token(spec)))
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.required(spec, mid) <= self.budget else (low, mid - 1)
        return low


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def _verdict(opt: _Option, spec: ModelSpec, context: int, best: int) -> tuple[bool, str]:
    """(fits, reason) of ``opt`` at ``context``, knowing its largest fitting context ``best``."""
    budget = _gib(opt.budget)
    if context > opt.cap:
        return False, f"device {opt.device} needs static shapes: context {context} > {opt.cap_why}"
    one = opt.kv_per_token(spec) * context
    if opt.kv_budget is not None and one > opt.kv_budget:
        return False, (f"a session of {context} tokens needs {_gib(one)} of KV {opt.kv} > kv_budget "
                       f"{_gib(opt.kv_budget)}")
    if best == 0 and opt.file_bytes > opt.budget:
        return False, f"weights {_gib(opt.file_bytes)} > budget {budget}"
    if best == 0:
        rest = opt.required(spec, 1) - opt.file_bytes
        return False, f"weights {_gib(opt.file_bytes)} + runtime {_gib(rest)} > budget {budget}"
    need = _gib(opt.required(spec, context))
    if best < context:
        return False, f"needs {need} at {context} tokens > budget {budget}; fits up to {best} tokens"
    return True, f"fits: {need} of {budget} at {context} tokens (up to {best})"


def _sized(opt: _Option, spec: ModelSpec, context: int) -> Candidate:
    best = opt.max_context(spec)
    ok, reason = _verdict(opt, spec, context, best)
    parts = opt.costs(spec, context)
    return Candidate(
        backend=opt.backend.name, device=opt.device, format=opt.format, quantization=opt.quant_name,
        kv_precision=opt.kv, status="fits" if ok else "rejected", reason=reason,
        weight_bytes=opt.file_bytes, weights_exact=opt.exact,
        kv_bytes_per_token=opt.kv_per_token(spec),
        budget_bytes=opt.budget, context=context, max_context=best, context_cap=opt.cap,
        predicted_peak_bytes=sum(parts.values()), required_bytes=opt.required(spec, context),
        breakdown=parts, convert_options=dict(opt.convert_options),
        runtime_options={"kv_precision": opt.kv},
    )


def _budget(profile: DeviceProfile, device: str) -> tuple[int, bool]:
    """(bytes the model may use on ``device``, whether host RAM counts against it)."""
    gpu = profile.gpu
    if device != "gpu" or gpu is None:
        return profile.budget_bytes, True
    limit = min(profile.budget_bytes, gpu.memory_bytes or profile.budget_bytes)
    return limit, gpu.shared_with_host is not False


def _static_npu(profile: DeviceProfile, device: str) -> bool:
    return device == "npu" and profile.npu is not None and profile.npu.static_shapes


def _cap(model: ModelInfo, profile: DeviceProfile, device: str) -> tuple[int, str]:
    """The largest context the device can hold at all, and what sets it."""
    positions = (model.spec.max_positions, f"the model's {model.spec.max_positions} positions")
    if not _static_npu(profile, device) or profile.npu is None:
        return positions
    prompt, response = _npu_shape(*(model.npu_shapes or (profile.npu.max_prompt_len, None)))
    size = prompt + response
    return min(positions, (size, f"max_prompt_len {prompt} + min_response_len {response} = {size}"))


def _refusal(backend: str, device: str, model: ModelInfo, profile: DeviceProfile) -> str | None:
    """Why ``backend`` on ``device`` cannot run this model at all (before sizing), or None."""
    row = memory_model(backend)
    if row is None:
        return (f"the planner has no memory model for backend {backend!r} (a plugin gives one as "
                "BackendSpec.memory)")
    spec = get_backend(backend)
    if model.is_artifact and model.format not in spec.formats:
        return f"{backend} reads {', '.join(spec.formats)}, not this {model.format} model"
    if profile.name == HOST_NAME and not spec.installed():
        return f"backend {backend} not installed (pip install \"edgellm[{spec.extra}]\")"
    if _static_npu(profile, device) and profile.npu is not None:
        if not row.npu_static:
            return (f"device npu ({profile.npu.kind}) needs static shapes, which the {backend} backend "
                    "does not compile (only openvino does)")
        if model.is_artifact and model.npu_ready is not None:
            return f"device npu {model.npu_ready}"
    return None


def _npu_options(quant: Quant, profile: DeviceProfile) -> tuple[tuple[str, Any], ...]:
    prompt = profile.npu.max_prompt_len if profile.npu is not None else None
    return quant.convert_options + ((("max_prompt_len", prompt),) if quant.npu and prompt else ())


def _options(backend: str, device: str, fmt: str, model: ModelInfo, profile: DeviceProfile,
             quants: list[Quant] | None = None, kv_wanted: str | None = None) -> list[_Option]:
    """Every (quantization, KV precision) option of one pair, best first (only ``kv_wanted``'s if given)."""
    row = memory_model(backend)
    assert row is not None  # _refusal said why not before
    ladder = row.kv_ladder
    if kv_wanted is not None and ladder and kv_wanted in get_backend(backend).kv_precisions:
        ladder = (kv_wanted,)
    budget, counts_host = _budget(profile, device)
    cap, cap_why = _cap(model, profile, device)
    if model.is_artifact:
        sized = [(model.quant(), model.quantization, model.file_bytes or 0, True)]
    else:
        rows = quants if quants is not None else [q for q in QUANTS if q.format == fmt and q.auto]
        sized = [(q, q.name, weight_bytes(model.spec, q), False) for q in rows if q.npu == (device == "npu")]
    out = []
    for quant, name, size, exact in sized:
        extra = _npu_options(quant, profile) if quant is not None and not exact else ()
        out += [_Option(row, device, fmt, quant, name, kv, size, exact, budget, counts_host, cap, cap_why,
                        extra) for kv in ladder or (onnx_kv_precision(quant),)]
    return out


def _format_of(backend: str, model: ModelInfo) -> str:
    if model.format is not None:
        return model.format
    return next((f for f in get_backend(backend).formats if f in PLANNED_FORMATS), "?")


# -- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the model, the device, the choice and every alternative with its reason."""

    model: ModelInfo
    profile: str
    budget_bytes: int
    requested_context: int | None
    candidates: tuple[Candidate, ...]

    @property
    def choice(self) -> Candidate | None:
        """The chosen candidate (None only on the plan NoCompatibleRuntimeError carries)."""
        return next((c for c in self.candidates if c.status == "chosen"), None)

    @property
    def context(self) -> int | None:
        """The context the choice was sized for."""
        return self.choice.context if self.choice else None

    @property
    def rejected(self) -> list[Candidate]:
        """Every candidate not chosen, each with its reason."""
        return [c for c in self.candidates if c.status != "chosen"]

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data."""
        spec = self.model.spec
        return {
            "model": self.model.to_dict(),
            "device": {"profile": self.profile, "budget_bytes": self.budget_bytes},
            "requested_context": self.requested_context,
            "context": self.context,
            "kv_bytes_per_token": {k: kv_bytes_per_token(spec, k) for k in KV_BYTES},
            "sliding_window": ("not accounted: every layer's KV is sized for the full context "
                               "(an upper bound)" if spec.sliding_window else None),
            "choice": self.choice.to_dict() if self.choice else None,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _check_context(context: int | None, spec: ModelSpec) -> None:
    if context is None:
        return
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise InvalidInputError(f"context must be a positive integer, got {context!r}")
    if context > spec.max_positions:
        raise InvalidInputError(f"context {context} > the model's {spec.max_positions} positions; "
                                f"ask for at most {spec.max_positions}")


def _resolve_profile(profile: DeviceProfile | str) -> DeviceProfile:
    if isinstance(profile, DeviceProfile):
        return profile
    if profile == HOST_NAME:
        return host_profile()
    from edgellm.devices.profile import load_profile

    return load_profile(profile)


def _pairs(profile: DeviceProfile, backends: Collection[str] | None) -> list[tuple[str, str]]:
    for name in backends or ():
        get_backend(name)  # an unknown name is an error that lists the registered ones
    return [p for p in profile.backends if backends is None or p[0] in backends]


def plan(model: str | os.PathLike[str] | ModelSpec, profile: DeviceProfile | str,
         context: int | None = None, *, backends: Collection[str] | None = None,
         formats: Collection[str] | None = None, kv_budget: int | str | None = None,
         kv_precision: str | None = None) -> Plan:
    """Plan ``model`` (a path or a ModelSpec) on ``profile`` (a DeviceProfile or its name).

    ``context`` is the context of one session (default: what ``kv_budget`` holds at each
    option's KV precision, else min(4096, the model's positions, an NPU's static size)).
    ``kv_budget`` (bytes or "96MiB") is the KV bytes every session may hold together: the
    prediction counts all of it. ``kv_precision`` keeps only options with that KV precision;
    ``backends`` / ``formats`` narrow the candidates. Raises NoCompatibleRuntimeError, with
    ``reasons`` and the partial plan as ``.plan``, when nothing fits.
    """
    from edgellm.kvcache import normalize_precision, parse_bytes

    budget = None if kv_budget is None else parse_bytes(kv_budget)
    kv = None if kv_precision is None else normalize_precision(kv_precision, KV_BYTES, "the planner")
    info = describe_model(model)
    _check_context(context, info.spec)
    prof = _resolve_profile(profile)
    rows: list[Candidate] = []
    for backend, device in _pairs(prof, backends):
        fmt = _format_of(backend, info)
        if formats is None or fmt in formats:
            rows += _candidates(backend, device, fmt, info, prof, context, budget, kv)
    rows = _choose(rows)
    if prof.name == HOST_NAME:  # speeds measured here (bench --matrix) outrank profile order
        from edgellm.devices.measured import prefer_measured

        rows = prefer_measured(info, rows)
    result = Plan(info, prof.name, prof.budget_bytes, context, tuple(rows))
    if result.choice is None:
        raise _nothing_fits(result, prof, backends, formats)
    logger.info("plan for %s on %s: %s", info.path or info.spec.architecture, prof.name, result.choice.label)
    return result


def _candidates(backend: str, device: str, fmt: str, info: ModelInfo, prof: DeviceProfile,
                context: int | None, kv_budget: int | None = None, kv: str | None = None
                ) -> list[Candidate]:
    refusal = _refusal(backend, device, info, prof)
    if refusal is not None:
        reads = fmt in get_backend(backend).formats
        shown = fmt if reads else get_backend(backend).formats[0]
        quant = info.quantization if reads else None
        return [Candidate(backend, device, shown, quant, None, "rejected", refusal)]
    opts = [replace(o, kv_budget=kv_budget) for o in _options(backend, device, fmt, info, prof, kv_wanted=kv)
            if kv is None or o.kv == kv]
    return [_sized(o, info.spec, context or _default_context(o, info.spec)) for o in opts]


def _default_context(opt: _Option, spec: ModelSpec) -> int:
    """What the KV budget holds at this option's precision, else min(4096, the cap)."""
    if opt.kv_budget is None:
        return min(DEFAULT_MAX_CTX, opt.cap)
    return max(1, min(opt.cap, opt.kv_budget // opt.kv_per_token(spec)))


def _choose(rows: list[Candidate]) -> list[Candidate]:
    """The first fitting candidate (profile order, then precision) is chosen; later fits say why not."""
    chosen = next((c for c in rows if c.fits), None)
    out = []
    for c in rows:
        if c is chosen:
            c = replace(c, status="chosen")
        elif c.fits and chosen is not None:
            c = replace(c, reason=f"fits, but {chosen.label} comes first (profile order, then precision)")
        out.append(c)
    return out


# -- when nothing fits -------------------------------------------------------------------------


def _nothing_fits(result: Plan, prof: DeviceProfile, backends: Collection[str] | None,
                  formats: Collection[str] | None) -> NoCompatibleRuntimeError:
    reasons = {f"{c.backend}:{c.device} {c.format} {c.quantization or '-'} kv={c.kv_precision or '-'}":
               c.reason for c in result.candidates}
    sized = [c for c in result.candidates if c.required_bytes is not None]
    where = f"{prof.name} (budget {_gib(prof.budget_bytes)})"
    if not result.candidates:
        pairs = ", ".join(f"{b}:{d}" for b, d in prof.backends)
        wanted = ", ".join([*(backends or ()), *(formats or ())])
        message = f"{prof.name} runs none of the wanted backends/formats ({wanted}); it offers: {pairs}"
    elif not sized:
        detail = "; ".join(f"{c.backend}:{c.device}: {c.reason}" for c in result.candidates)
        message = f"nothing can run this model on {where}: {detail}"
    else:
        closest = min(sized, key=lambda c: (c.required_bytes or 0) - (c.budget_bytes or 0))
        hints = "; or ".join(_suggest(closest, result.model, prof))
        message = f"nothing fits {where}: {_shortfall(closest)}; {hints}"
    err = NoCompatibleRuntimeError(message, reasons)
    err.plan = result  # type: ignore[attr-defined]
    return err


def _shortfall(c: Candidate) -> str:
    budget, weights = c.budget_bytes or 0, c.weight_bytes or 0
    if weights > budget:
        return (f"{c.label}: weights need {_gib(weights)}, budget {_gib(budget)}: "
                f"{_gib(weights - budget)} missing")
    need = c.required_bytes or 0
    return (f"{c.label} needs {_gib(need)} at {c.context} tokens, budget {_gib(budget)}: "
            f"{_gib(need - budget)} missing")


def _suggest(c: Candidate, model: ModelInfo, prof: DeviceProfile) -> list[str]:
    """Ways out: a quantization of the same format that fits, or a shorter context."""
    source = replace(model, format=None, quantization=None, file_bytes=None)
    rows = [q for q in QUANTS if q.format == c.format and q.npu == (c.device == "npu")]
    options = _options(c.backend, c.device, c.format, source, prof, rows)
    fitting = [(o, o.max_context(model.spec)) for o in options]
    how = " (re-convert the source with --quant {})" if model.is_artifact else ""
    wanted = c.context or 1
    hints = [f"{o.quant_name} ({_gib(o.file_bytes)}, KV {o.kv}) would fit at {wanted} tokens"
             + how.format(o.quant_name) for o, best in fitting if best >= wanted][:1]
    if c.max_context:
        hints.append(f"{c.label} fits with --context {c.max_context}")
    partial = [(o, best) for o, best in fitting if best >= 1]
    if not hints and partial:  # the most precise quantization that fits at all, at its longest context
        o, best = max((p for p in partial if p[0].quant_name == partial[0][0].quant_name), key=lambda p: p[1])
        hints.append(f"{o.quant_name} ({_gib(o.file_bytes)}, KV {o.kv}) would fit with up to {best} tokens "
                     "of context" + how.format(o.quant_name))
    if not hints and fitting:
        low = fitting[-1][0]
        hints.append(f"even {low.quant_name} ({_gib(low.file_bytes)}) does not fit: use a device with more "
                     "memory or a smaller model")
    return hints or ["no quantization in the planner's table fits"]


# -- this host ------------------------------------------------------------------------------------

#: Backend -> the probe detect() runs for it; host_profile(formats) runs only the needed ones.
_PROBES: dict[str, Callable[[], Any]] = {"llamacpp": probe_llama_gpu, "openvino": probe_openvino,
                                         "onnxruntime": probe_onnxruntime}


def host_profile(formats: Collection[str] | None = None) -> DeviceProfile:
    """:func:`~edgellm.devices.detect`, asking only the runtimes that read ``formats`` (all when None).

    Loading a GGUF file then never imports OpenVINO or ONNX Runtime just to find out what they drive.
    """
    if formats is None:
        return detect()
    wanted = {name for name in _PROBES if set(get_backend(name).formats) & set(formats)}
    found = {name: probe() if name in wanted else None for name, probe in _PROBES.items()}
    ov, ort, llama_gpu = found["openvino"], found["onnxruntime"], found["llamacpp"]
    memory = psutil.virtual_memory()
    return DeviceProfile(
        name=HOST_NAME, description=f"this machine, as detected: {platform.platform()}",
        total_memory_bytes=int(memory.total),
        budget_bytes=host_budget(int(memory.total), int(memory.available)), cpu=host_cpu(),
        backends=host_backends(ov, ort, llama_gpu) + plugin_backends(formats),
        gpu=host_gpu(ov, ort, llama_gpu, platform.system()),
        npu=host_npu(ov, ort), available_memory_bytes=int(memory.available),
    )
