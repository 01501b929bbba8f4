"""Hugging Face checkpoint -> stateful OpenVINO IR, through optimum-intel and NNCF.

edgellm does not re-derive graph tracing: optimum-intel's ``main_export`` writes the
stateful IR (KV cache held in the model's variables) and NNCF compresses the weights.
edgellm's part is the choices users get wrong:

* int4 group size: the largest of 128/64/32 that divides the input channels of every
  compressed layer, else channel-wise. NNCF's default of 128 fails on SmolLM2 (hidden
  576 = 4.5 x 128); the choice is recorded in the manifest.
* NPU targets: symmetric int4, channel-wise (what Intel NPUs execute), all layers.
* fp16 / int8 for CPU and GPU.

Tokenizer files are copied beside the IR for the ``tokenizers`` library; the runtime never
needs optimum, transformers or torch.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgellm.artifact import Artifact, Format, find_artifact, write_manifest
from edgellm.converters import ProgressFn
from edgellm.converters.provenance import source_fingerprint, tool_versions
from edgellm.converters.staging import Staging
from edgellm.errors import (
    ConversionError,
    InvalidModelError,
    MissingDependencyError,
    ModelNotFoundError,
    UnknownQuantizationError,
)
from edgellm.spec import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["OV_QUANTS", "WeightRecipe", "choose_group_size", "recipe_for", "convert_to_openvino"]

MODEL_XML = "openvino_model.xml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tokenizer.model")
#: quantization name -> (bits, default symmetric). fp32/fp16 keep float weights.
OV_QUANTS: dict[str, tuple[int | None, bool]] = {
    "fp32": (None, False), "fp16": (None, False), "int8": (8, False), "int4": (4, False),
}
GROUP_SIZES = (128, 64, 32)


@dataclass(frozen=True)
class WeightRecipe:
    """What NNCF is asked to do, recorded verbatim in the manifest."""

    quant: str
    bits: int | None
    sym: bool
    group_size: int | None  # -1: channel-wise
    ratio: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _input_channels(spec: ModelSpec) -> dict[str, int]:
    """Input channels of each compressed matmul kind (rows of the weight's last axis)."""
    return {
        "q/k/v, gate/up": spec.hidden_size,
        "o_proj": spec.n_heads * spec.head_dim,
        "down_proj": spec.intermediate_size,
    }


def choose_group_size(spec: ModelSpec) -> tuple[int, str]:
    """Largest of 128/64/32 dividing every layer's input channels; -1 (channel-wise) if none."""
    channels = _input_channels(spec)
    for group in GROUP_SIZES:
        if all(c % group == 0 for c in channels.values()):
            return group, f"{group} divides every input channel count ({sorted(set(channels.values()))})"
    return -1, f"none of {GROUP_SIZES} divides {sorted(set(channels.values()))}: channel-wise"


def recipe_for(spec: ModelSpec, quant: str, *, npu: bool = False, sym: bool | None = None,
               ratio: float | None = None) -> WeightRecipe:
    """The NNCF weight-compression recipe for ``quant`` on ``spec`` (and NPU if asked)."""
    q = quant.lower()
    if q not in OV_QUANTS:
        raise UnknownQuantizationError(
            f"unknown OpenVINO quantization {quant!r}; use one of: {', '.join(OV_QUANTS)}"
        )
    bits, default_sym = OV_QUANTS[q]
    if bits is None:
        return WeightRecipe(q, None, False, None, 1.0, "float weights")
    if npu and bits == 4:
        return WeightRecipe(q, 4, True, -1, 1.0, "NPU: symmetric int4, channel-wise, all layers")
    if bits == 8:
        return WeightRecipe(q, 8, bool(sym) if sym is not None else default_sym, -1, 1.0,
                            "int8 is per output channel")
    group, why = choose_group_size(spec)
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise UnknownQuantizationError(f"--ratio must be in (0, 1], got {ratio}")
    return WeightRecipe(q, 4, bool(sym) if sym is not None else default_sym, group,
                        1.0 if ratio is None else ratio, why)


def _export(src: Path, dest: Path, recipe: WeightRecipe) -> None:
    """optimum-intel's two steps, as its CLI runs them: float export, then NNCF compression."""
    try:
        from optimum.exporters.openvino.__main__ import _main_quantize, main_export
        from optimum.intel import OVConfig, OVWeightQuantizationConfig
    except ImportError:
        raise MissingDependencyError("optimum.intel", "convert-openvino", "OpenVINO conversion") from None
    dtype = "fp16" if recipe.quant == "fp16" else "fp32"
    task = "text-generation-with-past"
    try:
        main_export(str(src), dest, task=task, stateful=True, ov_config=OVConfig(dtype=dtype),
                    local_files_only=True, convert_tokenizer=False)
        if recipe.bits is not None:
            qc = OVWeightQuantizationConfig(bits=recipe.bits, sym=recipe.sym, group_size=recipe.group_size,
                                            ratio=recipe.ratio)
            _main_quantize(model_name_or_path=str(src), task=task, library_name="transformers",
                           quantization_config=qc, output=dest, cache_dir=str(dest / ".cache"))
    except Exception as exc:  # optimum/NNCF raise many types; the user gets one line
        detail = " ".join(str(exc).split())[:300]
        raise ConversionError(f"OpenVINO export of {src} ({recipe.quant}) failed: {detail}") from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    if not (dest / MODEL_XML).is_file():
        raise ConversionError(f"OpenVINO export of {src} wrote no {MODEL_XML}")


def _copy_tokenizer(src: Path, dest: Path) -> list[str]:
    if not (src / "tokenizer.json").is_file():
        raise InvalidModelError(
            f"{src}: no tokenizer.json; the OpenVINO runtime reads tokenizer.json with the "
            "tokenizers library — save a fast tokenizer into the checkpoint folder"
        )
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
            copied.append(name)
    return copied


def convert_to_openvino(
    src: Path, output: Path, quant: str = "fp16", *, force: bool = False, allow_pickle: bool = False,
    verify: bool = True, reference: Path | None = None, prompts: list[str] | None = None,
    progress: ProgressFn | None = None, npu: bool = False, sym: bool | None = None,
    ratio: float | None = None,
) -> Artifact:
    """Export a HF checkpoint folder to a stateful OpenVINO IR artifact folder ``output``."""
    from edgellm.converters.safetensors import open_checkpoint
    from edgellm.converters.verify import check_after_convert

    if not src.is_dir():
        raise ModelNotFoundError(f"source {str(src)!r} is not a Hugging Face checkpoint folder")
    spec = ModelSpec.from_hf_dir(src)
    open_checkpoint(src, allow_pickle=allow_pickle).close()  # validate before a long export
    recipe = recipe_for(spec, quant, npu=npu, sym=sym, ratio=ratio)
    started = time.perf_counter()
    with Staging(output, force=force) as stage:
        if progress:
            progress(0, 1, f"export {recipe.quant}")
        _export(src, stage.path, recipe)
        tokenizer_files = _copy_tokenizer(src, stage.path)
        if progress:
            progress(1, 1, f"export {recipe.quant}")
        xml = stage.path / MODEL_XML
        manifest: dict[str, Any] = {
            "format": Format.OPENVINO.value,
            "files": {"model": MODEL_XML, "weights": "openvino_model.bin", "tokenizer": tokenizer_files},
            "quantization": recipe.quant,
            "weight_compression": recipe.to_dict(),
            "architecture": spec.architecture,
            "spec": spec.to_dict(),
            "source": {**source_fingerprint(src), "source_kind": "hf"},
            "tool": tool_versions("openvino", "optimum-intel", "nncf"),
            "size_bytes": sum(p.stat().st_size for p in stage.path.iterdir() if p.is_file()),
        }
        manifest["parity"] = (
            check_after_convert(xml, reference or src, recipe.quant.upper(), prompts, fmt="openvino")
            if verify else {"status": "skipped", "reason": "conversion run with verify off"}
        )
        manifest["convert_seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(stage.path, manifest)
        final = stage.commit()
    return find_artifact(final)
