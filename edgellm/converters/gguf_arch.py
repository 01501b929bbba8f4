"""Per-architecture rules for writing GGUF: one table row per architecture.

Each row says how Hugging Face tensors and hyper-parameters become what llama.cpp's
graph for that architecture expects (llama.cpp ``convert_hf_to_gguf.py`` and
``src/models/*.cpp`` are the reference):

* ``permute_qk``: Llama/Mistral checkpoints store Q and K for rotate-half RoPE; llama.cpp's
  ``llama`` graph uses interleaved RoPE, so Q/K rows are permuted (``LlamaModel.permute``).
* ``norm_shift``: Gemma RMSNorm computes ``x * (1 + w)``; llama.cpp computes ``x * w``, so
  1 is added to every ``*norm.weight``.
* ``drop_lm_head``: llama.cpp's Gemma graphs always use the token embedding as output.
* ``hparams``: extra metadata keys for that architecture.
* ``extra_tensors``: tensors llama.cpp needs that HF computes on the fly (RoPE factors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgellm.spec import ModelSpec

__all__ = ["ArchRules", "GGUF_RULES", "add_common_hparams", "permute_qk"]

Config = dict[str, Any]


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half Q/K rows -> interleaved pairs (llama.cpp ``LlamaModel.permute``)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _swa_pattern(writer: Any, cfg: Config) -> None:
    layer_types = cfg.get("layer_types")
    if layer_types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])


def _gemma2_hparams(writer: Any, cfg: Config, spec: ModelSpec) -> None:
    writer.add_attn_logit_softcapping(float(cfg.get("attn_logit_softcapping") or 50.0))
    writer.add_final_logit_softcapping(float(cfg.get("final_logit_softcapping") or 30.0))
    writer.add_sliding_window(int(cfg.get("sliding_window") or 4096))
    _swa_pattern(writer, cfg)


def _gemma3_hparams(writer: Any, cfg: Config, spec: ModelSpec) -> None:
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if cfg.get("sliding_window") and cfg.get("sliding_window_pattern", 6) != 1:
        writer.add_sliding_window(int(cfg["sliding_window"]))
        _swa_pattern(writer, cfg)
    if cfg.get("rope_local_base_freq"):
        writer.add_rope_freq_base_swa(float(cfg["rope_local_base_freq"]))


def _phi3_hparams(writer: Any, cfg: Config, spec: ModelSpec) -> None:
    rope = cfg.get("rope_scaling") or {}
    orig = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    writer.add_rope_scaling_orig_ctx_len(int(orig or spec.max_positions))
    # llama.cpp reads sliding_window == 0 as "no sliding window" (Phi-4)
    writer.add_sliding_window(int(cfg.get("sliding_window") or 0))


def _no_hparams(writer: Any, cfg: Config, spec: ModelSpec) -> None:
    return None


def _llama3_rope_freqs(cfg: Config, spec: ModelSpec) -> list[tuple[str, np.ndarray]]:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3.1+ RoPE scaling (llama.py, same math)."""
    from edgellm.kvcache.rope import llama3_factors

    rope = cfg.get("rope_scaling") or {}
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return []
    factors = llama3_factors(rope, spec.rope_theta, spec.head_dim)
    return [("rope_freqs.weight", np.asarray(factors, dtype=np.float32))]


def _phi3_rope_factors(cfg: Config, spec: ModelSpec) -> list[tuple[str, np.ndarray]]:
    rope = cfg.get("rope_scaling") or {}
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long or not short:
        return []
    return [
        ("rope_factors_long.weight", np.asarray(long, dtype=np.float32)),
        ("rope_factors_short.weight", np.asarray(short, dtype=np.float32)),
    ]


def _no_tensors(cfg: Config, spec: ModelSpec) -> list[tuple[str, np.ndarray]]:
    return []


@dataclass(frozen=True)
class ArchRules:
    """How one architecture's checkpoint becomes llama.cpp GGUF."""

    gguf_arch: str
    permute_qk: bool = False
    norm_shift: float = 0.0
    drop_lm_head: bool = False
    hparams: Callable[[Any, Config, ModelSpec], None] = _no_hparams
    extra_tensors: Callable[[Config, ModelSpec], list[tuple[str, np.ndarray]]] = _no_tensors


GGUF_RULES: dict[str, ArchRules] = {
    "llama": ArchRules("llama", permute_qk=True, extra_tensors=_llama3_rope_freqs),
    "mistral": ArchRules("llama", permute_qk=True),
    "qwen2": ArchRules("qwen2"),
    "qwen3": ArchRules("qwen3"),
    "phi3": ArchRules("phi3", hparams=_phi3_hparams, extra_tensors=_phi3_rope_factors),
    "gemma2": ArchRules("gemma2", norm_shift=1.0, drop_lm_head=True, hparams=_gemma2_hparams),
    "gemma3": ArchRules("gemma3", norm_shift=1.0, drop_lm_head=True, hparams=_gemma3_hparams),
}


def add_common_hparams(writer: Any, cfg: Config, spec: ModelSpec) -> None:
    """Metadata every architecture shares (TextModel.set_gguf_parameters in llama.cpp)."""
    writer.add_context_length(spec.max_positions)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    rotary = float(cfg.get("partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(spec.head_dim * rotary))
    writer.add_vocab_size(spec.vocab_size)
    _add_rope_scaling(writer, cfg.get("rope_scaling") or {})


def _add_rope_scaling(writer: Any, rope: Config) -> None:
    import gguf

    kind = str(rope.get("rope_type", rope.get("type", ""))).lower()
    factor = rope.get("factor")
    if kind == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
