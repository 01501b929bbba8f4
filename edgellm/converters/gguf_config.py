"""``config.json`` and ``generation_config.json`` of a GGUF file, from its metadata alone.

The inverse of ``gguf_arch.add_common_hparams`` and the per-architecture ``hparams`` rows (and
of llama.cpp's ``set_gguf_parameters``): the shape comes from
:meth:`~edgellm.spec.ModelSpec.from_gguf_metadata`, what an architecture adds from one row of
:data:`CONFIG_RULES`. What llama.cpp hard-codes instead of storing is written the way
llama.cpp computes it, citing ``src/llama-model.cpp``:

* Gemma attention scale: ``1/sqrt(head_dim)``, except the 27B models (46 layers for Gemma 2,
  62 for Gemma 3), which use ``1/sqrt(hidden/heads)`` -> ``query_pre_attn_scalar``;
* Gemma sliding layers: the ``sliding_window_pattern`` array when the file has one, else
  llama.cpp's default pattern (Gemma 2: every other layer, Gemma 3: five of six), which is
  also transformers' default, so ``layer_types`` is then left out;
* Phi-3 longrope: the ``rope_factors_long/short`` tensors are the config's factor lists;
* Llama 3.1 frequency smoothing: llama.cpp keeps only the resulting ``rope_freqs`` divisors,
  not the four parameters transformers' ``rope_scaling`` needs; parameters that recompute every
  divisor are found (Meta's, or fitted) or the file is refused. (transformers' own GGUF loader
  drops the tensor, and the scaling with it, silently.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgellm.converters.gguf_tensors import GGUFTensors
from edgellm.errors import ConversionError
from edgellm.spec import ARCHITECTURES, ModelSpec

__all__ = ["CONFIG_RULES", "ConfigRule", "hf_config", "generation_config"]

Config = dict[str, Any]


def _meta(src: GGUFTensors, key: str, default: Any = None) -> Any:
    arch = src.header.metadata.get("general.architecture")
    return src.header.metadata.get(f"{arch}.{key}", default)


def _window(src: GGUFTensors) -> Config:
    window = _meta(src, "attention.sliding_window")
    return {"sliding_window": int(window)} if window else {"sliding_window": None}


def _qwen(src: GGUFTensors) -> Config:
    window = _window(src)
    return {**window, "use_sliding_window": window["sliding_window"] is not None}


def _phi3(src: GGUFTensors) -> Config:
    cfg = _window(src)
    orig = _meta(src, "rope.scaling.original_context_length")
    cfg["original_max_position_embeddings"] = int(orig or src.spec.max_positions)
    long, short = src.aux("rope_factors_long.weight"), src.aux("rope_factors_short.weight")
    if long is not None and short is not None:
        cfg["rope_scaling"] = {"type": "longrope", "long_factor": long.tolist(),  # Phi3Config wants "type"
                               "short_factor": short.tolist()}
    return cfg


def _gemma(src: GGUFTensors, big_layers: int) -> Config:
    spec = src.spec
    big = spec.n_layers == big_layers  # llama.cpp's LLM_TYPE_27B
    cfg: Config = {
        "query_pre_attn_scalar": spec.hidden_size // spec.n_heads if big else spec.head_dim,
        **_window(src),
    }
    pattern = _meta(src, "attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == spec.n_layers:
        cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        cfg[key] = _meta(src, key)
    return cfg


def _gemma2(src: GGUFTensors) -> Config:
    return _gemma(src, big_layers=46)


def _gemma3(src: GGUFTensors) -> Config:
    cfg = _gemma(src, big_layers=62)
    cfg.pop("attn_logit_softcapping")
    cfg["rope_local_base_freq"] = float(_meta(src, "rope.freq_base_swa", 10000.0))  # llama.cpp default
    return cfg


def _llama3_candidates(freqs: np.ndarray, theta: float, dim: int,
                       orig: int) -> list[tuple[float, float, int]]:
    """(low_freq_factor, high_freq_factor, original context) to try, Meta's band (1, 4) first.

    In the smoothed band ``smooth = (orig / wavelen - low) / (high - low)`` is linear in
    1/wavelength: one smoothed divisor gives the original context for Meta's band, two or
    more fit any band (the context can then be any: the boundaries do not depend on it).
    """
    factor = float(freqs.max())
    inv_wavelen = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)) / (2 * math.pi)
    mid = (freqs > 1 + 1e-6) & (freqs < factor - 1e-6)
    smooth = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)
    out = [(1.0, 4.0, orig)]
    if mid.any():
        out.append((1.0, 4.0, int(round((3 * smooth[0] + 1) / inv_wavelen[mid][0]))))
    if mid.sum() >= 2:
        a, b = np.polyfit(inv_wavelen[mid], smooth, 1)  # a = orig / (high - low), b = -low / (high - low)
        out.append((-b * orig / a, (1 - b) * orig / a, orig))
    return out


def _llama3_rope(src: GGUFTensors, freqs: np.ndarray) -> Config | None:
    """The Llama 3.1 ``rope_scaling`` that reproduces llama.cpp's ``rope_freqs`` divisors.

    llama.cpp keeps only the divisors; the four parameters are not unique, so a candidate
    (:func:`_llama3_candidates`) is kept only when it recomputes every divisor; none does ->
    refused.
    """
    from edgellm.kvcache.rope import llama3_factors

    if np.allclose(freqs, 1.0):
        return None
    spec = src.spec
    dim = int(_meta(src, "rope.dimension_count") or spec.head_dim)
    orig = int(_meta(src, "rope.scaling.original_context_length") or 8192)  # Llama 3's pre-scaling context
    for low, high, ctx in _llama3_candidates(freqs, spec.rope_theta, dim, orig):
        rope = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": float(low),
                "high_freq_factor": float(high), "original_max_position_embeddings": ctx}
        if np.allclose(llama3_factors(rope, spec.rope_theta, dim), freqs, rtol=1e-4, atol=0):
            return rope
    raise ConversionError(
        f"{src.path}: the GGUF's rope_freqs tensor holds frequency divisors that no Llama 3.1 "
        "rope_scaling reproduces, so no Hugging Face config can say them; convert from the original "
        "Hugging Face checkpoint")


def _llama(src: GGUFTensors) -> Config:
    cfg: Config = {"attention_bias": "model.layers.0.self_attn.q_proj.bias" in src, "mlp_bias": False}
    freqs = src.aux("rope_freqs.weight")
    if freqs is not None:
        cfg["rope_scaling"] = _llama3_rope(src, freqs.astype(np.float64))
    return cfg


@dataclass(frozen=True)
class ConfigRule:
    """What one architecture's config.json adds to the shared keys."""

    extra: Callable[[GGUFTensors], Config]
    activation: tuple[str, str] = ("hidden_act", "silu")  # Gemma names the key differently


