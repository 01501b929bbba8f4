"""The memory planner: will a model fit a device, with how much context, on which backend — and why not.

``plan(model, profile, context=None)`` reads only configs, headers and file sizes (nothing is
loaded) and walks the profile's ``(backend, device)`` pairs in preference order. For each it
tries the quantizations of that backend's format from the most precise down (a source
model), or the one the artifact has, and the KV precisions from f16 down; the first option
whose predicted peak resident memory at the requested context fits the budget is chosen.
Every other option is listed with its reason. When nothing fits,
:class:`~edgellm.errors.NoCompatibleRuntimeError` says how much is missing and which
quantization would fit.

Predicted peak resident bytes = runtime + tokenizer + resident weights + KV + compute, where

- runtime: CPython with numpy and edgellm, plus the backend's libraries and fixed structures;
- tokenizer: the vocabulary tables (llama.cpp's own, or the ``tokenizers`` library's);
- resident weights: the weight files (exact for an artifact: GGUF tensor bytes from the header,
  the IR's ``.bin``, ``model.onnx`` plus external data; parameters x bits-per-weight for a
  source) plus the working copies a runtime makes of them;
- KV: ``2 x layers x kv_heads x head_dim x bytes(precision)`` per token, twice for ONNX
  Runtime's ping-pong buffers on optimum's graphs (once on edgellm's builder graphs: past and
  present share one buffer), at the full context. Sliding-window layers (Gemma 2/3,
  Mistral) are *not* accounted for: every layer gets the full context, an upper bound;
- compute: activations at a full context (a prompt that fills it).

On a discrete GPU only weights, KV and compute count against the budget (its VRAM); the rest
lives in host RAM. The GPU and NPU figures reuse the CPU measurements below.

Calibration (SmolLM2-135M: 30 layers, hidden 576, vocab 49152; CPython 3.11, 2-core x86-64
AVX2, llama-cpp-python 0.3.36, OpenVINO 2026.4.1, ONNX Runtime 1.32.0). RSS read by psutil
after each step, in fresh processes, the context filled by the prompt:

- CPython + numpy + edgellm: 31.5 MiB. ``import llama_cpp``: +13.4 MiB; ``openvino`` and the
  OpenVINO runtime module (with ``tokenizers``): +25.6 MiB; ``onnxruntime`` and its runtime
  module: +21.9 MiB.
- llama.cpp, after load minus weights (tensor bytes, memory-mapped) minus KV: 26.8 MiB for
  both Q8_0 and Q4_1, i.e. ~572 B per vocabulary entry. Prefill of a 512-token batch touched
  14.3-15.1 MiB of compute buffer at n_ctx 512, 17.1-17.5 MiB at 2048: ~3.5 float32 rows of
  width hidden + intermediate per batch token, plus the f16 KQ mask (batch x n_ctx x 2 B).
- ``tokenizers`` loading SmolLM2's tokenizer.json: +32.6 MiB, ~680 B per vocabulary entry.
- ONNX Runtime after load, minus runtime, tokenizer and file bytes: int4 216, int8 251, fp32
  426 MiB. Each holds a float copy of a tied embedding (constant-folded ``Transpose`` for the
  lm_head: 108 MiB); the rest fits 68 MiB + 0.62 x the bytes of the quantized layer weights
  (prepacked kernels; fitted on int4 and fp32, int8 within 4%). Prefill adds the logits
  buffer (n_batch x vocab x 4), both KV buffers, and eager attention (scores and softmax:
  2 x heads x n_batch x n_ctx x 4 B) plus MLP activations (3 x n_batch x intermediate x 4 B):
  predicted 644 / 834 MiB, measured 603 / 839 MiB at n_ctx 512 / 2048 (int4). Those are
  optimum's graphs; edgellm's builder graphs (the default ONNX exporter) hold 46 MiB + 0.174 x
  the layer weight bytes after load, one KV copy, and one prefill chunk of activations
  (no score matrix, one row of logits): predicted 272 / 339 MiB, measured 276 / 349 MiB at
  n_ctx 512 / 2048 (int4).
- OpenVINO CPU prefills the whole prompt in one request. With the output projection sliced
  to the last position (``runtimes/ov_logits.py``) the peak grows 58 KiB per prompt token
  (no quadratic attention term: fused SDPA): the KV plus 18 B x (hidden + intermediate), over
  24 MiB of the request's own buffers: predicted 373 / 403 / 462 MiB, measured 374 / 402 / 463
  MiB at n_ctx 512 / 1024 / 2048 (int4, prompt n_ctx - 8). Unsliced (the NPU pipeline) it was
  0.46 MiB per token: twice the float32 logits per token (2 x vocab x 4) plus 32 B x
  (hidden + intermediate) plus the KV. The rest, at 1000 tokens, minus runtime and tokenizer:
  int4 215, int8 296, fp16 803 MiB for .bin files of 82, 129 and 257 MiB: the file, a float32
  copy of the lm_head (vocab x hidden x 4 = 108 MiB) for compressed weights, float32 copies
  of fp16 weights (no fp16 arithmetic on AVX2), and ~40 MiB of compiled-model structures
  (25-59 MiB across the three). A first compile (no model cache) peaks ~30 MiB higher than a cached load.

The same constants serve every model; larger models are an extrapolation from this one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from edgellm.artifact import Artifact, Format, find_artifact
from edgellm.devices.detect import (
    HOST_NAME,
    detect,
    host_backends,
    host_budget,
    host_cpu,
    host_gpu,
    host_npu,
    probe_llama_gpu,
    probe_onnxruntime,
    probe_openvino,
)
from edgellm.devices.profile import DeviceProfile
from edgellm.errors import (
    InvalidInputError,
    ModelNotFoundError,
    NoCompatibleRuntimeError,
    UnsupportedFormatError,
)
from edgellm.runtimes.base import DEFAULT_MAX_CTX, get_backend
from edgellm.spec import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["BACKEND_MODELS", "KV_BYTES", "QUANTS", "Candidate", "ModelInfo", "Plan", "describe_model",
           "host_profile", "kv_bytes_per_token", "plan", "weight_bytes"]

MiB = 2**20
GiB = 2**30

#: Bytes per cached K or V element. q8_0 / q4_0 are ggml blocks of 32 values (34 and 18 bytes,
#: ggml-common.h); OpenVINO's u8 cache also keeps a scale and zero point per token and head,
#: which this table leaves out (8 B per head_dim values).
KV_BYTES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "u8": 1.0}

#: Prefill chunk of llama.cpp and ONNX Runtime in edgellm (their runtimes' default n_batch).
N_BATCH = 512
#: OpenVINO GenAI's default NPU response length (MIN_RESPONSE_LEN); prompt length from the profile.
NPU_MIN_RESPONSE_LEN = 128
NPU_MAX_PROMPT_LEN = 1024
NPU_ALIGN = 64


def kv_bytes_per_token(spec: ModelSpec, precision: str) -> int:
    """``2 x layers x kv_heads x head_dim x bytes(precision)``: one token's K and V, all layers."""
    return int(2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * KV_BYTES[precision])


