"""Thin orchestration behind the public face: find the artifact, pick a backend, run.

Heavy modules (converters, transformers, native runtimes) are imported inside the
functions that need them, never at import time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.artifact import Format, find_artifact
from edgellm.converters import ProgressFn
from edgellm.errors import InvalidInputError, UnsupportedFormatError
from edgellm.runtimes.base import RuntimeOptions, open_engine
from edgellm.runtimes.threads import parse_threads

if TYPE_CHECKING:
    from edgellm.artifact import Artifact
    from edgellm.converters.verify import ParityReport
    from edgellm.model import Model

logger = logging.getLogger(__name__)

__all__ = ["load", "convert", "verify", "inspect"]



def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def load(
    path: str | os.PathLike[str],
    backend: str | None = None,
    device: str = "auto",
    n_ctx: int | None = None,
    threads: int | str | None = "auto",
    seed: int | None = None,
    *,
    kv_budget: int | str | None = None,
    kv_precision: str | None = None,
    kv_overflow: str = "error",
    kv_sinks: int = 4,
    isolate: bool = False,
    **backend_options: Any,
) -> Model:
    """Load a converted model (folder with ``edgellm.json``, or a bare ``.gguf`` file).

    ``device="auto"`` (the default) plans the model against this host
    (:func:`edgellm.devices.plan` on :func:`~edgellm.devices.planner.host_profile`, which asks
    only the runtimes that read this format): the backend and device the plan chooses are
    opened, with the plan's context when neither ``n_ctx`` nor ``kv_budget`` is given and its
    KV precision when ``kv_precision`` is not given. When nothing fits the host's memory,
    :class:`~edgellm.errors.NoCompatibleRuntimeError` carries every reason; there is no
    silent fallback. An explicit device ("cpu", "gpu", "npu") is opened as asked, unplanned.

    The KV cache: ``n_ctx`` is a session's size in tokens; ``kv_budget`` (bytes, or
    ``"96MiB"``, ``"1.5GB"``) caps the KV bytes of every session of the model together (a
    session gets the whole budget when ``n_ctx`` is not given); ``kv_precision`` is one of
    the backend's (llama.cpp f16/q8_0/q4_0/f32, OpenVINO f16/u8/f32, ONNX Runtime the graph's
    f32 or f16); ``kv_overflow`` is "error", "sliding" (keep ``kv_sinks`` first tokens and the
    newest) or "truncate" (drop the oldest chat turns). ``backend_options`` are the backend's
    own (see ``edgellm.runtimes.base``); an unknown one is refused with the valid names.

    ``backend`` names a registered backend ("llamacpp", ...); by default the plan's (or, with
    an explicit device, the first installed backend that reads the artifact's format).
    ``threads="auto"`` (the default) takes the physical cores that are idle at load, so a
    model embedded beside other busy work does not collapse (``$EDGELLM_THREADS`` overrides
    it; see :mod:`edgellm.runtimes.threads`); ``threads=N`` is exact and may not exceed the
    logical cores. ``seed`` (None, or an int >= 0) makes sampling reproducible. ``n_ctx`` may not
    exceed the model's trained positions, nor a session's KV cache the memory available here,
    on every device.

    ``isolate=True`` is for untrusted files: the model is first opened once in a child process
    (:func:`edgellm.isolate.check_model`, also ``edgellm check``); a native crash or hang there
    is an InvalidModelError naming the file and the signal, and the file is not loaded here.
    Bytes that passed are recorded, so the next isolated load of the same file skips the child.
    """
    from edgellm.kvcache import OverflowPolicy, parse_bytes
    from edgellm.model import Model
    from edgellm.runtimes.sampling import check_seed

    _check_positive("n_ctx", n_ctx)
    threads = parse_threads(threads)
    check_seed(seed)
    budget = None if kv_budget is None else parse_bytes(kv_budget)
    OverflowPolicy.parse(kv_overflow, kv_sinks)  # checked before anything is loaded
    artifact = find_artifact(path)
    if isolate and artifact.format is not Format.FAKE:
        from edgellm.isolate import check_model

        check_model(artifact.path, backend=backend, device=device)
    if artifact.format is Format.HF:
        raise UnsupportedFormatError(
            f"{artifact.path} is a Hugging Face checkpoint, not a runnable artifact; "
            f"convert it first: edgellm convert {artifact.path} --format gguf -o OUT"
        )
    extra = dict(backend_options)
    if device == "auto":
        backend, device, n_ctx, kv_precision = _plan_here(artifact, backend, n_ctx, budget, kv_precision)
    options = RuntimeOptions(n_ctx=n_ctx, threads=threads, device=device, seed=seed or 0,
                             kv_precision=kv_precision, kv_budget_bytes=budget, extra=extra)
    engine = open_engine(artifact.model_file, artifact.format.value, options, backend)
    try:
        return Model(engine, manifest=artifact.manifest, seed=seed, n_ctx=n_ctx, kv_budget=budget,
                     kv_overflow=kv_overflow, kv_sinks=kv_sinks)
    except BaseException:
        engine.close()
        raise


def _plan_here(artifact: Artifact, backend: str | None, n_ctx: int | None, budget: int | None,
               kv_precision: str | None) -> tuple[str | None, str, int | None, str | None]:
    """``device="auto"``: the plan's backend, device, context and KV precision on this host."""
    from edgellm.devices.planner import PLANNED_FORMATS, host_profile, plan
    from edgellm.runtimes.base import get_backend

    fmt = artifact.format.value
    if fmt not in PLANNED_FORMATS or (backend is not None and not get_backend(backend).installed()):
        return backend, "auto", n_ctx, kv_precision  # the test double, or a missing extra named as before
    chosen = plan(artifact.path, host_profile([fmt]), n_ctx, backends=None if backend is None else [backend],
                  kv_budget=budget, kv_precision=kv_precision).choice
    assert chosen is not None  # plan() raises when nothing fits
    context = n_ctx if n_ctx is not None or budget is not None else chosen.context
    return chosen.backend, chosen.device, context, kv_precision or chosen.kv_precision