CONFIG_RULES: dict[str, ConfigRule] = {
    "llama": ConfigRule(_llama),
    "mistral": ConfigRule(_llama),
    "qwen2": ConfigRule(_qwen),
    "qwen3": ConfigRule(_qwen),
    "phi3": ConfigRule(_phi3),
    "gemma2": ConfigRule(_gemma2, ("hidden_activation", "gelu_pytorch_tanh")),
    "gemma3": ConfigRule(_gemma3, ("hidden_activation", "gelu_pytorch_tanh")),
}


def _rope_scaling(src: GGUFTensors) -> Config | None:
    kind = str(_meta(src, "rope.scaling.type", "none")).lower()
    factor = _meta(src, "rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        return {"rope_type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(_meta(src, "rope.scaling.original_context_length"))}
    return None


def _token_id(src: GGUFTensors, name: str) -> int | None:
    value = src.header.metadata.get(f"tokenizer.ggml.{name}_token_id")
    return int(value) if isinstance(value, int) else None


def hf_config(src: GGUFTensors) -> Config:
    """The ``config.json`` dict of the GGUF behind ``src``."""
    spec: ModelSpec = src.spec
    arch = ARCHITECTURES[spec.architecture]
    rule = CONFIG_RULES[spec.architecture]
    rotary = _meta(src, "rope.dimension_count")
    cfg: Config = {
        "architectures": [arch.hf_architectures[0]], "model_type": arch.hf_model_types[0],
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_positions,
        "rope_theta": spec.rope_theta, "rope_scaling": _rope_scaling(src), "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tied_embeddings, rule.activation[0]: rule.activation[1],
        "bos_token_id": _token_id(src, "bos"), "eos_token_id": _token_id(src, "eos"),
        "pad_token_id": _token_id(src, "padding"), "torch_dtype": "float32",
    }
    if rotary and int(rotary) != spec.head_dim:
        cfg["partial_rotary_factor"] = int(rotary) / spec.head_dim
    cfg.update(rule.extra(src))
    return cfg


def generation_config(src: GGUFTensors) -> Config:
    """``generation_config.json``: the special ids llama.cpp reads from the same metadata."""
    pairs = (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
    ids = {f"{key}_token_id": _token_id(src, name) for key, name in pairs}
    return {k: v for k, v in ids.items() if v is not None}