# -- weights: bits per weight per format and quantization ----------------------------------------


@dataclass(frozen=True)
class Quant:
    """One quantization of one format: how many bits its weights take, and what it implies.

    ``layer_bits`` covers the transformer blocks; ``embed_bits`` the token embedding (and a tied
    lm_head), ``head_bits`` an untied lm_head (None: as the layers); ``unties`` says a tied
    lm_head is stored as a separate quantized copy (ONNX int4), so it costs ``head_bits`` too.
    Rows of a format are in preference order, most precise first; ``auto`` rows are the ladder
    the planner walks, the others only serve as suggestions and to size artifacts. ``kv`` fixes
    the KV precision (an ONNX graph's float type); ``npu`` marks the NPU recipe; ``float_bits``
    float weights. ``exporter`` names the ONNX exporter that writes the row: edgellm's
    ``builder`` keeps one KV copy and no float copy of a tied table; ``optimum`` rows size
    optimum's graphs (the default exporter for fp16 and int8-dynamic, and older artifacts).
    """

    format: str
    name: str
    layer_bits: float
    embed_bits: float | None = None
    head_bits: float | None = None
    unties: bool = False
    kv: str | None = None
    auto: bool = True
    npu: bool = False
    float_bits: int | None = None
    convert_options: tuple[tuple[str, Any], ...] = ()
    exporter: str | None = None


