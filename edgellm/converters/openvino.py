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

import contextlib
import logging
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgellm.artifact import Artifact, Format
from edgellm.converters import ProgressFn
from edgellm.converters.from_gguf import PROBE_TEXTS
from edgellm.converters.provenance import tool_versions
from edgellm.converters.source import copy_runtime_files
from edgellm.converters.staging import Staging
from edgellm.errors import (
    ConversionError,
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    UnknownQuantizationError,
)
from edgellm.spec import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["OV_QUANTS", "Calibration", "WeightRecipe", "choose_group_size", "convert_to_openvino",
           "read_calibration", "recipe_for"]

MODEL_XML = "openvino_model.xml"
#: quantization name -> (bits, default symmetric). fp32/fp16 keep float weights.
OV_QUANTS: dict[str, tuple[int | None, bool]] = {
    "fp32": (None, False), "fp16": (None, False), "int8": (8, False), "int4": (4, False),
}
GROUP_SIZES = (128, 64, 32)
#: Architectures whose optimum-intel export is known to differ from the source model:
#: warned about at conversion and recorded in the manifest (parity measures the effect).
EXPORT_CAVEATS = {
    "gemma2": "optimum-intel 1.27 traces SDPA attention, which drops Gemma 2's attention-logit "
              "soft-capping (also with attn_implementation='eager'); logits drift where "
              "attention scores approach the cap (measured 1.2e-2 on a tiny model)",
}
#: NNCF's own default number of calibration samples.
DEFAULT_CALIBRATION_SAMPLES = 128


@dataclass(frozen=True)
class WeightRecipe:
    """What NNCF is asked to do, recorded verbatim in the manifest."""

    quant: str
    bits: int | None
    sym: bool
    group_size: int | None  # -1: channel-wise
    ratio: float
    reason: str
    awq: bool = False
    scale_estimation: bool = False
    calibration: dict[str, Any] | None = None  # file, sha256 and number of samples

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Calibration:
    """A calibration text for data-aware int4 compression (AWQ, scale estimation)."""

    path: Path
    samples: tuple[str, ...]
    sha256: str

    def describe(self) -> dict[str, Any]:
        """What the manifest records about it."""
        return {"file": self.path.name, "sha256": self.sha256, "samples": len(self.samples)}


def read_calibration(path: Path, max_samples: int = DEFAULT_CALIBRATION_SAMPLES) -> Calibration:
    """Samples of a UTF-8 text file: blank-line separated paragraphs (or lines, if one block).

    Each sample is one calibration prompt for NNCF; at most ``max_samples`` are kept.
    """
    import hashlib

    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ModelNotFoundError(f"calibration file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"calibration file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"calibration file {path} cannot be read ({exc.strerror})") from None
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    if len(blocks) == 1:
        blocks = [ln.strip() for ln in blocks[0].splitlines() if ln.strip()]
    if not blocks:
        raise InvalidInputError(f"calibration file {path} is empty; give it some representative text")
    return Calibration(path, tuple(blocks[:max_samples]), hashlib.sha256(data).hexdigest()[:16])


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
               ratio: float | None = None, calibration: Calibration | None = None,
               awq: bool | None = None, scale_estimation: bool | None = None) -> WeightRecipe:
    """The NNCF weight-compression recipe for ``quant`` on ``spec`` (and NPU if asked).

    With a ``calibration`` text, int4 is data-aware: AWQ and scale estimation are on unless
    turned off, and a ``ratio`` below 1 picks the int8 layers by measured sensitivity. AWQ
    or scale estimation without a calibration text is refused (NNCF needs activations).
    """
    q = quant.lower()
    if q not in OV_QUANTS:
        raise UnknownQuantizationError(
            f"unknown OpenVINO quantization {quant!r}; use one of: {', '.join(OV_QUANTS)}"
        )
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise UnknownQuantizationError(f"--ratio must be in (0, 1], got {ratio}")
    bits, default_sym = OV_QUANTS[q]
    wants_data = bool(awq) or bool(scale_estimation)
    if wants_data and calibration is None:
        raise InvalidInputError("AWQ and scale estimation need activations: pass a calibration "
                                "text file (--calibration FILE)")
    if (wants_data or calibration is not None) and bits != 4:
        raise InvalidInputError(f"a calibration text only applies to int4 weight compression, "
                                f"not {q}; drop --calibration/--awq/--scale-estimation")
    if bits is None:
        return WeightRecipe(q, None, False, None, 1.0, "float weights")
    if bits == 8:
        return WeightRecipe(q, 8, bool(sym) if sym is not None else default_sym, -1, 1.0,
                            "int8 is per output channel")
    data = {} if calibration is None else {
        "awq": awq is not False, "scale_estimation": scale_estimation is not False,
        "calibration": calibration.describe(),
    }
    if npu:
        return WeightRecipe(q, 4, True, -1, 1.0, "NPU: symmetric int4, channel-wise, all layers",
                            **data)
    group, why = choose_group_size(spec)
    return WeightRecipe(q, 4, bool(sym) if sym is not None else default_sym, group,
                        1.0 if ratio is None else ratio, why, **data)


