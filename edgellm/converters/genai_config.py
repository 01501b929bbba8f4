"""``genai_config.json``: what onnxruntime-genai needs to run a builder graph folder.

The keys follow onnxruntime-genai's model builder (``builders/base.py::make_genai_config``)
and its C++ reader (``src/config.cpp``): the decoder's file, shape, input and output names
(``%d`` stands for the layer), token ids from config.json / generation_config.json, and
``search.past_present_share_buffer`` true because past and present are one buffer.
``logits_to_keep`` is not listed: it is an overridable initializer whose default (0) gives
every position, which is what onnxruntime-genai expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgellm.spec import ModelSpec

__all__ = ["GENAI_CONFIG", "genai_config", "write_genai_config"]

GENAI_CONFIG = "genai_config.json"

#: edgellm architecture -> onnxruntime-genai ``model.type``.
GENAI_TYPES: dict[str, str] = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
    "gemma2": "gemma2", "gemma3": "gemma3_text",
}


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def genai_config(spec: ModelSpec, cfg: Mapping[str, Any], gen: Mapping[str, Any], contract: Mapping[str, Any],
                 model_file: str, context_length: int) -> dict[str, Any]:
    """The config dict for a builder graph whose contract is ``contract``."""
    kv = contract["kv"]
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    return {
        "model": {
            "bos_token_id": bos if bos is not None else 1,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": contract["inputs"]["input_ids"],
                           "attention_mask": contract["inputs"]["attention_mask"],
                           "past_key_names": kv["past_key"], "past_value_names": kv["past_value"]},
                "outputs": {"logits": contract["outputs"]["logits"],
                            "present_key_names": kv["present_key"],
                            "present_value_names": kv["present_value"]},
                "num_attention_heads": spec.n_heads,
                "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": spec.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else _first(eos),
            "type": GENAI_TYPES[spec.architecture],
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": bool(kv["past_present_share_buffer"]),
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, hf_dir: Path, spec: ModelSpec, cfg: Mapping[str, Any],
                       contract: Mapping[str, Any], model_file: str) -> str:
    """Write ``genai_config.json`` into ``folder``; returns its name."""
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    data = genai_config(spec, cfg, gen, contract, model_file, int(spec.max_positions))
    (folder / GENAI_CONFIG).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return GENAI_CONFIG
