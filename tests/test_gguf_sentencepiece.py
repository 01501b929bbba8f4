"""SentencePiece checkpoints (Llama 2, TinyLlama, Mistral, Gemma style) -> GGUF "llama" vocab,
and such GGUF files -> OpenVINO / ONNX (the tokenizer rebuilt from the GGUF, checked against
llama.cpp: edgellm.converters.gguf_spm).

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
from edgellm.converters.from_gguf import PROBE_TEXTS
from edgellm.gguf_meta import read_gguf_metadata
from edgellm.runtimes.base import RuntimeOptions, open_runtime
from tests.fixtures import tiny_models
from tests.test_tokenization_parity import corpus

VOCAB = 1000


def _spm_checkpoint(tiny_model, folder: Path, arch: str, dummy_prefix: bool) -> Path:
    """A tiny ``arch`` checkpoint with a SentencePiece BPE tokenizer trained on the corpus."""
    import sentencepiece as spm
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(tiny_model(arch), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
        (folder / name).unlink(missing_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_models.training_corpus()), model_writer=buf, vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.995,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=dummy_prefix,
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


@pytest.fixture(scope="module")
def spm_checkpoint(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 2 / Mistral style: a dummy prefix (llama.cpp's add_space_prefix)."""
    return _spm_checkpoint(tiny_model, tmp_path_factory.mktemp("spm") / "tiny-llama-spm", "llama", True)


#: GGUF vocabularies of both SentencePiece styles: Llama 2 / Mistral (a space prefix) and
#: Gemma 2 / 3 (none; edgellm's GGUF writer sets add_space_prefix=false for gemma architectures).
SPM_STYLES = {"llama": ("llama", True), "gemma2": ("gemma2", False), "gemma3": ("gemma3", False)}


@pytest.fixture(scope="module", params=sorted(SPM_STYLES))
def spm_gguf(request: pytest.FixtureRequest, tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, prefix = SPM_STYLES[request.param]
    root = tmp_path_factory.mktemp(f"spm-{request.param}")
    folder = _spm_checkpoint(tiny_model, root / f"tiny-{arch}-spm", arch, prefix)
    art = edgellm.convert(folder, root / "gguf", quant="F16", verify=False)
    assert read_gguf_metadata(art.model_file).get("tokenizer.ggml.add_space_prefix", True) is prefix
    return art.model_file


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


def test_rebuilt_tokenizer_splits_like_llama_cpp(spm_gguf: Path) -> None:
    """The tokenizer.json rebuilt from the GGUF alone gives llama.cpp's ids on ~220 strings."""
    from tokenizers import Tokenizer

    from edgellm.converters.gguf_spm import spm_tokenizer_json
    from edgellm.runtimes.llamacpp import open_vocab

    ours = Tokenizer.from_str(json.dumps(spm_tokenizer_json(read_gguf_metadata(spm_gguf))))
    theirs = open_vocab(spm_gguf)
    texts = [*PROBE_TEXTS, *corpus(), "<s>hello</s> <s> world", "x</s>\n<s>y"]
    pairs = [(t, ours.encode(t, add_special_tokens=False).ids, theirs.encode(t, add_special=False))
             for t in texts]
    mismatches = [(t, a, b) for t, a, b in pairs if a != b]
    assert mismatches == []
    assert ours.decode(theirs.encode("Hello, world!", add_special=False)) == "Hello, world!"


@pytest.mark.slow  # four conversions with parity: about a minute
@pytest.mark.parametrize("fmt,quant", [("openvino", "fp16"), ("onnx", "fp32")])
def test_sentencepiece_gguf_converts_with_parity(spm_gguf: Path, tmp_path: Path, fmt: str,
                                                 quant: str) -> None:
    art = edgellm.convert(spm_gguf, tmp_path / fmt, format=fmt, quant=quant,
                          prompts=["Hello, world!", "The number 12345 is big"])
    check = art.manifest["source"]["dequantized"]["tokenizer_check"]
    assert check == {"status": "match", "reference": "llama.cpp", "strings": len(PROBE_TEXTS)}
    assert art.manifest["parity"]["top1_agreement"] >= 0.98