def _export(src: Path, dest: Path, recipe: WeightRecipe,
            calibration: Calibration | None = None) -> None:
    """optimum-intel's two steps, as its CLI runs them: float export, then NNCF compression."""
    try:
        from optimum.exporters.openvino.__main__ import _main_quantize, main_export
        from optimum.intel import OVConfig, OVWeightQuantizationConfig
    except ImportError:
        raise MissingDependencyError("optimum.intel", "convert-openvino", "OpenVINO conversion") from None
    dtype = "fp16" if recipe.quant == "fp16" else "fp32"
    task = "text-generation-with-past"
    # torch.jit's TracerWarnings and NNCF's tables would flood the terminal; the result is
    # checked by parity and its recipe recorded in the manifest.
    logging.getLogger("nncf").setLevel(logging.WARNING)
    logging.getLogger("optimum").setLevel(logging.ERROR)  # its probes log misleading "errors"
    import transformers

    transformers.logging.set_verbosity_error()  # deprecation chatter about optimum's own calls
    # NNCF draws progress bars on stdout: send them to stderr, so `--json` output stays JSON
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            main_export(str(src), dest, task=task, stateful=True, ov_config=OVConfig(dtype=dtype),
                        local_files_only=True, convert_tokenizer=False)
            if recipe.bits is not None:
                data: dict[str, Any] = {}
                if calibration is not None:
                    data = {"dataset": list(calibration.samples), "tokenizer": str(src),
                            "num_samples": len(calibration.samples), "awq": recipe.awq,
                            "scale_estimation": recipe.scale_estimation}
                qc = OVWeightQuantizationConfig(bits=recipe.bits, sym=recipe.sym,
                                                group_size=recipe.group_size, ratio=recipe.ratio, **data)
                _main_quantize(model_name_or_path=str(src), task=task, library_name="transformers",
                               quantization_config=qc, output=str(dest), cache_dir=str(dest / ".cache"))
        except Exception as exc:  # optimum/NNCF raise many types; the user gets one line
            detail = " ".join(str(exc).split())[:300]
            raise ConversionError(f"OpenVINO export of {src} ({recipe.quant}) failed: {detail}") from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    if not (dest / MODEL_XML).is_file():
        raise ConversionError(f"OpenVINO export of {src} wrote no {MODEL_XML}")


#: OpenVINO tokenizer models (for OpenVINO GenAI and other OpenVINO-only apps).
OV_TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin",
                      "openvino_detokenizer.xml", "openvino_detokenizer.bin")


def write_ov_tokenizers(src: Path, dest: Path) -> dict[str, Any]:
    """Write OpenVINO tokenizer/detokenizer models beside the IR, only when they are right.

    They are an extra: edgellm's runtime reads tokenizer.json. The models are converted by
    ``openvino_tokenizers`` and then checked on :data:`~edgellm.converters.from_gguf.
    PROBE_TEXTS` against the Hugging Face tokenizer (ids both ways); any failure or
    mismatch leaves them out and the manifest says why. It never fails the conversion.
    """
    try:
        import openvino as ov
        import openvino_tokenizers
        from transformers import AutoTokenizer
    except ImportError as exc:
        return {"status": "not written", "reason": f"{exc.name} is not installed"}
    written = [dest / name for name in OV_TOKENIZER_FILES]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoTokenizer.from_pretrained(src, local_files_only=True)
            tok_model, detok_model = openvino_tokenizers.convert_tokenizer(hf, with_detokenizer=True)
            ov.save_model(tok_model, dest / OV_TOKENIZER_FILES[0])
            ov.save_model(detok_model, dest / OV_TOKENIZER_FILES[2])
            mismatch = _check_ov_tokenizers(ov.Core(), dest, hf)
    except Exception as exc:  # openvino_tokenizers raises many types for unsupported pieces
        mismatch = " ".join(str(exc).split())[:200] or type(exc).__name__
    if mismatch:
        for path in written:
            path.unlink(missing_ok=True)
        logger.info("OpenVINO tokenizer models not written: %s", mismatch)
        return {"status": "not written", "reason": mismatch}
    return {"status": "written", "files": list(OV_TOKENIZER_FILES),
            "checked_strings": len(_probe_texts()),
            "openvino_tokenizers": openvino_tokenizers.__version__}


def _probe_texts() -> tuple[str, ...]:
    return tuple(t for t in PROBE_TEXTS if t)  # an empty string is not a tokenizer input here


