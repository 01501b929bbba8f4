"""Per-architecture rules of the ONNX graph builder: one :class:`BuilderArch` row each.

What differs between the seven decoder families edgellm supports, as data (transformers'
``modeling_*.py`` files are the reference for every row):

* where Q/K/V and gate/up live: separate ``q_proj``/``k_proj``/``v_proj`` and
  ``gate_proj``/``up_proj`` (fused by the builder), or already fused (Phi-3 ``qkv_proj``,
  ``gate_up_proj``);
* per-head RMSNorm on Q and K (Qwen3, Gemma 3), before the rotary embedding;
* Gemma's conventions: norms scale by ``1 + w`` (``norm_offset``), the embedding is
  multiplied by ``sqrt(hidden)``, four norms per layer ("sandwich": after attention and
  after the MLP too), ``query_pre_attn_scalar`` sets the attention scale;
* which layers use a sliding window (``layer_types`` from config.json when present, else the
  family's default pattern) and, for Gemma 3, the local rope base of those layers;
* soft-capping of attention logits and of the final logits (Gemma 2);
* the MLP activation (``hidden_act``/``hidden_activation``), one row of :data:`ACTIVATIONS`.

:func:`features` turns a config into the list of features the graph uses and the list it
cannot express; the builder refuses the latter with the reason, naming the config key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgellm.converters.onnx_rope import ROPE_TYPES, rope_type
from edgellm.spec import ModelSpec

__all__ = ["ACTIVATIONS", "BUILDER_ARCHS", "BuilderArch", "LayerPlan", "expected_shape", "layer_plans",
           "refusals"]

Config = Mapping[str, Any]

#: config activation name -> the activation the graph writes (``onnx_decoder.ACTIVATION_OPS``):
#: "silu" is x * Sigmoid(x), which ONNX Runtime fuses; "gelu_tanh" is com.microsoft.FastGelu,
#: the tanh approximation transformers calls gelu_pytorch_tanh; "gelu" the exact erf form.
ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


def _every_layer(cfg: Config, i: int) -> bool:
    return bool(cfg.get("sliding_window")) and bool(cfg.get("use_sliding_window", True))


def _alternate(cfg: Config, i: int) -> bool:
    return (i + 1) % 2 == 1  # transformers Gemma2Config: even layers slide


def _gemma3_pattern(cfg: Config, i: int) -> bool:
    return bool((i + 1) % int(cfg.get("sliding_window_pattern") or 6))


def _never(cfg: Config, i: int) -> bool:
    return False


@dataclass(frozen=True)
class BuilderArch:
    """How one architecture's checkpoint maps onto the builder's decoder graph."""

    fused_qkv: bool = False  # the checkpoint stores qkv_proj (else q/k/v_proj, fused here)
    fused_gate_up: bool = False  # the checkpoint stores gate_up_proj (gate rows first)
    qk_norm: bool = False
    norm_offset: float = 0.0  # Gemma RMSNorm: x * (1 + w)
    scaled_embedding: bool = False  # Gemma: embeddings * sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma 2/3: post-attention and post-MLP norms too
    sliding_default: Callable[[Config, int], bool] = _never
    local_rope_key: str | None = None  # config key of the sliding layers' rope base
    activation_key: str = "hidden_act"


BUILDER_ARCHS: dict[str, BuilderArch] = {
    "llama": BuilderArch(),
    "mistral": BuilderArch(sliding_default=_every_layer),
    "qwen2": BuilderArch(sliding_default=_every_layer),
    "qwen3": BuilderArch(qk_norm=True, sliding_default=_every_layer),
    "phi3": BuilderArch(fused_qkv=True, fused_gate_up=True, sliding_default=_every_layer),
    "gemma2": BuilderArch(norm_offset=1.0, scaled_embedding=True, sandwich_norms=True,
                          sliding_default=_alternate, activation_key="hidden_activation"),
    "gemma3": BuilderArch(qk_norm=True, norm_offset=1.0, scaled_embedding=True, sandwich_norms=True,
                          sliding_default=_gemma3_pattern, local_rope_key="rope_local_base_freq",
                          activation_key="hidden_activation"),
}


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer's attention does: its window and its rope base."""

    window: int  # GroupQueryAttention local_window_size (= sliding_window); -1 = full attention
    rope: str  # "global" or "local": which cos/sin tables the layer reads


