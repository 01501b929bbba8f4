"""SentencePiece checkpoints (Llama 2, TinyLlama, Mistral, Gemma style) -> GGUF "llama" vocab.

A tiny SentencePiece BPE model (byte fallback, digit splitting, dummy prefix) is trained in
memory; llama.cpp must tokenize exactly like the sentencepiece library on the shared
corpus, and the model must still match PyTorch.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

import edgellm
from edgellm.gguf_meta import read_gguf_metadata
from edgellm.runtimes.base import RuntimeOptions, open_runtime
from tests.fixtures import tiny_models
from tests.test_tokenization_parity import corpus

VOCAB = 1000


@pytest.fixture(scope="module")
def spm_checkpoint(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("spm") / "tiny-llama-spm"
    shutil.copytree(tiny_model("llama"), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
        (folder / name).unlink(missing_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_models.training_corpus()), model_writer=buf, vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.995,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_sentencepiece_vocab_tokenizes_like_sentencepiece(spm_checkpoint: Path, tmp_path: Path) -> None:
    import sentencepiece as spm

    artifact = edgellm.convert(spm_checkpoint, tmp_path / "out", quant="F16",
                               prompts=["Hello world", "The number 12345 is big"])
    assert artifact.manifest["parity"]["top1_agreement"] >= 0.98
    meta = read_gguf_metadata(artifact.model_file)
    assert meta["tokenizer.ggml.model"] == "llama"
    assert len(meta["tokenizer.ggml.scores"]) == VOCAB
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2

    sp = spm.SentencePieceProcessor(model_file=str(spm_checkpoint / "tokenizer.model"))
    runtime = open_runtime(artifact.model_file, "gguf", RuntimeOptions(n_ctx=64))
    try:
        texts = [t for t in corpus() if "<|" not in t]  # chat markers are not in this vocab
        assert len(texts) >= 190
        mismatches = [t for t in texts
                      if runtime.tokenizer.encode(t, add_special=False, parse_special=False) != sp.encode(t)]
        assert mismatches == []
        assert runtime.tokenizer.encode("hi", add_special=True)[0] == 1  # BOS, as add_bos_token says
    finally:
        runtime.close()
