"""The fixtures themselves: tiny models per architecture, the tokenizer, SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgellm.converters.from_gguf import PRE_TOKENIZERS
from tests.fixtures import require, smollm2, tiny_models

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing spaces   ",
    "multiple   internal    spaces\t\ttabs",
    "line one\nline two\r\nline three\n\n\n",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Numbers 12345 and 3.14159 and 1,000,000 and -42",
    "2024-06-30T12:34:56Z 0x1F 0b1010",
    "def f(x):\n    return x ** 2  # comment",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "Café naïve résumé façade Ångström",
    "日本語のテキストとカタカナ",
    "你好，世界！这是一个测试。",
    "Россия и Україна",
    "Emoji: 😀👍🏽🇫🇷 👩‍💻 ❤️",
    "Words the corpus never saw: xylophone zygote quokka",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
    "x" * 60,
    "",
]


# --- tiny tokenizer ----------------------------------------------------------------------


def test_tokenizer_vocab_and_special_tokens(tiny_tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    assert 512 <= tok.get_vocab_size() <= 1000
    assert [tok.token_to_id(t) for t in tiny_models.SPECIAL_TOKENS] == [0, 1, 2]
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["add_bos_token"] is False
    assert "<|im_start|>" in config["chat_template"]


def test_tokenizer_training_is_deterministic() -> None:
    assert tiny_models.train_tokenizer().to_str() == tiny_models.train_tokenizer().to_str()


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_round_trips_identically(tiny_tokenizer_dir: Path, text: str) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = fast.encode(text, add_special_tokens=False).ids
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf(text).input_ids == ids  # no BOS/EOS added by default
    assert fast.decode(ids, skip_special_tokens=False) == text
    assert hf.decode(ids) == text


def test_tokenizer_chat_template(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                  add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 2, 0)


# --- tiny models -------------------------------------------------------------------------


def test_architecture_table_is_complete() -> None:
    assert set(tiny_models.ARCHITECTURES) == {
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"}
    with pytest.raises(ValueError, match="known: llama"):
        tiny_models.tiny_config("gpt2", vocab_size=10)


def test_tiny_model_builds_and_loads(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tiny_model_dir / name).is_file(), name
    config = AutoConfig.from_pretrained(tiny_model_dir)
    row = _row_for(config.model_type)
    assert config.architectures == [row["model_class"]]
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.intermediate_size == 128 and config.max_position_embeddings == 512
    assert getattr(config, "head_dim", 16) == 16
    assert config.vocab_size == _vocab_size(tiny_model_dir)
    assert config.tie_word_embeddings == row["config"]["tie_word_embeddings"]
    assert config.pad_token_id is not None and 0 <= config.pad_token_id < config.vocab_size
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == row["model_class"]


def test_tiny_model_logits_have_spread(tiny_model_dir: Path) -> None:
    ids = _encode(tiny_model_dir, "The capital of France is Paris. def f(x): return 42")
    logits = tiny_models.reference_logits(tiny_model_dir, ids)
    assert logits.shape == (len(ids), _vocab_size(tiny_model_dir))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert 1.0 < float(logits.std(axis=-1).mean()) < 6.0
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert float(np.mean(top2[:, 1] - top2[:, 0])) > 0.2  # argmax is not a coin toss
    # The layers matter: the argmax is not just an echo of the input token.
    assert np.mean(np.argmax(logits, axis=-1) == np.array(ids)) < 0.2


def test_reference_greedy_follows_reference_logits(tiny_model_dir: Path) -> None:
    prompt = _encode(tiny_model_dir, "Once upon a time")
    tokens = tiny_models.reference_greedy(tiny_model_dir, prompt, 4)
    assert len(tokens) == 4
    for i, token in enumerate(tokens):
        logits = tiny_models.reference_logits(tiny_model_dir, prompt + tokens[:i])
        assert token == int(np.argmax(logits[-1]))


def test_tiny_model_is_seeded(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    a = load_file(tiny_models.build_tiny_model("qwen2", tmp_path / "a") / "model.safetensors")
    b = load_file(tiny_models.build_tiny_model("qwen2", tmp_path / "b") / "model.safetensors")
    c = load_file(tiny_models.build_tiny_model("qwen2", tmp_path / "c", seed=1)
                  / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert "model.layers.0.self_attn.q_proj.bias" in a  # Qwen2's q/k/v biases are exercised
    assert np.abs(a["model.layers.0.self_attn.q_proj.bias"]).max() > 0


def test_sharded_variant_matches_single_file(tiny_model) -> None:
    single, sharded = tiny_model("llama"), tiny_model("llama", sharded=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).is_file() for s in shards)
    assert not (sharded / "model.safetensors").exists()
    ids = _encode(single, "sharded weights")
    np.testing.assert_array_equal(tiny_models.reference_logits(single, ids),
                                  tiny_models.reference_logits(sharded, ids))


def test_bf16_variant(tiny_model) -> None:
    from safetensors import safe_open

    f32, bf16 = tiny_model("gemma3"), tiny_model("gemma3", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(bf16 / "model.safetensors"), framework="pt") as f:
        dtypes = {str(f.get_tensor(name).dtype) for name in f.keys()}  # noqa: SIM118
    assert dtypes == {"torch.bfloat16"}
    ids = _encode(f32, "bfloat16 weights")
    a, b = tiny_models.reference_logits(f32, ids), tiny_models.reference_logits(bf16, ids)
    assert b.dtype == np.float32
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99 and not np.array_equal(a, b)


def test_gemma_attention_layouts_match_llama_cpp(tiny_model) -> None:
    from transformers import AutoConfig

    # llama.cpp: gemma2 alternates sliding/full from layer 0; gemma3 has 5 sliding + 1 global,
    # and scales attention by 1/sqrt(head_dim) whatever query_pre_attn_scalar says.
    gemma2 = AutoConfig.from_pretrained(tiny_model("gemma2"))
    gemma3 = AutoConfig.from_pretrained(tiny_model("gemma3"))
    assert gemma2.layer_types == ["sliding_attention", "full_attention"]
    assert gemma3.layer_types == ["sliding_attention", "sliding_attention"]
    for config in (gemma2, gemma3):
        assert config.query_pre_attn_scalar == config.head_dim
        assert config.sliding_window >= config.max_position_embeddings
    assert gemma3.rope_local_base_freq == 10000.0


# --- SmolLM2 -----------------------------------------------------------------------------


def test_smollm2_gguf_ships_in_package(smollm2_gguf: Path) -> None:
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"
    assert smollm2_gguf.stat().st_size > 50_000_000


def test_smollm2_hf_checkpoint_config(smollm2_hf: Path) -> None:
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert json.loads((smollm2_hf / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not (smollm2_hf / "tokenizer.model").exists()  # transformers' stray GGUF copy
    assert smollm2.smollm2_hf_dir() == smollm2_hf  # cached


def test_smollm2_tokenizer_matches_the_real_one(smollm2_hf: Path) -> None:
    tokenizer_json = json.loads((smollm2_hf / "tokenizer.json").read_text())
    assert tokenizer_json["pre_tokenizer"] == PRE_TOKENIZERS["smollm"]
    config = json.loads((smollm2_hf / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["chat_template"].startswith("{% for message in messages %}")


def test_smollm2_tokenizer_agrees_with_llama_cpp(smollm2_gguf: Path, smollm2_hf: Path) -> None:
    from tokenizers import Tokenizer

    require("llama_cpp")
    import llama_cpp

    vocab = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    tok = Tokenizer.from_file(str(smollm2_hf / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == vocab.tokenize(text.encode(), add_bos=False, special=True), text
        assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2_hf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False,
                             attention_mask=torch.ones_like(ids))
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# --- helpers -----------------------------------------------------------------------------


def _row_for(model_type: str) -> dict:
    return next(r for r in tiny_models.ARCHITECTURES.values() if r["model_type"] == model_type)


def _vocab_size(model_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()


def _encode(model_dir: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids
