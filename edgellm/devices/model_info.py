"""What the planner sizes: a source spec, or an artifact on disk read from its headers and file sizes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.artifact import Artifact, Format, find_artifact
from edgellm.devices.memory import Quant, find_quant
from edgellm.errors import InvalidInputError, ModelNotFoundError, UnsupportedFormatError
from edgellm.spec import ModelSpec

__all__ = ["ModelInfo", "describe_model"]

# -- the model: a source spec or an artifact on disk -------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the planner knows of a model without loading it."""

    spec: ModelSpec
    path: str | None = None
    format: str | None = None  # None: a source (HF checkpoint or spec), any format
    quantization: str | None = None
    file_bytes: int | None = None  # exact weight bytes of an artifact
    npu_ready: str | None = None  # None when fine for an NPU, else why not
    npu_shapes: tuple[int | None, int | None] | None = None  # (max_prompt_len, min_response_len)
    exporter: str | None = None  # ONNX: which exporter wrote the artifact

    @property
    def is_artifact(self) -> bool:
        return self.format is not None

    def quant(self) -> Quant | None:
        return find_quant(self.format or "", self.quantization, self.exporter)

    def to_dict(self) -> dict[str, Any]:
        """The model as the plan's JSON shows it."""
        s = self.spec
        return {"path": self.path, "kind": "artifact" if self.is_artifact else "source",
                "format": self.format, "quantization": self.quantization, "n_params": s.n_params(),
                "weight_file_bytes": self.file_bytes,
                "spec": {k: v for k, v in s.to_dict().items() if k in _SPEC_KEYS}}


_SPEC_KEYS = ("architecture", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim",
              "intermediate_size", "vocab_size", "max_positions", "tied_embeddings", "sliding_window")
_NOT_A_MODEL = ("expected a Hugging Face checkpoint folder (config.json), a .gguf file, a converted "
                "model folder (edgellm.json) or a ModelSpec .json file")


def _read_gguf(art: Artifact) -> ModelInfo:
    from edgellm.gguf_meta import read_gguf_header

    header = read_gguf_header(art.model_file)
    tied = not any(t.name == "output.weight" for t in header.tensors)
    spec = ModelSpec.from_gguf_metadata(header.metadata, source=str(art.model_file), tied_embeddings=tied)
    return ModelInfo(spec, str(art.path), "gguf", art.quantization or _gguf_type(header.metadata),
                     sum(t.nbytes for t in header.tensors))


def _gguf_type(metadata: Mapping[str, Any]) -> str | None:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(metadata["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError, TypeError):
        return None


def _folder_spec(art: Artifact) -> ModelSpec:
    data = art.manifest.get("spec")
    return ModelSpec.from_dict(data) if isinstance(data, dict) else ModelSpec.from_hf_dir(art.path)


def _read_openvino(art: Artifact) -> ModelInfo:
    recipe = art.manifest.get("weight_compression") or {}
    bits, sym = recipe.get("bits"), recipe.get("sym")
    ready = None if bits == 4 and sym else (
        f"needs symmetric int4 weights, this IR is {art.quantization or 'of unknown precision'}"
        f"{' asymmetric' if bits and not sym else ''}: re-convert it with --npu")
    shapes = art.manifest.get("npu") or {}
    npu = (shapes.get("max_prompt_len"), shapes.get("min_response_len")) if shapes else None
    return ModelInfo(_folder_spec(art), str(art.path), "openvino", art.quantization,
                     art.model_file.with_suffix(".bin").stat().st_size, ready, npu)


def _read_onnx(art: Artifact) -> ModelInfo:
    listed = (art.manifest.get("files") or {}).get("weights") or []
    names = {art.model_file.name, *(n for n in listed if isinstance(n, str))}
    names |= {p.name for p in art.model_file.parent.glob(art.model_file.name + "*")}
    size = sum((art.model_file.parent / n).stat().st_size for n in names
               if (art.model_file.parent / n).is_file())
    graph = art.manifest.get("graph") or {}
    shared = bool((graph.get("kv") or {}).get("past_present_share_buffer"))
    exporter = art.manifest.get("exporter") or ("builder" if shared else "optimum")
    return ModelInfo(_folder_spec(art), str(art.path), "onnx", art.quantization, size, exporter=exporter)


def _read_hf(art: Artifact) -> ModelInfo:
    return ModelInfo(ModelSpec.from_hf_dir(art.path), str(art.path))


_READERS: dict[Format, Callable[[Artifact], ModelInfo]] = {
    Format.GGUF: _read_gguf, Format.OPENVINO: _read_openvino, Format.ONNX: _read_onnx, Format.HF: _read_hf,
}


def _read_spec_file(path: Path) -> ModelInfo:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "model_type" in data:
            return ModelInfo(ModelSpec.from_hf_config(data, source=str(path)), str(path))
        return ModelInfo(ModelSpec.from_dict(data), str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{path}: not a ModelSpec or config.json ({exc}); {_NOT_A_MODEL}") from None


def describe_model(model: str | os.PathLike[str] | ModelSpec) -> ModelInfo:
    """What the planner needs of ``model`` (a path or a ModelSpec), read without loading it."""
    if isinstance(model, ModelSpec):
        return ModelInfo(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".json" and path.name != "edgellm.json":
        return _read_spec_file(path)
    try:
        art = find_artifact(path)
    except (ModelNotFoundError, UnsupportedFormatError) as exc:
        if not path.exists():
            raise
        detail = str(exc).removeprefix(f"{path}: ")
        raise InvalidInputError(f"{path}: not a model ({detail}); {_NOT_A_MODEL}") from None
    reader = _READERS.get(art.format)
    if reader is None:
        raise InvalidInputError(f"{path}: the planner cannot size a {art.format.value} model; {_NOT_A_MODEL}")
    return reader(art)
