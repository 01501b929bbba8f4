"""The tensors of a GGUF file under Hugging Face names, dequantized one at a time, no torch.

The inverse of llama.cpp's ``convert_hf_to_gguf.py`` (and of edgellm's own GGUF writer, whose
per-architecture table :data:`~edgellm.converters.gguf_arch.GGUF_RULES` is read backwards here):

* **names**: gguf-py's ``TensorNameMap`` for the file's architecture, asked for the Hugging Face
  module names that architecture's checkpoint has (:func:`hf_modules`, from the row of
  :data:`~edgellm.converters.onnx_arch.BUILDER_ARCHS` that says which projections are fused and
  which norms exist) and inverted;
* **values**: the raw bytes of one tensor are read with a plain file read (no memory map, so
  the pages do not stay in the resident set) and dequantized by ``gguf.quants.dequantize``
  (numpy); then what the writer did is undone: Llama/Mistral Q and K rows go back from
  llama.cpp's interleaved RoPE to rotate-half (``LlamaModel.permute`` inverted, weights and
  biases as llama.cpp permutes both), Gemma norms lose the ``+1``. Phi-3's fused ``attn_qkv``
  and ``ffn_up`` are stored exactly as Hugging Face's ``qkv_proj`` and ``gate_up_proj``;
* **tied embeddings**: no ``output.weight`` means no ``lm_head.weight`` (the config says tied);
* **not weights**: ``rope_factors_long/short`` (Phi-3 longrope) and ``rope_freqs`` (Llama 3.1
  frequency smoothing) are what Hugging Face keeps in ``config.json``; they are read by
  :meth:`GGUFTensors.aux` for the config, never listed as checkpoint tensors.

:class:`GGUFTensors` offers the read side of :class:`~edgellm.converters.safetensors.Checkpoint`
(``names``, ``items``, ``read``, ``in``), so whatever streams a checkpoint can stream a GGUF.
Peak memory is one tensor: its raw bytes plus its float32 copy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.converters.gguf_arch import GGUF_RULES
from edgellm.converters.onnx_arch import BUILDER_ARCHS, BuilderArch
from edgellm.errors import ConversionError, UnknownQuantizationError
from edgellm.gguf_meta import GGUFHeader, TensorEntry, read_gguf_header
from edgellm.spec import ARCHITECTURES, ModelSpec

__all__ = ["AUX_TENSORS", "GGUFTensors", "hf_modules", "unpermute_qk"]

#: GGUF tensors that hold configuration, not weights (read for config.json).
AUX_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_GLOBAL = ("model.embed_tokens", "model.norm", "lm_head")


def hf_modules(arch: BuilderArch) -> tuple[str, ...]:
    """The per-layer module names (``model.layers.{bid}.`` omitted) of one architecture."""
    qkv = ("self_attn.qkv_proj",) if arch.fused_qkv else ("self_attn.q_proj", "self_attn.k_proj",
                                                          "self_attn.v_proj")
    mlp = ("mlp.gate_up_proj",) if arch.fused_gate_up else ("mlp.gate_proj", "mlp.up_proj")
    qk_norm = ("self_attn.q_norm", "self_attn.k_norm") if arch.qk_norm else ()
    sandwich = ("pre_feedforward_layernorm", "post_feedforward_layernorm") if arch.sandwich_norms else ()
    return ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "mlp.down_proj",
            *qkv, *mlp, *qk_norm, *sandwich)


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Interleaved RoPE rows -> rotate-half rows: the inverse of ``gguf_arch.permute_qk``."""
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One checkpoint tensor as it will be read: Hugging Face name and shape, GGUF record."""

    name: str
    file: Path
    shape: tuple[int, ...]
    entry: TensorEntry

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _name_table(path: Path, spec: ModelSpec, gguf_arch: str) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face tensor name for every tensor the architecture can have."""
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    name_map = gguf.get_tensor_name_map(arch_enum, spec.n_layers)
    modules = [*_GLOBAL, *(f"model.layers.{i}.{m}" for i in range(spec.n_layers)
                           for m in hf_modules(BUILDER_ARCHS[spec.architecture]))]
    table: dict[str, str] = {}
    for module in modules:
        gguf_name = name_map.get_name(module)
        if gguf_name is None:  # Gemma: llama.cpp always uses the embedding as output
            continue
        for suffix in (".weight", ".bias"):
            table[gguf_name + suffix] = module + suffix
    return table


