"""Hugging Face safetensors (or GGUF) -> GGUF, streaming tensor by tensor.

F32, F16, BF16 and Q8_0 are written directly with gguf-py's ``GGUFWriter`` in its
multi-step mode (tensor infos first, then one tensor's data at a time), so the converter
holds one tensor in memory, not the model. Every other llama.cpp type goes through
llama.cpp's own quantizer (``llama_model_quantize``) from an F16 intermediate. A GGUF file
as source is re-quantized by llama.cpp directly.

Output is staged in a temporary folder, checked (loaded by llama.cpp and compared with
transformers when available), then renamed into place with its manifest.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.artifact import Artifact, Format
from edgellm.converters import ProgressFn
from edgellm.converters.gguf_arch import GGUF_RULES, ArchRules, add_common_hparams, permute_qk
from edgellm.converters.provenance import source_fingerprint, tool_versions
from edgellm.converters.safetensors import Checkpoint, open_checkpoint
from edgellm.converters.staging import Staging
from edgellm.errors import (
    ConversionError,
    InvalidModelError,
    MissingDependencyError,
    ModelNotFoundError,
    UnknownQuantizationError,
)
from edgellm.gguf_meta import ggml_nbytes
from edgellm.spec import ModelSpec, read_hf_config

logger = logging.getLogger(__name__)

__all__ = ["DIRECT_TYPES", "LLAMA_QUANT_TYPES", "convert_to_gguf", "normalize_quant"]


#: Types written by edgellm itself: name -> (GGML tensor type name, llama file type id).
DIRECT_TYPES: dict[str, tuple[str, int]] = {
    "F32": ("F32", 0),
    "F16": ("F16", 1),
    "BF16": ("BF16", 32),
    "Q8_0": ("Q8_0", 7),
}
#: Types produced by llama.cpp's quantizer: name -> ``llama_cpp.LLAMA_FTYPE_*`` attribute.
#: (IQ1/IQ2 types are left out: llama.cpp refuses them without an importance matrix.)
LLAMA_QUANT_TYPES: dict[str, str] = {
    name: f"LLAMA_FTYPE_MOSTLY_{name}"
    for name in (
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L",
        "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ3_XXS", "IQ3_XS", "IQ3_S",
        "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
    )
}
_ALIASES = {"FP32": "F32", "FP16": "F16", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}


def normalize_quant(quant: str) -> str:
    """Canonical GGUF type name for ``quant`` (case-insensitive); the error lists them all."""
    name = quant.strip().upper()
    name = _ALIASES.get(name, name)
    if name in DIRECT_TYPES or name in LLAMA_QUANT_TYPES:
        return name
    known = ", ".join([*DIRECT_TYPES, *LLAMA_QUANT_TYPES])
    raise UnknownQuantizationError(f"unknown GGUF quantization {quant!r}; use one of: {known}")


# ---------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _TensorPlan:
    """One output tensor: its GGUF name, source name (or inline data) and output type."""

    gguf_name: str
    source: str | None
    data: np.ndarray | None
    shape: tuple[int, ...]  # numpy (row-major) shape of the output
    qtype: str


def _output_type(shape: tuple[int, ...], target: str, gguf_name: str) -> str:
    if len(shape) < 2 or gguf_name.startswith("rope_"):
        return "F32"  # norms, biases and RoPE factors stay F32, as in llama.cpp
    if target == "Q8_0" and shape[-1] % 32:
        return "F16"  # Q8_0 blocks are 32 wide; llama.cpp falls back the same way
    return target


def _plan_tensors(ckpt: Checkpoint, cfg: dict[str, Any], spec: ModelSpec, rules: ArchRules,
                  target: str) -> list[_TensorPlan]:
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == rules.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch_enum, spec.n_layers)
    plans: list[_TensorPlan] = []
    for name, info in ckpt.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and (spec.tied_embeddings or rules.drop_lm_head):
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(
                f"{info.file}: tensor {name!r} has no GGUF name for a {spec.architecture} model; "
                "the checkpoint does not match its config.json architecture"
            )
        plans.append(_TensorPlan(gguf_name, name, None, info.shape,
                                 _output_type(info.shape, target, gguf_name)))
    for gguf_name, data in rules.extra_tensors(cfg, spec):
        plans.append(_TensorPlan(gguf_name, None, data, data.shape, "F32"))
    return plans


def _transform(plan: _TensorPlan, arr: np.ndarray, spec: ModelSpec, rules: ArchRules) -> np.ndarray:
    source = plan.source or ""
    if rules.permute_qk and source.endswith("q_proj.weight"):
        arr = permute_qk(arr, spec.n_heads)
    elif rules.permute_qk and source.endswith("k_proj.weight"):
        arr = permute_qk(arr, spec.n_kv_heads)
    if rules.norm_shift and source.endswith("norm.weight"):
        arr = arr + np.float32(rules.norm_shift)
    return arr


def _model_name(src: Path) -> str:
    """general.name for the file. llama.cpp special-cases names containing "phi3"/"phi-3" and
    then requires SentencePiece tokens such as "</s>" (llama-vocab.cpp); a byte-level
    vocabulary without them would crash the loader, so such names are spelled "phi 3"."""
    name = src.name
    if (src / "tokenizer.model").is_file():
        return name
    return re.sub(r"(?i)phi-?3", "phi 3", name)


def _encode(arr: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == "F32":
        return arr
    if qtype == "F16":
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType[qtype])


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    import gguf

    return ggml_nbytes(gguf.GGMLQuantizationType[qtype], shape)


# ----------------------------------------------------------------------------- writing
def _write_gguf(src: Path, dest: Path, ckpt: Checkpoint, cfg: dict[str, Any], spec: ModelSpec,
                target: str, progress: ProgressFn | None) -> dict[str, Any]:
    import gguf

    from edgellm.converters.gguf_vocab import add_vocab

    rules = GGUF_RULES[spec.architecture]
    plans = _plan_tensors(ckpt, cfg, spec, rules, target)
    writer = gguf.GGUFWriter(dest, rules.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(src))
    add_common_hparams(writer, cfg, spec)
    rules.hparams(writer, cfg, spec)
    writer.add_file_type(DIRECT_TYPES[target][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    space_prefix = False if spec.architecture.startswith("gemma") else None
    vocab = add_vocab(writer, src, spec.vocab_size, add_space_prefix=space_prefix)
    for plan in plans:
        raw_dtype = gguf.GGMLQuantizationType[plan.qtype]
        np_dtype = {"F32": np.float32, "F16": np.float16}.get(plan.qtype, np.uint8)
        shape = (plan.shape if np_dtype is not np.uint8
                 else gguf.quant_shape_to_byte_shape(plan.shape, raw_dtype))
        writer.add_tensor_info(plan.gguf_name, shape, np.dtype(np_dtype), _nbytes(plan.shape, plan.qtype),
                               raw_dtype=None if np_dtype is not np.uint8 else raw_dtype)
    writer.write_header_to_file(dest)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(_nbytes(p.shape, p.qtype) for p in plans)
    done = 0
    for plan in plans:
        arr = plan.data if plan.data is not None else ckpt.read(plan.source or "")
        out = _encode(_transform(plan, arr, spec, rules), plan.qtype)
        writer.write_tensor_data(out)
        done += out.nbytes
        if progress:
            progress(done, total, plan.gguf_name)
        del arr, out
    writer.close()
    types = sorted({p.qtype for p in plans})
    return {"tokenizer": vocab, "tensor_types": types, "n_tensors": len(plans)}


@contextmanager
def _native_stderr_to(path: Path) -> Iterator[None]:
    """Send the C library's stderr (llama.cpp's log) to a file for the duration."""
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _estimated_bytes(src: Path, quant: str) -> int:
    """Rough output size for the progress bar: parameters x bits of the type's main block."""
    import gguf

    from edgellm.gguf_meta import gguf_summary

    base = re.sub(r"_(XXS|XS|S|M|L|NL)$", "", quant) if quant.endswith(("_S", "_M", "_L")) else quant
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[base]]
    except KeyError:
        block, size = 32, 18  # 4.5 bits per weight
    return int(gguf_summary(src)["n_params"] * size / block)


