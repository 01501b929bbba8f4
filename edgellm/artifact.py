"""The manifest written beside every converted model, and artifact discovery.

A converted model is a folder::

    out/
      model-Q8_0.gguf     (or model.xml/.bin, model.onnx, ...)
      edgellm.json        the manifest: format, quantization, spec, source, parity

A bare ``.gguf`` file is an artifact too (its metadata stands in for the manifest), so
models from elsewhere load without converting them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from edgellm._jsonfile import read_json_object
from edgellm.errors import InvalidModelError, ModelNotFoundError, UnsupportedFormatError

__all__ = ["MANIFEST_NAME", "Format", "Artifact", "find_artifact", "write_manifest", "read_manifest"]

MANIFEST_NAME = "edgellm.json"
MANIFEST_SCHEMA = 1


class Format(str, Enum):
    """Artifact formats edgellm reads or writes."""

    GGUF = "gguf"
    OPENVINO = "openvino"
    ONNX = "onnx"
    HF = "hf"  # a Hugging Face safetensors checkpoint (a source, not a runnable artifact)
    FAKE = "fake"  # the in-process test double

    @classmethod
    def parse(cls, value: str) -> Format:
        """The format called ``value``; the error lists the valid ones."""
        try:
            return cls(value.lower())
        except ValueError:
            names = ", ".join(f.value for f in cls if f not in (cls.HF, cls.FAKE))
            raise UnsupportedFormatError(f"unknown format {value!r}; use one of: {names}") from None


@dataclass(frozen=True)
class Artifact:
    """A model on disk: where it is, its format, its main file and its manifest."""

    path: Path  # the folder (or the bare file)
    format: Format
    model_file: Path
    manifest: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: every file of an artifact folder, or the bare model file."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.model_file.stat().st_size

    @property
    def quantization(self) -> str | None:
        """The recorded quantization type, if any."""
        return self.manifest.get("quantization")


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load ``edgellm.json`` from ``folder``; a damaged manifest is an error that says so."""
    path = folder / MANIFEST_NAME
    data = read_json_object(path, "re-convert the model")
    if "format" not in data:
        raise InvalidModelError(f"{path}: not an edgellm manifest (no 'format'); re-convert the model")
    return data


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``edgellm.json`` atomically (temp file + rename): never a half-written manifest."""
    manifest = {"schema": MANIFEST_SCHEMA, **manifest}
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    fd, tmp = tempfile.mkstemp(prefix=".edgellm-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a manifest is as readable as the model
    target = folder / MANIFEST_NAME
    os.replace(tmp, target)
    return target


def _detect_folder_format(folder: Path) -> tuple[Format, Path]:
    """Guess the format of a folder without a manifest from the files it holds."""
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return Format.GGUF, ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise InvalidModelError(f"{folder}: several GGUF files ({names}); pass the one to use")
    if (folder / "config.json").is_file():
        return Format.HF, folder / "config.json"
    raise ModelNotFoundError(
        f"{folder}: no edgellm.json, .gguf file or config.json; not a model folder"
    )


def _check_ir(folder: Path, xml: Path) -> None:
    """An OpenVINO IR: XML text (OpenVINO offers anything else to every frontend, TensorFlow's
    included, which prints its parse errors) and its weights, a .bin beside it."""
    with xml.open("rb") as f:
        if not f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
            raise InvalidModelError(f"{xml}: not an OpenVINO IR (the .xml is not XML text); re-convert it")
    if not xml.with_suffix(".bin").is_file():
        raise InvalidModelError(
            f"{folder}: {xml.with_suffix('.bin').name}, the weights of {xml.name}, is missing; copy it "
            "beside the .xml or re-convert the model"
        )


#: Checks of a format's files beyond the model file existing, run before anything reads them.
_FILE_CHECKS: dict[Format, Callable[[Path, Path], None]] = {Format.OPENVINO: _check_ir}


def find_artifact(path: str | Path) -> Artifact:
    """Resolve a user path (folder with manifest, bare .gguf, HF checkpoint) to an Artifact."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return Artifact(p, Format.GGUF, p, {"format": "gguf"})
        if p.name == MANIFEST_NAME:
            return find_artifact(p.parent)
        raise UnsupportedFormatError(
            f"{p}: cannot tell the format from {p.suffix or 'no suffix'!r}; "
            "pass a .gguf file or a model folder"
        )
    if (p / MANIFEST_NAME).is_file():
        manifest = read_manifest(p)
        fmt = Format.parse(str(manifest["format"]))
        name = (manifest.get("files") or {}).get("model")
        if not isinstance(name, str) or not name:
            raise InvalidModelError(
                f"{p / MANIFEST_NAME}: no 'files.model' entry naming the model file; re-convert the model"
            )
        model_file = (p / name).resolve()
        if not model_file.is_relative_to(p.resolve()):
            raise InvalidModelError(
                f"{p / MANIFEST_NAME}: model file {name!r} lies outside the model folder; refused "
                "(a manifest may only name files inside its folder)"
            )
        if not model_file.is_file():
            raise InvalidModelError(
                f"{p / MANIFEST_NAME}: names model file {model_file.name!r}, which is missing; "
                "re-convert the model"
            )
        _FILE_CHECKS.get(fmt, lambda folder, file: None)(p, model_file)
        return Artifact(p, fmt, model_file, manifest)
    fmt, model_file = _detect_folder_format(p)
    return Artifact(p, fmt, model_file, {"format": fmt.value})