@functools.cache
def _dequantizable(type_id: int) -> bool:
    """Whether gguf-py dequantizes GGML type ``type_id`` (asked of gguf-py with one zero block)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(type_id)
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64):
        return True
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_type(path: Path, entry: TensorEntry) -> None:
    """A tensor gguf-py cannot dequantize is refused before anything is written."""
    from gguf.constants import GGMLQuantizationType

    if not _dequantizable(entry.type_id):
        qtype = GGMLQuantizationType(entry.type_id)
        raise UnknownQuantizationError(
            f"{path}: tensor {entry.name!r} is stored as {qtype.name}, which gguf-py cannot dequantize "
            "(it reads F32, F16, BF16, Q4_0..Q8_0, the K-quants and the IQ types); re-quantize the GGUF "
            "with llama-quantize or convert from the Hugging Face checkpoint"
        )


class GGUFTensors:
    """A GGUF file's weights by Hugging Face name, read and dequantized lazily, one at a time."""

    def __init__(self, path: Path, header: GGUFHeader | None = None) -> None:
        self.folder = path.parent  # what checkpoint readers name in their errors
        self.path = path
        self.header = header or read_gguf_header(path)
        tied = not any(t.name == "output.weight" for t in self.header.tensors)
        self.spec = ModelSpec.from_gguf_metadata(self.header.metadata, source=str(path), tied_embeddings=tied)
        self.rules = GGUF_RULES[self.spec.architecture]
        table = _name_table(path, self.spec, ARCHITECTURES[self.spec.architecture].gguf_arch)
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._aux: dict[str, TensorEntry] = {}
        for entry in self.header.tensors:
            if entry.name in AUX_TENSORS:
                self._aux[entry.name] = entry
                continue
            if entry.name not in table:
                raise ConversionError(
                    f"{path}: tensor {entry.name!r} has no Hugging Face name in a "
                    f"{self.spec.architecture} model; the GGUF holds a variant edgellm does not convert "
                    "— convert from the Hugging Face checkpoint instead")
            _check_type(path, entry)
            hf = table[entry.name]
            self.tensors[hf] = GGUFTensorInfo(hf, path, tuple(reversed(entry.dims)), entry)

    def names(self) -> list[str]:
        """Hugging Face tensor names in file order."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def items(self) -> Iterator[tuple[str, GGUFTensorInfo]]:
        """(name, info) pairs in file order."""
        return iter(self.tensors.items())

    def nbytes(self) -> int:
        """Bytes of the float32 tensors :meth:`read` returns, all together."""
        return sum(t.numel * 4 for t in self.tensors.values())

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 in Hugging Face layout (dequantized, permutation and shift undone)."""
        info = self.tensors[name]
        arr = self._dequantize(info.entry).reshape(info.shape)
        if self.rules.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = unpermute_qk(arr, self.spec.n_heads)
        elif self.rules.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = unpermute_qk(arr, self.spec.n_kv_heads)
        if self.rules.norm_shift and name.endswith("norm.weight"):
            arr = arr - np.float32(self.rules.norm_shift)
        return arr

    def aux(self, name: str) -> np.ndarray | None:
        """One of :data:`AUX_TENSORS` as float32 (None when the file has none)."""
        entry = self._aux.get(name)
        return None if entry is None else self._dequantize(entry).reshape(-1)

    def close(self) -> None:
        """Nothing is held open between reads."""

    def _dequantize(self, entry: TensorEntry) -> np.ndarray:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        with self.path.open("rb") as f:
            f.seek(entry.start)
            raw = np.fromfile(f, dtype=np.uint8, count=entry.nbytes)
        if raw.size != entry.nbytes:
            raise ConversionError(f"{self.path}: tensor {entry.name!r} is cut short; re-download the file")
        qtype = GGMLQuantizationType(entry.type_id)
        if qtype == GGMLQuantizationType.F64:
            return raw.view(np.float64).astype(np.float32)
        rows = math.prod(entry.dims[1:])
        return np.asarray(dequantize(raw.reshape(rows, -1), qtype), dtype=np.float32)