def _check_ov_tokenizers(core: Any, dest: Path, hf: Any) -> str | None:
    """None when the OpenVINO models encode and decode like ``hf``; else what differs."""
    import numpy as np

    tok = core.compile_model(dest / OV_TOKENIZER_FILES[0], "CPU")
    detok = core.compile_model(dest / OV_TOKENIZER_FILES[2], "CPU")
    for text in _probe_texts():
        want = hf(text)["input_ids"]
        got = [int(i) for i in tok([text])["input_ids"][0]]
        if got != want:
            return f"tokenizer model splits {text!r} as {got[:10]}, the HF tokenizer as {want[:10]}"
        decoded = str(detok(np.asarray([want], dtype=np.int64))["string_output"][0])
        expected = hf.decode(want, skip_special_tokens=True)
        if decoded != expected:
            return f"detokenizer model gives {decoded[:40]!r} for {expected[:40]!r}"
    return None


def _npu_shapes(spec: ModelSpec, npu: bool, max_prompt_len: int | None,
                min_response_len: int | None) -> dict[str, int] | None:
    """The NPU's static shapes to record: given values or OpenVINO GenAI's defaults."""
    from edgellm.runtimes.openvino import NPU_DEFAULT_SHAPES

    given = {"max_prompt_len": max_prompt_len, "min_response_len": min_response_len}
    if not npu:
        if any(v is not None for v in given.values()):
            raise InvalidInputError("--max-prompt-len/--min-response-len only apply with --npu")
        return None
    for key, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InvalidInputError(f"{key} must be a positive integer, got {value!r}")
    # defaults shrink to fit a short-context model; values the user gave are kept as given
    response = given["min_response_len"] or min(NPU_DEFAULT_SHAPES["min_response_len"],
                                                spec.max_positions // 4)
    prompt = given["max_prompt_len"] or min(NPU_DEFAULT_SHAPES["max_prompt_len"],
                                            spec.max_positions - response)
    shapes = {"max_prompt_len": prompt, "min_response_len": response}
    total = shapes["max_prompt_len"] + shapes["min_response_len"]
    if total > spec.max_positions:
        raise InvalidInputError(
            f"max_prompt_len + min_response_len = {total} > the model's {spec.max_positions} "
            "positions; lower them"
        )
    return shapes


def convert_to_openvino(
    src: Path, output: Path, quant: str = "fp16", *, force: bool = False, allow_pickle: bool = False,
    verify: bool = True, reference: Path | None = None, prompts: list[str] | None = None,
    progress: ProgressFn | None = None, npu: bool = False, sym: bool | None = None,
    ratio: float | None = None, calibration: str | Path | None = None, awq: bool | None = None,
    scale_estimation: bool | None = None, max_prompt_len: int | None = None,
    min_response_len: int | None = None,
) -> Artifact:
    """Export a HF checkpoint folder or a GGUF file to a stateful OpenVINO IR folder ``output``.

    A GGUF source is dequantized first (:mod:`edgellm.converters.from_gguf`: gguf-py, no torch,
    the same weights the ONNX builder reads), but the export itself still traces a PyTorch model
    through optimum-intel, so this path needs torch; parity is then measured against that
    dequantized checkpoint unless ``reference`` names another one.
    ``npu`` targets an Intel NPU: symmetric channel-wise int4 and the static prompt/response
    lengths (``max_prompt_len``, ``min_response_len``) recorded for the runtime.
    ``calibration`` is a text file for data-aware int4 (AWQ, scale estimation).
    """
    from edgellm.converters.source import open_source

    source = open_source(src, allow_pickle=allow_pickle)  # validate before a long export
    calib = read_calibration(Path(calibration)) if calibration is not None else None
    recipe = recipe_for(source.spec, quant, npu=npu, sym=sym, ratio=ratio, calibration=calib,
                        awq=awq, scale_estimation=scale_estimation)
    npu_shapes = _npu_shapes(source.spec, npu, max_prompt_len, min_response_len)
    caveat = EXPORT_CAVEATS.get(source.spec.architecture)
    if caveat:
        logger.warning("%s: %s", src, caveat)
    started = time.perf_counter()
    with Staging(output, force=force) as stage:
        hf_dir = source.hf_dir(stage.path, progress)
        if progress:
            progress(0, 1, f"export {recipe.quant}")
        _export(hf_dir, stage.path, recipe, calib)
        tokenizer_files = copy_runtime_files(hf_dir, stage.path, "OpenVINO")
        ov_tokenizers = write_ov_tokenizers(hf_dir, stage.path)
        if progress:
            progress(1, 1, f"export {recipe.quant}")
        xml = stage.path / MODEL_XML
        parity = source.parity(xml, reference, recipe.quant, prompts, verify, fmt="openvino")
        source.cleanup()
        manifest: dict[str, Any] = {
            "format": Format.OPENVINO.value,
            "files": {"model": MODEL_XML, "weights": "openvino_model.bin", "tokenizer": tokenizer_files},
            "openvino_tokenizers": ov_tokenizers,
            "quantization": recipe.quant,
            "weight_compression": recipe.to_dict(),
            **({"npu": npu_shapes} if npu_shapes else {}),
            **source.manifest_common(),
            **({"caveats": [caveat]} if caveat else {}),
            "tool": tool_versions("openvino", "optimum-intel", "nncf", "transformers"),
            "parity": parity,
        }
        return stage.commit_artifact(manifest, started)