def _is_sliding(cfg: Config, arch: BuilderArch, i: int) -> bool:
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) > i:
        return types[i] == "sliding_attention"
    return arch.sliding_default(cfg, i)


def layer_plans(cfg: Config, spec: ModelSpec, arch: BuilderArch) -> list[LayerPlan]:
    """Per layer: window and rope tables.

    ``local_window_size`` is the config's ``sliding_window`` itself: measured against
    transformers 4.57's eager attention (window 8, 40 tokens, prefill and token by token;
    tests/test_onnx_builder.py), ``sliding_window - 1`` is off by one key.
    """
    window = int(cfg.get("sliding_window") or 0)
    plans = []
    for i in range(spec.n_layers):
        sliding = window > 0 and _is_sliding(cfg, arch, i)
        local = sliding and arch.local_rope_key is not None and cfg.get(arch.local_rope_key) is not None
        plans.append(LayerPlan(window if sliding else -1, "local" if local else "global"))
    return plans


def attention_scale(cfg: Config, spec: ModelSpec) -> float:
    """Scale of Q·Kᵀ: ``query_pre_attn_scalar ** -0.5`` (Gemma) or ``head_dim ** -0.5``."""
    scalar = cfg.get("query_pre_attn_scalar")
    return float(scalar) ** -0.5 if scalar else 1.0 / math.sqrt(spec.head_dim)


def activation(cfg: Config, arch: BuilderArch) -> str:
    """The config's MLP activation name (``hidden_act`` or Gemma's ``hidden_activation``)."""
    return str(cfg.get(arch.activation_key) or cfg.get("hidden_act") or "silu")


def refusals(cfg: Config, spec: ModelSpec) -> list[str]:
    """Features of this config the builder's graph cannot express: each says key, value, fix."""
    out = []
    if spec.architecture not in BUILDER_ARCHS:
        out.append(f"architecture {spec.architecture!r} has no builder row; use --exporter optimum")
        return out
    arch = BUILDER_ARCHS[spec.architecture]
    kind = rope_type(cfg.get("rope_scaling"))
    if kind not in ROPE_TYPES:
        out.append(f"rope_scaling type {kind!r} is not one the builder computes "
                   f"({', '.join(ROPE_TYPES)}); use --exporter optimum")
    if kind == "longrope" and spec.architecture != "phi3":
        out.append(f"longrope is only built for phi3, not {spec.architecture}; use --exporter optimum")
    act = activation(cfg, arch)
    if act not in ACTIVATIONS:
        out.append(f"activation {act!r} is not one the builder writes ({', '.join(ACTIVATIONS)}); "
                   "use --exporter optimum")
    partial = float(cfg.get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
        out.append(f"partial_rotary_factor {partial} (GroupQueryAttention rotates whole heads here); "
                   "use --exporter optimum")
    if spec.head_dim % 2:
        out.append(f"head_dim {spec.head_dim} is odd; rotary embeddings need an even head size")
    return out


def _shapes(s: ModelSpec) -> dict[str, tuple[int, ...]]:
    q, kv, h, i = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.hidden_size, s.intermediate_size
    return {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.qkv_proj.weight": (q + 2 * kv, h),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.q_norm.weight": (s.head_dim,),
        "self_attn.k_norm.weight": (s.head_dim,), "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.gate_up_proj.weight": (2 * i, h), "mlp.down_proj.weight": (h, i), "layernorm.weight": (h,),
        "embed_tokens.weight": (s.vocab_size, h), "lm_head.weight": (s.vocab_size, h), "norm.weight": (h,),
    }


def expected_shape(spec: ModelSpec, name: str) -> tuple[int, ...] | None:
    """The shape config.json implies for checkpoint tensor ``name`` (None: not one the builder reads)."""
    shapes = _shapes(spec)
    return next((shape for suffix, shape in shapes.items() if name.endswith(suffix)), None)