#: GGUF: Llama-2-7B bits per weight from llama.cpp's examples/quantize/README.md (the whole file:
#: Q4_K_M 4.84 mixes Q4_K and Q6_K); Q8_0 and Q4_0 are their block sizes (34 and 18 B per 32).
#: SmolLM2 (rows of 576, not a multiple of 256) measured Q4_K_M at 6.3: k-quants fall back there.
#: OpenVINO, measured on SmolLM2: fp16 16.0, int8 8.04 (per-channel f16 scale and u8 zero point),
#: int4 group 64 asymmetric 4 + 16/64 + 4/64 = 4.3125 with embedding and lm_head in int8 (85.8 MB
#: file, 85.7 predicted); the NPU recipe is channel-wise symmetric int4 (~4.03).
#: ONNX, measured: fp32 32.1; MatMulNBits block 32 with float32 scales: int4 4 + 32/32 + 4/32 =
#: 5.125, int8 8 + 1 + 8/32 = 9.25, the embedding kept float32 (182.6 MB file, 181.3 predicted).
#: ONNX int4 since the converter unties the lm_head: embedding (GatherBlockQuantized) and lm_head
#: both int4 at 5.125 (SmolLM2: 109.2 MB file). The builder stores a tied int4 table once, read
#: by both (SmolLM2: 88.5 MB file, 88.6 predicted); its int8 keeps the table float32 and an int8
#: copy for the head.
QUANTS: tuple[Quant, ...] = (
    Quant("gguf", "F32", 32, auto=False, float_bits=32),
    Quant("gguf", "F16", 16, float_bits=16),
    Quant("gguf", "BF16", 16, auto=False, float_bits=16),
    Quant("gguf", "Q8_0", 8.5),
    Quant("gguf", "Q6_K", 6.56, auto=False),
    Quant("gguf", "Q5_K_M", 5.68, auto=False),
    Quant("gguf", "Q4_K_M", 4.84),
    Quant("gguf", "Q4_K_S", 4.58, auto=False),
    Quant("gguf", "Q4_0", 4.5, auto=False),
    Quant("gguf", "Q3_K_M", 3.91, auto=False),
    Quant("gguf", "Q2_K", 3.35, auto=False),
    Quant("openvino", "fp32", 32, auto=False, float_bits=32),
    Quant("openvino", "fp16", 16, float_bits=16),
    Quant("openvino", "int8", 8.04),
    Quant("openvino", "int4", 4.3125, embed_bits=8.04, head_bits=8.04),
    Quant("openvino", "int4", 4.03, embed_bits=8.04, head_bits=8.04, npu=True,
          convert_options=(("npu", True),)),
    Quant("onnx", "fp32", 32, kv="f32", auto=False, float_bits=32, exporter="builder"),
    Quant("onnx", "fp16", 16, kv="f16", float_bits=16, exporter="optimum"),
    Quant("onnx", "int8", 9.25, embed_bits=32, head_bits=9.25, unties=True, kv="f32", exporter="builder"),
    Quant("onnx", "int4", 5.125, embed_bits=5.125, kv="f32", exporter="builder"),
    Quant("onnx", "int8-dynamic", 8.0, embed_bits=32, kv="f32", auto=False, exporter="optimum"),
    Quant("onnx", "fp32", 32, kv="f32", auto=False, float_bits=32, exporter="optimum"),
    Quant("onnx", "int8", 9.25, embed_bits=32, kv="f32", auto=False, exporter="optimum"),
    Quant("onnx", "int4", 5.125, embed_bits=5.125, head_bits=5.125, unties=True, kv="f32", auto=False,
          exporter="optimum"),
)


def find_quant(fmt: str, name: str | None, exporter: str | None = None) -> Quant | None:
    """The (first) table row of ``name`` (case-insensitive) in ``fmt`` (written by ``exporter`` when
    given), or None when it has none."""
    return next((q for q in QUANTS if q.format == fmt and name and q.name.lower() == name.lower()
                 and (exporter is None or q.exporter in (None, exporter))), None)


def weight_bytes(spec: ModelSpec, quant: Quant) -> int:
    """Estimated weight bytes of ``spec`` in ``quant``: layers, embedding and lm_head apart."""
    table = spec.vocab_size * spec.hidden_size
    head = 0 if spec.tied_embeddings else table
    layers = spec.n_params() - table - head
    stored_head = table if quant.unties else head
    bits = (layers * quant.layer_bits + table * (quant.embed_bits or quant.layer_bits)
            + stored_head * (quant.head_bits or quant.layer_bits))
    return int(bits / 8)


def _layer_bytes(spec: ModelSpec, quant: Quant | None, total: int) -> int:
    """Bytes of the transformer blocks within ``total`` weight bytes (embedding/lm_head removed)."""
    if quant is None:
        return total
    table = spec.vocab_size * spec.hidden_size
    stored_head = table if quant.unties or not spec.tied_embeddings else 0
    head = stored_head * (quant.head_bits or quant.layer_bits) / 8
    return max(0, int(total - table * (quant.embed_bits or quant.layer_bits) / 8 - head))


# -- run-time memory per backend -----------------------------------------------------------------

#: CPython 3.11 + numpy + edgellm, measured (see the module docstring).
PROCESS_BYTES = int(31.5 * MiB)


def _batch(n_ctx: int) -> int:
    return min(n_ctx, N_BATCH)


def _llama_weights(spec: ModelSpec, quant: Quant | None, file_bytes: int) -> int:
    return file_bytes  # memory-mapped; every page is touched by the first forward pass


def _llama_compute(spec: ModelSpec, n_ctx: int, quant: Quant | None) -> int:
    rows = _batch(n_ctx)
    return int(rows * (spec.hidden_size + spec.intermediate_size) * 4 * 3.5 + rows * n_ctx * 2)


#: edgellm's builder graphs (345 nodes for SmolLM2, against optimum's 7,249) after load, minus
#: runtime, tokenizer and file bytes, measured: int4 58 MiB, fp32 117 MiB, i.e. 46 MiB + 0.174 x
#: the layer weight bytes (no float copy of the tied table: the head reads the table itself).
_BUILDER_FIXED = 46 * MiB
_BUILDER_PREPACK = 0.174
_OV_REQUEST = 24 * MiB  # an infer request's own buffers with the logits sliced
_ORT_FIXED = 68 * MiB  # optimum's graphs (the backend row's fixed bytes)