def llama_quantize(src: Path, dest: Path, quant: str, threads: int | None = None,
                   progress: ProgressFn | None = None) -> None:
    """Run llama.cpp's quantizer; its log is kept only to explain a failure.

    The native call runs in a thread (ctypes releases the GIL) while this one reports the
    output's growth against an estimate, so a long quantization is not silent.
    """
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("llama_cpp", "llama", f"GGUF quantization to {quant}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANT_TYPES.get(quant, ""), None) or DIRECT_TYPES[quant][1]
    params.nthread = threads or (os.cpu_count() or 1)
    params.allow_requantize = True
    log = dest.with_suffix(".quantize.log")
    result: list[int] = []
    expected = _estimated_bytes(src, quant) if progress else 0
    with _native_stderr_to(log):
        worker = threading.Thread(target=lambda: result.append(
            llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)))
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if progress and dest.exists():
                progress(min(dest.stat().st_size, int(expected * 0.99)), expected, f"quantize {quant}")
    if not result or result[0] != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else "no message"
        raise ConversionError(f"llama.cpp could not quantize {src.name} to {quant}: {last}")
    log.unlink(missing_ok=True)
    if progress:
        size = dest.stat().st_size
        progress(size, size, f"quantize {quant}")


# ------------------------------------------------------------------------ entry point
def _from_hf(src: Path, staging: Path, quant: str, allow_pickle: bool,
             progress: ProgressFn | None) -> tuple[Path, ModelSpec, dict[str, Any]]:
    cfg = read_hf_config(src)  # read once: the spec and the per-architecture rules share it
    spec = ModelSpec.from_hf_config(cfg, source=str(src / "config.json"))
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    final = staging / f"{src.name}-{quant}.gguf"
    direct = quant if quant in DIRECT_TYPES else "F16"
    first = final if quant in DIRECT_TYPES else staging / f".{src.name}-F16.intermediate.gguf"
    try:
        details = _write_gguf(src, first, ckpt, cfg, spec, direct, progress)
    finally:
        ckpt.close()
    if first != final:
        llama_quantize(first, final, quant, progress=progress)
        first.unlink()
    return final, spec, {"source_kind": "hf", **details}


