"""The source of a traced export (OpenVINO, ONNX): a Hugging Face folder or a GGUF file.

Exporters that trace PyTorch need a Hugging Face checkpoint. :func:`open_source` checks the
source before any long step (folder with a valid checkpoint, or a GGUF whose header reads),
and :meth:`Source.hf_dir` gives the checkpoint folder: the source itself, or a
dequantized copy of the GGUF written inside the converter's staging folder (so it goes
away with it, whatever happens; no torch is needed for it). A converter that streams tensors
(the ONNX graph builder) asks for the folder without weights and reads them through
:meth:`Source.tensors`, from the GGUF itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.converters import ProgressFn
from edgellm.converters.provenance import source_fingerprint
from edgellm.errors import InvalidModelError, ModelNotFoundError
from edgellm.spec import ModelSpec

__all__ = ["RUNTIME_FILES", "Source", "copy_runtime_files", "open_source"]

_DEQUANTIZED = ".source-hf"
#: Files the OpenVINO and ONNX runtimes read beside the model (tokenizer.json is required).
RUNTIME_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


def copy_runtime_files(hf_dir: Path, dest: Path, runtime: str) -> list[str]:
    """Copy :data:`RUNTIME_FILES` that ``hf_dir`` has into ``dest``; return their names.

    The runtimes read config.json and tokenizer.json (with the ``tokenizers`` library, no
    transformers): a checkpoint without them is refused, naming the fix.
    """
    missing = [n for n in ("config.json", "tokenizer.json") if not (hf_dir / n).is_file()]
    if missing:
        raise InvalidModelError(
            f"{hf_dir}: no {' or '.join(missing)}; the {runtime} runtime reads them beside the model "
            "— save the config and a fast tokenizer into the checkpoint folder"
        )
    copied = [n for n in RUNTIME_FILES if (hf_dir / n).is_file()]
    for name in copied:
        shutil.copy2(hf_dir / name, dest / name)
    return copied


@dataclass
class Source:
    """A validated export source."""

    path: Path
    kind: str  # "hf" or "gguf"
    spec: ModelSpec
    dequantized: dict[str, Any] | None = field(default=None)
    _hf: Path | None = field(default=None, repr=False)

    def hf_dir(self, workdir: Path, progress: ProgressFn | None = None, weights: bool = True) -> Path:
        """The Hugging Face checkpoint folder (a GGUF is dequantized into ``workdir`` once).

        ``weights=False``: a GGUF source gets its config and tokenizer files only, for a
        converter that reads the tensors through :meth:`tensors`; asking again with weights
        writes them then.
        """
        if self.kind == "hf":
            return self.path
        from edgellm.converters.from_gguf import dequantize_gguf, write_gguf_weights

        if self._hf is None:
            if progress:
                progress(0, 1, "dequantize GGUF")
            self._hf = workdir / _DEQUANTIZED
            self.dequantized = dequantize_gguf(self.path, self._hf, weights=weights)
            self.spec = ModelSpec.from_hf_dir(self._hf)
            if progress:
                progress(1, 1, "dequantize GGUF")
        elif weights and not (self._hf / "model.safetensors").is_file():
            assert self.dequantized is not None
            self.dequantized.pop("weights", None)
            self.dequantized.update(write_gguf_weights(self.path, self._hf))
        return self._hf

    def tensors(self) -> Any:
        """The weights by Hugging Face name, read one tensor at a time: the checkpoint's
        safetensors, or the GGUF file itself (dequantized on read, nothing written)."""
        if self.kind == "gguf":
            from edgellm.converters.gguf_tensors import GGUFTensors

            return GGUFTensors(self.path)
        from edgellm.converters.safetensors import open_checkpoint

        return open_checkpoint(self.path)

    def cleanup(self) -> None:
        """Remove the dequantized copy (before the staging folder is measured and renamed)."""
        if self._hf is not None:
            shutil.rmtree(self._hf, ignore_errors=True)
            self._hf = None

    def parity(self, model_file: Path, reference: Path | None, quant: str, prompts: list[str] | None,
               verify: bool, fmt: str) -> dict[str, Any]:
        """Parity of the fresh artifact against ``reference`` or the source (gated for floats).

        A GGUF source is compared through its dequantized checkpoint run by transformers where
        transformers is installed (the weights are written for it if the converter read the GGUF
        directly), else against the GGUF itself run by llama.cpp; the manifest says which.
        """
        from edgellm.converters.verify import check_after_convert, transformers_available

        if not verify:
            return {"status": "skipped", "reason": "conversion run with verify off"}
        if reference is not None or self.kind == "hf":
            return check_after_convert(model_file, reference or self.path, quant.upper(), prompts, fmt=fmt)
        if not transformers_available():
            parity = check_after_convert(model_file, self.path, quant.upper(), prompts, fmt=fmt)
            if parity["status"] == "skipped":
                parity["reason"] = ("no reference could run: transformers is not installed (pip install "
                                    "'edgellm[convert]') and llama.cpp could not run the GGUF "
                                    f"({parity['reason']})")
            return parity
        assert self._hf is not None, "hf_dir() runs before parity"
        checkpoint = self.hf_dir(self._hf.parent, weights=True)
        parity = check_after_convert(model_file, checkpoint, quant.upper(), prompts, fmt=fmt)
        if self.dequantized is not None and "reference" in parity:
            parity["reference"] = f"{self.path} dequantized by {self.dequantized['by']}"
        return parity

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records about the source."""
        entry: dict[str, Any] = {**source_fingerprint(self.path), "source_kind": self.kind}
        if self.dequantized is not None:
            entry["dequantized"] = self.dequantized
        return entry

    def manifest_common(self) -> dict[str, Any]:
        """The manifest keys every traced export shares: architecture, spec and source."""
        return {"architecture": self.spec.architecture, "spec": self.spec.to_dict(),
                "source": self.manifest_entry()}


def open_source(src: Path, allow_pickle: bool = False) -> Source:
    """Validate ``src`` (HF checkpoint folder or ``.gguf`` file) before a long export."""
    from edgellm.converters.safetensors import open_checkpoint
    from edgellm.gguf_meta import read_gguf_spec

    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise InvalidModelError(
                f"{src}: not a model folder or .gguf file; pass a Hugging Face checkpoint "
                "folder or a GGUF file"
            )
        spec, _ = read_gguf_spec(src)  # validates magic, header and truncation
        return Source(src, "gguf", spec)
    if not src.is_dir():
        raise ModelNotFoundError(
            f"source {str(src)!r} does not exist; pass a Hugging Face checkpoint folder or a .gguf file"
        )
    spec = ModelSpec.from_hf_dir(src)
    open_checkpoint(src, allow_pickle=allow_pickle).close()
    return Source(src, "hf", spec)