def _ort_weights(spec: ModelSpec, quant: Quant | None, file_bytes: int) -> int:
    if quant is not None and quant.exporter == "builder":  # the row's fixed bytes are optimum's
        return int(file_bytes + _BUILDER_PREPACK * _layer_bytes(spec, quant, file_bytes)
                   + _BUILDER_FIXED - _ORT_FIXED)
    # optimum's tied lm_head is Transpose(embedding), constant-folded into a float copy
    folded = spec.tied_embeddings and not (quant is not None and quant.unties)
    tied_copy = spec.vocab_size * spec.hidden_size * KV_BYTES[_ort_kv(quant)] if folded else 0
    return int(file_bytes + 0.62 * _layer_bytes(spec, quant, file_bytes) + tied_copy)


def _ort_kv(quant: Quant | None) -> str:
    return quant.kv if quant is not None and quant.kv else "f32"


def _ort_compute(spec: ModelSpec, n_ctx: int, quant: Quant | None) -> int:
    rows = _batch(n_ctx)
    if quant is not None and quant.exporter == "builder":
        # one row of logits (logits_to_keep); GroupQueryAttention keeps no full score matrix:
        # fitted on SmolLM2 int4, 25.5 / 27 MiB measured at n_ctx 512 / 2048 (a 512-token chunk)
        return rows * (4 * spec.intermediate_size + 8 * spec.hidden_size) * 4
    logits = rows * spec.vocab_size * 4
    attention = 2 * spec.n_heads * rows * n_ctx * 4
    return logits + attention + 3 * rows * spec.intermediate_size * 4


def _ov_weights(spec: ModelSpec, quant: Quant | None, file_bytes: int) -> int:
    if quant is not None and quant.float_bits == 16:
        return 3 * file_bytes  # the fp16 file plus a float32 working copy
    if quant is not None and quant.float_bits == 32:
        return file_bytes
    return file_bytes + spec.vocab_size * spec.hidden_size * 4  # float32 lm_head


def _ov_compute(spec: ModelSpec, n_ctx: int, quant: Quant | None) -> int:
    if quant is not None and quant.npu:  # the NPU pipeline keeps every position's logits
        return n_ctx * (2 * spec.vocab_size * 4 + 32 * (spec.hidden_size + spec.intermediate_size))
    # logits for the last position only (runtimes/ov_logits.py): fitted on SmolLM2 int4
    return _OV_REQUEST + n_ctx * 18 * (spec.hidden_size + spec.intermediate_size)


@dataclass(frozen=True)
class BackendModel:
    """How one backend uses memory: one row per backend (see the module docstring)."""

    name: str
    import_bytes: int
    fixed_bytes: int  # graph / compiled-model structures
    tokenizer_bytes_per_entry: int
    kv_copies: int
    kv_ladder: tuple[str, ...]  # KV precisions tried, best first; () = fixed by the artifact
    npu_static: bool  # compiles the static shapes an NPU needs
    weights: Callable[[ModelSpec, Quant | None, int], int]
    compute: Callable[[ModelSpec, int, Quant | None], int]


BACKEND_MODELS: dict[str, BackendModel] = {
    row.name: row for row in (
        BackendModel("llamacpp", int(13.4 * MiB), 0, 572, 1, ("f16", "q8_0"), False,
                     _llama_weights, _llama_compute),
        BackendModel("openvino", int(25.6 * MiB), 40 * MiB, 680, 1, ("f16", "u8"), True,
                     _ov_weights, _ov_compute),
        BackendModel("onnxruntime", int(21.9 * MiB), _ORT_FIXED, 680, 2, (), False,
                     _ort_weights, _ort_compute),
    )
}

#: Formats the planner sizes.
PLANNED_FORMATS = ("gguf", "openvino", "onnx")


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


