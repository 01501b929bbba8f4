"""Describe a model on disk without loading it into a runtime."""

from __future__ import annotations

from typing import Any

from edgellm.artifact import Artifact, Format
from edgellm.gguf_meta import gguf_summary, read_gguf_spec
from edgellm.spec import ModelSpec

__all__ = ["describe"]



def _file_type_name(ftype: object) -> str | None:
    """llama.cpp ``general.file_type`` id -> name (gguf-py ``LlamaFileType``), e.g. 15 -> Q4_K_M."""
    from gguf.constants import LlamaFileType

    try:
        name = LlamaFileType(int(ftype)).name  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None if ftype is None else str(ftype)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _folder_bytes(artifact: Artifact) -> int:
    if artifact.path.is_file():
        return artifact.path.stat().st_size
    return sum(p.stat().st_size for p in artifact.path.rglob("*") if p.is_file())


def _describe_gguf(artifact: Artifact) -> dict[str, Any]:
    spec, meta = read_gguf_spec(artifact.model_file)
    ftype = meta.get("general.file_type")
    return {
        "quantization": artifact.quantization or _file_type_name(ftype),
        "spec": spec.to_dict(),
        "context_length": spec.max_positions,
        "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                      "chat_template": "tokenizer.chat_template" in meta},
        **gguf_summary(artifact.model_file),
    }


def _describe_hf(artifact: Artifact) -> dict[str, Any]:
    from edgellm.converters.safetensors import open_checkpoint

    spec = ModelSpec.from_hf_dir(artifact.path)
    if any(artifact.path.glob("*.safetensors")):  # the header checks convert runs, nothing read
        open_checkpoint(artifact.path).close()
    return {"quantization": None, "spec": spec.to_dict(), "context_length": spec.max_positions,
            "n_params": spec.n_params()}


_DESCRIBERS = {Format.GGUF: _describe_gguf, Format.HF: _describe_hf}


def describe(artifact: Artifact) -> dict[str, Any]:
    """Format, architecture, quantization, size, context and recorded parity of a model."""
    details = _DESCRIBERS.get(artifact.format, lambda a: {})(artifact)
    spec = details.get("spec") or artifact.manifest.get("spec") or {}
    return {
        "path": str(artifact.path),
        "format": artifact.format.value,
        "model_file": str(artifact.model_file),
        "architecture": spec.get("architecture"),
        "size_bytes": _folder_bytes(artifact),
        "parity": artifact.manifest.get("parity"),
        "source": artifact.manifest.get("source"),
        **details,
    }
