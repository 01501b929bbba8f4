"""ModelSpec: one typed description of a decoder-only transformer.

A spec is read from a Hugging Face ``config.json``, from GGUF metadata, or from the
``spec`` block of an edgellm manifest. Every later layer (converters, planner, KV cache
arithmetic, runtimes) reads the model's shape from here and nowhere else.

Supported architectures are rows of :data:`ARCHITECTURES`; adding one is adding a row
(and its tensor rules in the converters), never a new branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgellm._jsonfile import read_json_object
from edgellm.errors import InvalidModelError, ModelNotFoundError, UnsupportedArchitectureError

__all__ = ["Architecture", "ARCHITECTURES", "ModelSpec", "architecture_for", "read_hf_config"]


@dataclass(frozen=True)
class Architecture:
    """A supported model family: how HF and GGUF name it."""

    name: str
    hf_model_types: tuple[str, ...]
    hf_architectures: tuple[str, ...]
    gguf_arch: str
    examples: str


ARCHITECTURES: dict[str, Architecture] = {
    row.name: row
    for row in (
        Architecture("llama", ("llama",), ("LlamaForCausalLM",), "llama",
                     "Llama 2/3, SmolLM/SmolLM2, TinyLlama"),
        Architecture("mistral", ("mistral",), ("MistralForCausalLM",), "llama", "Mistral 7B"),
        Architecture("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), "qwen2", "Qwen2, Qwen2.5"),
        Architecture("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), "qwen3", "Qwen3 dense"),
        Architecture("phi3", ("phi3",), ("Phi3ForCausalLM",), "phi3", "Phi-3, Phi-3.5 mini"),
        Architecture("gemma2", ("gemma2",), ("Gemma2ForCausalLM",), "gemma2", "Gemma 2"),
        Architecture("gemma3", ("gemma3_text", "gemma3"),
                     ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), "gemma3",
                     "Gemma 3 (text)"),
    )
}


def _supported_list() -> str:
    return ", ".join(f"{a.name} ({a.examples})" for a in ARCHITECTURES.values())


def architecture_for(model_type: str | None, hf_architectures: list[str] | None = None) -> Architecture:
    """Find the supported architecture for an HF ``model_type`` / ``architectures`` pair."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.hf_model_types:
            return arch
    for arch in ARCHITECTURES.values():
        if any(a in arch.hf_architectures for a in hf_architectures or ()):
            return arch
    shown = model_type or (hf_architectures or ["<none>"])[0]
    raise UnsupportedArchitectureError(
        f"architecture {shown!r} is not supported; supported: {_supported_list()}"
    )


def _flatten_text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text model's view of a config: multimodal ``text_config`` keys override the top."""
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, text part flattened; clear errors if missing."""
    config_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise ModelNotFoundError(f"model folder {str(path)!r} does not exist")
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{config_path}: no config.json; a Hugging Face checkpoint folder needs one"
        )
    return _flatten_text_config(read_json_object(config_path, "fix or re-download it"))


def _gguf_to_arch(gguf_arch: str) -> Architecture:
    for arch in ARCHITECTURES.values():
        if arch.gguf_arch == gguf_arch:
            return arch  # 'llama' comes first, so Mistral GGUFs read as llama (same graph)
    raise UnsupportedArchitectureError(
        f"GGUF architecture {gguf_arch!r} is not supported; supported: {_supported_list()}"
    )


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, independent of its file format."""

    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    tied_embeddings: bool = False
    norm_eps: float = 1e-5
    sliding_window: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    rope_local_theta: float | None = None

    # ----------------------------------------------------------------- readers
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build from a manifest's ``spec`` block; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "config.json") -> ModelSpec:
        """Read a Hugging Face ``config.json`` dict (text part of multimodal configs too)."""
        cfg = _flatten_text_config(config)
        arch = architecture_for(cfg.get("model_type"), cfg.get("architectures"))
        try:
            n_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            head_dim = int(cfg.get("head_dim") or hidden // n_heads)
            window = cfg.get("sliding_window")
            return cls(
                architecture=arch.name,
                n_layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=head_dim,
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                max_positions=int(cfg.get("max_position_embeddings") or 2048),
                rope_theta=float(cfg.get("rope_theta") or 10000.0),
                rope_scaling=cfg.get("rope_scaling") or None,
                tied_embeddings=bool(cfg.get("tie_word_embeddings", arch.name.startswith("gemma"))),
                norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
                sliding_window=int(window) if window and cfg.get("use_sliding_window", True) else None,
                attn_logit_softcap=cfg.get("attn_logit_softcapping"),
                final_logit_softcap=cfg.get("final_logit_softcapping"),
                rope_local_theta=cfg.get("rope_local_base_freq"),
            )
        except KeyError as exc:
            raise InvalidModelError(
                f"{source}: missing field {exc.args[0]!r} needed for a {arch.name} model; "
                "the file is incomplete or not a transformers config"
            ) from None
        except (TypeError, ValueError) as exc:
            raise InvalidModelError(f"{source}: bad value in config ({exc}); fix the file") from None

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelSpec:
        """Read ``config.json`` from a checkpoint folder."""
        return cls.from_hf_config(read_hf_config(path), source=str(Path(path) / "config.json"))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "GGUF",
                           tied_embeddings: bool = False) -> ModelSpec:
        """Read the ``general.architecture``-prefixed keys of a GGUF file's metadata.

        Tying is not a metadata key: a GGUF is tied when it has no ``output.weight`` tensor,
        which the caller (:func:`edgellm.gguf_meta.read_gguf_spec`) knows.
        """
        gguf_arch = str(meta.get("general.architecture", ""))
        arch = _gguf_to_arch(gguf_arch)

        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{gguf_arch}.{name}", default)

        try:
            n_heads = int(key("attention.head_count"))
            hidden = int(key("embedding_length"))
            vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
            head_dim = int(key("attention.key_length") or hidden // n_heads)
            return cls(
                architecture=arch.name,
                n_layers=int(key("block_count")),
                hidden_size=hidden,
                n_heads=n_heads,
                n_kv_heads=int(key("attention.head_count_kv") or n_heads),
                head_dim=head_dim,
                intermediate_size=int(key("feed_forward_length")),
                vocab_size=int(vocab),
                max_positions=int(key("context_length", 2048)),
                rope_theta=float(key("rope.freq_base", 10000.0)),
                tied_embeddings=tied_embeddings,
                norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
                sliding_window=key("attention.sliding_window"),
                attn_logit_softcap=key("attn_logit_softcapping"),
                final_logit_softcap=key("final_logit_softcapping"),
                rope_local_theta=key("rope.freq_base_swa"),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidModelError(
                f"{source}: GGUF metadata for {gguf_arch!r} is incomplete ({exc}); "
                "re-convert the model"
            ) from None

    # ------------------------------------------------------------- arithmetic
    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> int:
        """KV cache bytes per token: 2 (K and V) x layers x KV heads x head dim x bytes."""
        return int(2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element)

    def n_params(self) -> int:
        """Parameter count of the dense decoder (embeddings counted once when tied)."""
        q = self.hidden_size * self.n_heads * self.head_dim
        kv = 2 * self.hidden_size * self.n_kv_heads * self.head_dim
        o = self.n_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = q + kv + o + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.n_layers * per_layer + embed + self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's ``spec`` block)."""
        data = asdict(self)
        data["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return data