def _npu_shape(prompt: int | None, response: int | None) -> tuple[int, int]:
    """The NPU's static (prompt, response) lengths, each rounded up to 64 as the plugin does."""
    def up(n: int) -> int:
        return -(-n // NPU_ALIGN) * NPU_ALIGN
    return up(prompt or NPU_MAX_PROMPT_LEN), up(response or NPU_MIN_RESPONSE_LEN)


# -- candidates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: format, quantization, backend, device, KV precision — and the verdict.

    Byte figures are None for a candidate refused before sizing (wrong format, no NPU support).
    ``predicted_peak_bytes`` is the predicted peak RSS at ``context``, split in ``breakdown``
    (its "weights" include the runtime's working copies); ``required_bytes`` is the part that
    counts against ``budget_bytes`` (all of it, except host RAM on a discrete GPU).
    """

    backend: str
    device: str
    format: str
    quantization: str | None
    kv_precision: str | None
    status: str  # "chosen", "fits" (a later preference) or "rejected"
    reason: str
    weight_bytes: int | None = None  # the weight files (exact) or their estimate
    weights_exact: bool = False
    kv_bytes_per_token: int | None = None  # every copy the backend keeps
    budget_bytes: int | None = None
    context: int | None = None
    max_context: int | None = None
    context_cap: int | None = None
    predicted_peak_bytes: int | None = None
    required_bytes: int | None = None
    breakdown: Mapping[str, int] = field(default_factory=dict)
    convert_options: Mapping[str, Any] = field(default_factory=dict)
    runtime_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``gguf Q8_0 on llamacpp:cpu, KV f16``."""
        kv = f", KV {self.kv_precision}" if self.kv_precision else ""
        return f"{self.format} {self.quantization or '(any)'} on {self.backend}:{self.device}{kv}"

    @property
    def fits(self) -> bool:
        """True when the prediction at ``context`` is within the budget."""
        return self.status in ("chosen", "fits")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data.update(label=self.label, breakdown=dict(self.breakdown),
                    convert_options=dict(self.convert_options), runtime_options=dict(self.runtime_options))
        return data


@dataclass(frozen=True)
class _Option:
    """A sizable option before its verdict."""

    backend: BackendModel
    device: str
    format: str
    quant: Quant | None
    quant_name: str | None
    kv: str
    file_bytes: int
    exact: bool
    budget: int
    counts_host: bool  # False on a discrete GPU: host RAM is not the budget
    cap: int
    cap_why: str
    convert_options: tuple[tuple[str, Any], ...] = ()
    kv_budget: int | None = None  # KV bytes every session together may hold

    @property
    def kv_copies(self) -> int:
        """KV copies a session keeps: one on a builder graph (past and present share a buffer)."""
        return 1 if self.quant is not None and self.quant.exporter == "builder" else self.backend.kv_copies

    def kv_per_token(self, spec: ModelSpec) -> int:
        return self.kv_copies * kv_bytes_per_token(spec, self.kv)

    def kv_cost(self, spec: ModelSpec, n_ctx: int) -> int:
        """A session of ``n_ctx``; with a budget, the whole budget (sessions may fill it together)."""
        one = self.kv_per_token(spec) * n_ctx
        return one if self.kv_budget is None else max(one, self.kv_budget)

    def costs(self, spec: ModelSpec, n_ctx: int) -> dict[str, int]:
        b = self.backend
        parts = {"weights": b.weights(spec, self.quant, self.file_bytes),
                 "kv": self.kv_cost(spec, n_ctx),
                 "compute": b.compute(spec, n_ctx, self.quant),
                 "runtime": PROCESS_BYTES + b.import_bytes + b.fixed_bytes,
                 "tokenizer": b.tokenizer_bytes_per_entry * spec.vocab_size}
        return {k: int(v) for k, v in parts.items()}

    def required(self, spec: ModelSpec, n_ctx: int) -> int:
        host = () if self.counts_host else ("runtime", "tokenizer")
        return sum(v for k, v in self.costs(spec, n_ctx).items() if k not in host)

    def max_context(self, spec: ModelSpec) -> int:
        """Largest context up to the cap (and the KV budget) whose prediction fits the budget (0: none)."""
        low, high = 0, self.cap
        if self.kv_budget is not None:
            high = min(high, self.kv_budget // max(1, self.kv_per_token(spec)))
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.required(spec, mid) <= self.budget else (low, mid - 1)
        return low


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def _verdict(opt: _Option, spec: ModelSpec, context: int, best: int) -> tuple[bool, str]:
    """(fits, reason) of ``opt`` at ``context``, knowing its largest fitting context ``best``."""
    budget = _gib(opt.budget)
    if context > opt.cap:
        return False, f"device {opt.device} needs static shapes: context {context} > {opt.cap_why}"
    one = opt.kv_per_token(spec) * context
    if opt.kv_budget is not None and one > opt.kv_budget:
        return False, (f"a session of {context} tokens needs {_gib(one)} of KV {opt.kv} > kv_budget "
                       f"{_gib(opt.kv_budget)}")
    if best == 0 and opt.file_bytes > opt.budget:
        return False, f"weights {_gib(opt.file_bytes)} > budget {budget}"
    if best == 0:
        rest = opt.required(spec, 1) - opt.file_bytes
        return False, f"weights {_gib(opt.file_bytes)} + runtime {_gib(rest)} > budget {budget}"
    need = _gib(opt.required(spec, context))
    if best < context:
        return False, f"needs {need} at {context} tokens > budget {budget}; fits up to {best} tokens"
    return True, f"fits: {need} of {budget} at {context} tokens (up to {best})"


def _sized(opt: _Option, spec: ModelSpec, context: int) -> Candidate:
    best = opt.max_context(spec)
    ok, reason = _verdict(opt, spec, context, best)
    parts = opt.costs(spec, context)
    return Candidate(
        backend=opt.backend.name, device=opt.device, format=opt.format, quantization=opt.quant_name,
        kv_precision=opt.kv, status="fits" if ok else "rejected", reason=reason,
        weight_bytes=opt.file_bytes, weights_exact=opt.exact,
        kv_bytes_per_token=opt.kv_per_token(spec),
        budget_bytes=opt.budget, context=context, max_context=best, context_cap=opt.cap,
        predicted_peak_bytes=sum(parts.values()), required_bytes=opt.required(spec, context),
        breakdown=parts, convert_options=dict(opt.convert_options),
        runtime_options={"kv_precision": opt.kv},
    )


def _budget(profile: DeviceProfile, device: str) -> tuple[int, bool]:
    """(bytes the model may use on ``device``, whether host RAM counts against it)."""
    gpu = profile.gpu
    if device != "gpu" or gpu is None:
        return profile.budget_bytes, True
    limit = min(profile.budget_bytes, gpu.memory_bytes or profile.budget_bytes)
    return limit, gpu.shared_with_host is not False


def _static_npu(profile: DeviceProfile, device: str) -> bool:
    return device == "npu" and profile.npu is not None and profile.npu.static_shapes


def _cap(model: ModelInfo, profile: DeviceProfile, device: str) -> tuple[int, str]:
    """The largest context the device can hold at all, and what sets it."""
    positions = (model.spec.max_positions, f"the model's {model.spec.max_positions} positions")
    if not _static_npu(profile, device) or profile.npu is None:
        return positions
    prompt, response = _npu_shape(*(model.npu_shapes or (profile.npu.max_prompt_len, None)))
    size = prompt + response
    return min(positions, (size, f"max_prompt_len {prompt} + min_response_len {response} = {size}"))


def _refusal(backend: str, device: str, model: ModelInfo, profile: DeviceProfile) -> str | None:
    """Why ``backend`` on ``device`` cannot run this model at all (before sizing), or None."""
    if backend not in BACKEND_MODELS:
        return f"the planner has no memory model for backend {backend!r}"
    spec = get_backend(backend)
    if model.is_artifact and model.format not in spec.formats:
        return f"{backend} reads {', '.join(spec.formats)}, not this {model.format} model"
    if profile.name == HOST_NAME and not spec.installed():
        return f"backend {backend} not installed (pip install \"edgellm[{spec.extra}]\")"
    if _static_npu(profile, device) and profile.npu is not None:
        if not BACKEND_MODELS[backend].npu_static:
            return (f"device npu ({profile.npu.kind}) needs static shapes, which the {backend} backend "
                    "does not compile (only openvino does)")
        if model.is_artifact and model.npu_ready is not None:
            return f"device npu {model.npu_ready}"
    return None


def _npu_options(quant: Quant, profile: DeviceProfile) -> tuple[tuple[str, Any], ...]:
    prompt = profile.npu.max_prompt_len if profile.npu is not None else None
    return quant.convert_options + ((("max_prompt_len", prompt),) if quant.npu and prompt else ())


def _options(backend: str, device: str, fmt: str, model: ModelInfo, profile: DeviceProfile,
             quants: list[Quant] | None = None, kv_wanted: str | None = None) -> list[_Option]:
    """Every (quantization, KV precision) option of one pair, best first (only ``kv_wanted``'s if given)."""
    row = BACKEND_MODELS[backend]
    ladder = row.kv_ladder
    if kv_wanted is not None and ladder and kv_wanted in get_backend(backend).kv_precisions:
        ladder = (kv_wanted,)
    budget, counts_host = _budget(profile, device)
    cap, cap_why = _cap(model, profile, device)
    if model.is_artifact:
        sized = [(model.quant(), model.quantization, model.file_bytes or 0, True)]
    else:
        rows = quants if quants is not None else [q for q in QUANTS if q.format == fmt and q.auto]
        sized = [(q, q.name, weight_bytes(model.spec, q), False) for q in rows if q.npu == (device == "npu")]
    out = []
    for quant, name, size, exact in sized:
        extra = _npu_options(quant, profile) if quant is not None and not exact else ()
        out += [_Option(row, device, fmt, quant, name, kv, size, exact, budget, counts_host, cap, cap_why,
                        extra) for kv in ladder or (_ort_kv(quant),)]
    return out


def _format_of(backend: str, model: ModelInfo) -> str:
    if model.format is not None:
        return model.format
    return next((f for f in get_backend(backend).formats if f in PLANNED_FORMATS), "?")


# -- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the model, the device, the choice and every alternative with its reason."""

    model: ModelInfo
    profile: str
    budget_bytes: int
    requested_context: int | None
    candidates: tuple[Candidate, ...]

    @property
    def choice(self) -> Candidate | None:
        """The chosen candidate (None only on the plan NoCompatibleRuntimeError carries)."""
        return next((c for c in self.candidates if c.status == "chosen"), None)

    @property
    def context(self) -> int | None:
        """The context the choice was sized for."""
        return self.choice.context if self.choice else None

    @property
    def rejected(self) -> list[Candidate]:
        """Every candidate not chosen, each with its reason."""
        return [c for c in self.candidates if c.status != "chosen"]

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data."""
        spec = self.model.spec
        return {
            "model": self.model.to_dict(),
            "device": {"profile": self.profile, "budget_bytes": self.budget_bytes},
            "requested_context": self.requested_context,
            "context": self.context,
            "kv_bytes_per_token": {k: kv_bytes_per_token(spec, k) for k in KV_BYTES},
            "sliding_window": ("not accounted: every layer's KV is sized for the full context "
                               "(an upper bound)" if spec.sliding_window else None),
            "choice": self.choice.to_dict() if self.choice else None,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _check_context(context: int | None, spec: ModelSpec) -> None:
    if context is None:
        return
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise InvalidInputError(f"context must be a positive integer, got {context!r}")
    if context > spec.max_positions:
        raise InvalidInputError(f"context {context} > the model's {spec.max_positions} positions; "
                                f"ask for at most {spec.max_positions}")


def _resolve_profile(profile: DeviceProfile | str) -> DeviceProfile:
    if isinstance(profile, DeviceProfile):
        return profile
    if profile == HOST_NAME:
        return host_profile()
    from edgellm.devices.profile import load_profile

    return load_profile(profile)


def _pairs(profile: DeviceProfile, backends: Collection[str] | None) -> list[tuple[str, str]]:
    for name in backends or ():
        get_backend(name)  # an unknown name is an error that lists the registered ones
    return [p for p in profile.backends if backends is None or p[0] in backends]


def plan(model: str | os.PathLike[str] | ModelSpec, profile: DeviceProfile | str,
         context: int | None = None, *, backends: Collection[str] | None = None,
         formats: Collection[str] | None = None, kv_budget: int | str | None = None,
         kv_precision: str | None = None) -> Plan:
    """Plan ``model`` (a path or a ModelSpec) on ``profile`` (a DeviceProfile or its name).

    ``context`` is the context of one session (default: what ``kv_budget`` holds at each
    option's KV precision, else min(4096, the model's positions, an NPU's static size)).
    ``kv_budget`` (bytes or "96MiB") is the KV bytes every session may hold together: the
    prediction counts all of it. ``kv_precision`` keeps only options with that KV precision;
    ``backends`` / ``formats`` narrow the candidates. Raises NoCompatibleRuntimeError, with
    ``reasons`` and the partial plan as ``.plan``, when nothing fits.
    """
    from edgellm.kvcache import normalize_precision, parse_bytes

    budget = None if kv_budget is None else parse_bytes(kv_budget)
    kv = None if kv_precision is None else normalize_precision(kv_precision, KV_BYTES, "the planner")
    info = describe_model(model)
    _check_context(context, info.spec)
    prof = _resolve_profile(profile)
    rows: list[Candidate] = []
    for backend, device in _pairs(prof, backends):
        fmt = _format_of(backend, info)
        if formats is None or fmt in formats:
            rows += _candidates(backend, device, fmt, info, prof, context, budget, kv)
    rows = _choose(rows)
    if prof.name == HOST_NAME:  # speeds measured here (bench --matrix) outrank profile order
        from edgellm.devices.measured import prefer_measured

        rows = prefer_measured(info, rows)
    result = Plan(info, prof.name, prof.budget_bytes, context, tuple(rows))
    if result.choice is None:
        raise _nothing_fits(result, prof, backends, formats)
    logger.info("plan for %s on %s: %s", info.path or info.spec.architecture, prof.name, result.choice.label)
    return result


def _candidates(backend: str, device: str, fmt: str, info: ModelInfo, prof: DeviceProfile,
                context: int | None, kv_budget: int | None = None, kv: str | None = None
                ) -> list[Candidate]:
    refusal = _refusal(backend, device, info, prof)
    if refusal is not None:
        reads = fmt in get_backend(backend).formats
        shown = fmt if reads else get_backend(backend).formats[0]
        quant = info.quantization if reads else None
        return [Candidate(backend, device, shown, quant, None, "rejected", refusal)]
    opts = [replace(o, kv_budget=kv_budget) for o in _options(backend, device, fmt, info, prof, kv_wanted=kv)
            if kv is None or o.kv == kv]
    return [_sized(o, info.spec, context or _default_context(o, info.spec)) for o in opts]


def _default_context(opt: _Option, spec: ModelSpec) -> int:
    """What the KV budget holds at this option's precision, else min(4096, the cap)."""
    if opt.kv_budget is None:
        return min(DEFAULT_MAX_CTX, opt.cap)
    return max(1, min(opt.cap, opt.kv_budget // opt.kv_per_token(spec)))


def _choose(rows: list[Candidate]) -> list[Candidate]:
    """The first fitting candidate (profile order, then precision) is chosen; later fits say why not."""
    chosen = next((c for c in rows if c.fits), None)
    out = []
    for c in rows:
        if c is chosen:
            c = replace(c, status="chosen")
        elif c.fits and chosen is not None:
            c = replace(c, reason=f"fits, but {chosen.label} comes first (profile order, then precision)")
        out.append(c)
    return out


# -- when nothing fits -------------------------------------------------------------------------


def _nothing_fits(result: Plan, prof: DeviceProfile, backends: Collection[str] | None,
                  formats: Collection[str] | None) -> NoCompatibleRuntimeError:
    reasons = {f"{c.backend}:{c.device} {c.format} {c.quantization or '-'} kv={c.kv_precision or '-'}":
               c.reason for c in result.candidates}
    sized = [c for c in result.candidates if c.required_bytes is not None]
    where = f"{prof.name} (budget {_gib(prof.budget_bytes)})"
    if not result.candidates:
        pairs = ", ".join(f"{b}:{d}" for b, d in prof.backends)
        wanted = ", ".join([*(backends or ()), *(formats or ())])
        message = f"{prof.name} runs none of the wanted backends/formats ({wanted}); it offers: {pairs}"
    elif not sized:
        detail = "; ".join(f"{c.backend}:{c.device}: {c.reason}" for c in result.candidates)
        message = f"nothing can run this model on {where}: {detail}"
    else:
        closest = min(sized, key=lambda c: (c.required_bytes or 0) - (c.budget_bytes or 0))
        hints = "; or ".join(_suggest(closest, result.model, prof))
        message = f"nothing fits {where}: {_shortfall(closest)}; {hints}"
    err = NoCompatibleRuntimeError(message, reasons)
    err.plan = result  # type: ignore[attr-defined]
    return err


def _shortfall(c: Candidate) -> str:
    budget, weights = c.budget_bytes or 0, c.weight_bytes or 0
    if weights > budget:
        return (f"{c.label}: weights need {_gib(weights)}, budget {_gib(budget)}: "
                f"{_gib(weights - budget)} missing")
    need = c.required_bytes or 0
    return (f"{c.label} needs {_gib(need)} at {c.context} tokens, budget {_gib(budget)}: "
            f"{_gib(need - budget)} missing")


def _suggest(c: Candidate, model: ModelInfo, prof: DeviceProfile) -> list[str]:
    """Ways out: a quantization of the same format that fits, or a shorter context."""
    source = replace(model, format=None, quantization=None, file_bytes=None)
    rows = [q for q in QUANTS if q.format == c.format and q.npu == (c.device == "npu")]
    options = _options(c.backend, c.device, c.format, source, prof, rows)
    fitting = [(o, o.max_context(model.spec)) for o in options]
    how = " (re-convert the source with --quant {})" if model.is_artifact else ""
    wanted = c.context or 1
    hints = [f"{o.quant_name} ({_gib(o.file_bytes)}, KV {o.kv}) would fit at {wanted} tokens"
             + how.format(o.quant_name) for o, best in fitting if best >= wanted][:1]
    if c.max_context:
        hints.append(f"{c.label} fits with --context {c.max_context}")
    partial = [(o, best) for o, best in fitting if best >= 1]
    if not hints and partial:  # the most precise quantization that fits at all, at its longest context
        o, best = max((p for p in partial if p[0].quant_name == partial[0][0].quant_name), key=lambda p: p[1])
        hints.append(f"{o.quant_name} ({_gib(o.file_bytes)}, KV {o.kv}) would fit with up to {best} tokens "
                     "of context" + how.format(o.quant_name))
    if not hints and fitting:
        low = fitting[-1][0]
        hints.append(f"even {low.quant_name} ({_gib(low.file_bytes)}) does not fit: use a device with more "
                     "memory or a smaller model")
    return hints or ["no quantization in the planner's table fits"]


# -- this host ------------------------------------------------------------------------------------

#: Backend -> the probe detect() runs for it; host_profile(formats) runs only the needed ones.
_PROBES: dict[str, Callable[[], Any]] = {"llamacpp": probe_llama_gpu, "openvino": probe_openvino,
                                         "onnxruntime": probe_onnxruntime}


def host_profile(formats: Collection[str] | None = None) -> DeviceProfile:
    """:func:`~edgellm.devices.detect`, asking only the runtimes that read ``formats`` (all when None).

    Loading a GGUF file then never imports OpenVINO or ONNX Runtime just to find out what they drive.
    """
    if formats is None:
        return detect()
    wanted = {name for name in _PROBES if set(get_backend(name).formats) & set(formats)}
    found = {name: probe() if name in wanted else None for name, probe in _PROBES.items()}
    ov, ort, llama_gpu = found["openvino"], found["onnxruntime"], found["llamacpp"]
    memory = psutil.virtual_memory()
    return DeviceProfile(
        name=HOST_NAME, description=f"this machine, as detected: {platform.platform()}",
        total_memory_bytes=int(memory.total),
        budget_bytes=host_budget(int(memory.total), int(memory.available)), cpu=host_cpu(),
        backends=host_backends(ov, ort, llama_gpu), gpu=host_gpu(ov, ort, llama_gpu, platform.system()),
        npu=host_npu(ov, ort), available_memory_bytes=int(memory.available),
    )
