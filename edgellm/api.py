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
from edgellm.runtimes.base import RuntimeOptions, open_runtime

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
    device: str = "cpu",
    n_ctx: int | None = None,
    threads: int | None = None,
    seed: int | None = None,
    **backend_options: Any,
) -> Model:
    """Load a converted model (folder with ``edgellm.json``, or a bare ``.gguf`` file).

    ``backend`` names a registered backend ("llamacpp", ...); by default the first
    installed backend that reads the artifact's format is used. ``n_ctx`` defaults to the
    model's trained context capped at 4096 tokens; ``threads`` to the physical cores;
    ``seed`` makes the session's sampling reproducible (None: a random seed).
    """
    from edgellm.model import Model

    _check_positive("n_ctx", n_ctx)
    _check_positive("threads", threads)
    artifact = find_artifact(path)
    if artifact.format is Format.HF:
        raise UnsupportedFormatError(
            f"{artifact.path} is a Hugging Face checkpoint, not a runnable artifact; "
            f"convert it first: edgellm convert {artifact.path} --format gguf -o OUT"
        )
    options = RuntimeOptions(n_ctx=n_ctx, threads=threads, device=device, seed=seed or 0,
                             extra=dict(backend_options))
    runtime = open_runtime(artifact.model_file, artifact.format.value, options, backend)
    try:
        return Model(runtime, manifest=artifact.manifest, seed=seed)
    except BaseException:
        runtime.close()
        raise


def convert(
    src: str | os.PathLike[str],
    output: str | os.PathLike[str],
    format: str = "gguf",
    quant: str | None = None,
    *,
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
    ``verify=False`` skips that (the manifest says so). ``quant`` defaults to the format's
    lossless-enough type (GGUF F16, OpenVINO fp16). Format-specific ``options`` go to the
    converter (OpenVINO: ``npu``, ``sym``, ``ratio``).
    """
    from edgellm.converters import get_converter

    fmt = Format.parse(format)
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
    """Compare an artifact's logits with transformers on ``reference`` (a HF checkpoint).

    Reports top-1 agreement, max absolute logit difference and mean KL divergence, and
    (with ``record``) stores them in the artifact's manifest.
    """
    from edgellm.converters.verify import verify_artifact

    return verify_artifact(Path(artifact), Path(reference), prompts=prompts, record=record)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a model without loading it: format, architecture, quantization, size, parity."""
    from edgellm.converters.inspect import describe

    return describe(find_artifact(path))