def _from_gguf(src: Path, staging: Path, quant: str,
               progress: ProgressFn | None) -> tuple[Path, ModelSpec, dict[str, Any]]:
    from edgellm.gguf_meta import read_gguf_spec

    spec, meta = read_gguf_spec(src)
    stem = src.stem.rsplit(".", 1)[0] if "." in src.stem else src.stem
    final = staging / f"{stem}-{quant}.gguf"
    llama_quantize(src, final, quant, progress=progress)
    return final, spec, {"source_kind": "gguf", "source_file_type": meta.get("general.file_type")}


def convert_to_gguf(
    src: Path, output: Path, quant: str = "F16", *, force: bool = False,
    allow_pickle: bool = False, verify: bool = True, reference: Path | None = None,
    prompts: list[str] | None = None, progress: ProgressFn | None = None,
) -> Artifact:
    """Convert a HF checkpoint folder or a GGUF file into a GGUF artifact folder ``output``."""
    from edgellm.converters.verify import check_after_convert

    quant = normalize_quant(quant)
    if not src.exists():
        raise ModelNotFoundError(f"source {str(src)!r} does not exist")
    if src.is_file() and src.suffix.lower() != ".gguf":
        raise InvalidModelError(f"{src}: not a model folder or .gguf file; pass a checkpoint folder")
    started = time.perf_counter()
    with Staging(output, force=force) as stage:
        if src.is_dir():
            model_file, spec, details = _from_hf(src, stage.path, quant, allow_pickle, progress)
        else:
            model_file, spec, details = _from_gguf(src, stage.path, quant, progress)
        manifest: dict[str, Any] = {
            "format": Format.GGUF.value,
            "files": {"model": model_file.name},
            "quantization": quant,
            "architecture": spec.architecture,
            "spec": spec.to_dict(),
            "source": {**source_fingerprint(src), **details},
            "tool": tool_versions("gguf", "llama-cpp-python"),
            "size_bytes": model_file.stat().st_size,
        }
        ref = reference or (src if src.is_dir() else None)
        manifest["parity"] = (check_after_convert(model_file, ref, quant, prompts) if verify
                              else {"status": "skipped", "reason": "conversion run with verify off"})
        return stage.commit_artifact(manifest, started)
