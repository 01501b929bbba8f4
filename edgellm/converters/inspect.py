"""Describe a model on disk without loading it into a runtime."""

from __future__ import annotations

from typing import Any

from edgellm.artifact import Artifact, Format
from edgellm.gguf_meta import gguf_summary, read_gguf_metadata
from edgellm.spec import ModelSpec

__all__ = ["describe"]

# llama.cpp ``llama_ftype`` ids -> names (gguf-py LlamaFileType), for files from elsewhere.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
               16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 30: "IQ4_XS", 32: "BF16"}


def _folder_bytes(artifact: Artifact) -> int:
    if artifact.path.is_file():
        return artifact.path.stat().st_size
    return sum(p.stat().st_size for p in artifact.path.rglob("*") if p.is_file())


def _describe_gguf(artifact: Artifact) -> dict[str, Any]:
    meta = read_gguf_metadata(artifact.model_file, full_lists=False)
    spec = ModelSpec.from_gguf_metadata(meta, source=str(artifact.model_file))
    ftype = meta.get("general.file_type")
    return {
        "quantization": artifact.quantization or _FILE_TYPES.get(ftype, str(ftype)),
        "spec": spec.to_dict(),
        "context_length": spec.max_positions,
        "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                      "chat_template": "tokenizer.chat_template" in meta},
        **gguf_summary(artifact.model_file),
    }


def _describe_hf(artifact: Artifact) -> dict[str, Any]:
    spec = ModelSpec.from_hf_dir(artifact.path)
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
