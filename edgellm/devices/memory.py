"""How much memory a model needs on each backend: the planner's calibrated memory model.

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
  24 MiB of the request's own buffers: predicted 373 / 402 / 462 MiB, measured 373 / 402 / 463
  MiB at n_ctx 512 / 1024 / 2048 (int4, prompt n_ctx - 8; ``benchmarks/bench_planner.py``,
  which measures every backend this way). Unsliced (the NPU pipeline) it was
  0.46 MiB per token: twice the float32 logits per token (2 x vocab x 4) plus 32 B x
  (hidden + intermediate) plus the KV. The rest, at 1000 tokens, minus runtime and tokenizer:
  int4 215, int8 296, fp16 803 MiB for .bin files of 82, 129 and 257 MiB: the file, a float32
  copy of the lm_head (vocab x hidden x 4 = 108 MiB) for compressed weights, float32 copies
  of fp16 weights (no fp16 arithmetic on AVX2), and ~40 MiB of compiled-model structures
  (25-59 MiB across the three). A first compile (no model cache) peaks ~30 MiB higher than a cached load.

The same constants serve every model; larger models are an extrapolation from this one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgellm.spec import ModelSpec

__all__ = ["BACKEND_MODELS", "KV_BYTES", "PLANNED_FORMATS", "QUANTS", "BackendModel", "Quant", "find_quant",
           "kv_bytes_per_token", "memory_model", "onnx_kv_precision", "weight_bytes"]

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
    tied_copy = spec.vocab_size * spec.hidden_size * KV_BYTES[onnx_kv_precision(quant)] if folded else 0
    return int(file_bytes + 0.62 * _layer_bytes(spec, quant, file_bytes) + tied_copy)


def onnx_kv_precision(quant: Quant | None) -> str:
    """The KV precision an ONNX graph of ``quant`` was exported with (float32 unless said)."""
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


def memory_model(backend: str) -> BackendModel | None:
    """How ``backend`` uses memory: a built-in's row, a plugin's ``BackendSpec.memory``, else None."""
    if backend in BACKEND_MODELS:
        return BACKEND_MODELS[backend]
    from edgellm.runtimes.base import get_backend

    found = get_backend(backend).memory
    return found if isinstance(found, BackendModel) else None