def _plan_conversion(src: str | os.PathLike[str], device: str, format: str | None, quant: str | None,
                     options: dict[str, Any]) -> tuple[str | None, str | None, dict[str, Any]]:
    """The plan's format, quantization and recipe options for what the caller left out."""
    from edgellm.devices.planner import QUANTS, describe_model, plan

    if format is not None and quant is not None:
        return format, quant, options
    if format is not None:
        formats: list[str] | None = [Format.parse(format).value]
    else:  # a quantization narrows the plan to the formats that have it (an unknown one: any format)
        formats = sorted({q.format for q in QUANTS if quant and q.name.lower() == quant.lower()}) or None
    chosen = plan(describe_model(src).spec, device, formats=formats).choice
    assert chosen is not None  # plan() raises when nothing fits
    logger.info("converting %s for %s: %s", src, device, chosen.label)
    return format or chosen.format, quant or chosen.quantization, {**chosen.convert_options, **options}


def convert(
    src: str | os.PathLike[str],
    output: str | os.PathLike[str],
    format: str | None = None,
    quant: str | None = None,
    *,
    device: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    verify: bool = True,
    verify_with: str | os.PathLike[str] | None = None,
    prompts: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> Artifact:
    """Convert ``src`` (HF checkpoint folder or GGUF file) into a ``format`` artifact at ``output``.

    The result is written to a temporary folder beside ``output``, verified, and renamed
    into place only when complete. Parity against the HF source (or ``verify_with``, a HF
    checkpoint) is measured and recorded in the manifest when transformers is installed;
    ``verify=False`` skips that (the manifest says so). ``format`` defaults to gguf, ``quant``
    to the format's lossless-enough type (GGUF F16, OpenVINO fp16). Format-specific
    ``options`` go to the converter (OpenVINO: ``npu``, ``sym``, ``ratio``).

    ``device`` names a device profile (a built-in or user profile name, a .toml file, or
    "this-host"): the source is planned for it (:func:`edgellm.devices.plan`, nothing loaded)
    and the plan's choice fills in what the caller left out: the format and quantization
    (only the quantization when ``format`` is given; only the format when ``quant`` is), and
    for an NPU choice the NPU recipe (``npu=True``, the profile's ``max_prompt_len``). Both
    given: used as given. When nothing fits the device, NoCompatibleRuntimeError says what is
    missing and which quantization would fit; nothing is converted.
    """
    from edgellm.converters import get_converter

    if device is not None:
        format, quant, options = _plan_conversion(src, device, format, quant, options)
    fmt = Format.parse(format or "gguf")
    converter = get_converter(fmt)
    if quant is not None:
        options["quant"] = quant
    return converter(
        Path(src), Path(output),
        force=force, allow_pickle=allow_pickle, verify=verify,
        reference=Path(verify_with) if verify_with else None,
        prompts=list(prompts) if prompts else None, progress=progress, **options,
    )


def verify(
    artifact: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    prompts: Sequence[str] | None = None,
    record: bool = True,
) -> ParityReport:
    """Compare an artifact's logits with transformers on ``reference`` (a HF checkpoint), or
    with llama.cpp when ``reference`` is a ``.gguf`` file (``reference_by`` says which).

    Reports top-1 agreement, max absolute logit difference and mean KL divergence, and
    (with ``record``) stores them in the artifact's manifest.
    """
    from edgellm.converters.verify import verify_artifact

    return verify_artifact(Path(artifact), Path(reference), prompts=prompts, record=record)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a model without loading it: format, architecture, quantization, size, parity."""
    from edgellm.converters.inspect import describe

    return describe(find_artifact(path))
