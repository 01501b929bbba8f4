"""A GGUF source read without torch: weights, config and tokenizer against their references.

* weights: every tensor :class:`GGUFTensors` dequantizes equals what transformers' own GGUF
  loader gives (Q8_0 files, so gguf-py's dequantizer and the undone Q/K permutation and Gemma
  norm shift are all exercised), for each architecture;
* config: transformers on the dequantized folder computes the same logits as on the tiny model
  the GGUF was written from (F32 files: any config.json key read wrongly shows here);
* tokenizer: rebuilt from the metadata, it splits PROBE_TEXTS exactly as llama.cpp does;
* a file laid out by llama.cpp's own converter (``tests/fixtures/tiny_gguf.py``: ``default``
  pre-tokenizer, no vocab_size key) runs in transformers as it runs in llama.cpp;
* bad inputs are one-line errors that leave nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

import edgellm
from edgellm import errors
from edgellm.converters.from_gguf import dequantize_gguf
from edgellm.converters.gguf_tensors import GGUFTensors
from edgellm.converters.safetensors import open_checkpoint
from tests.fixtures import require, tiny_gguf, tiny_models

IDS = list(range(3, 43))


@pytest.fixture(scope="module")
def tiny_gguf_of(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, quant: str) -> Path:
        if (arch, quant) not in built:
            out = tmp_path_factory.mktemp(f"src-{arch}") / quant
            built[arch, quant] = edgellm.convert(tiny_model(arch), out, format="gguf", quant=quant,
                                                 verify=False).model_file
        return built[arch, quant]

    return get


def _transformers_gguf_state(gguf: Path, head_dim: int) -> dict[str, np.ndarray]:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config.head_dim = head_dim  # transformers 4.57 derives it as hidden / heads
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, config=config, dtype=torch.float32, local_files_only=True)
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_weights_equal_transformers_gguf_loader(arch: str, tiny_gguf_of) -> None:
    require("accelerate")
    gguf = tiny_gguf_of(arch, "Q8_0")
    ours = GGUFTensors(gguf)
    theirs = _transformers_gguf_state(gguf, ours.spec.head_dim)
    tied = {"lm_head.weight"} if ours.spec.tied_embeddings else set()
    assert set(theirs) == set(ours.names()) | tied
    for name in ours.names():
        np.testing.assert_array_equal(ours.read(name), theirs[name], err_msg=name)


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_dequantized_folder_computes_what_the_source_did(arch: str, tiny_gguf_of, tiny_model,
                                                         tmp_path: Path) -> None:
    require("llama_cpp")
    info = dequantize_gguf(tiny_gguf_of(arch, "F32"), tmp_path / "hf")
    assert info["tokenizer_check"] == {"status": "match", "reference": "llama.cpp", "strings": 25}
    want = tiny_models.reference_logits(tiny_model(arch), IDS)
    got = tiny_models.reference_logits(tmp_path / "hf", IDS)
    assert float(np.std(want)) > 0.1
    np.testing.assert_array_equal(got, want)


def test_phi3_longrope_factors_come_back_into_the_config(tmp_path: Path) -> None:
    """Phi-3 longrope: llama.cpp keeps the factors as tensors; they must return as rope_scaling
    (with original_max_position_embeddings), or logits past the original context differ."""
    head_pairs = 8  # head_dim 16 / 2
    rope = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(head_pairs)],
            "long_factor": [2.0 + 0.5 * i for i in range(head_pairs)]}
    hf = tiny_models.build_tiny_model("phi3", tmp_path / "hf", config_overrides={
        "rope_scaling": rope, "original_max_position_embeddings": 128})
    gguf = edgellm.convert(hf, tmp_path / "g", format="gguf", quant="F32", verify=False).model_file
    dequantize_gguf(gguf, tmp_path / "back")
    ids = list(range(3, 203))  # past original_max_position_embeddings: the long factors apply
    np.testing.assert_array_equal(tiny_models.reference_logits(tmp_path / "back", ids),
                                  tiny_models.reference_logits(hf, ids))


@pytest.mark.parametrize("low_high", [(1.0, 4.0), (2.0, 16.0)])
def test_llama3_rope_freqs_come_back_as_rope_scaling(low_high: tuple[float, float], tmp_path: Path) -> None:
    """llama.cpp stores Llama 3.1 smoothing as divisors only: Meta's band (1, 4) is tried first,
    another band is fitted from the smoothed divisors (theta 1e4: two of them in the band)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low_high[0],
            "high_freq_factor": low_high[1], "original_max_position_embeddings": 512}
    hf = tiny_models.build_tiny_model("llama", tmp_path / "hf", config_overrides={
        "rope_scaling": rope, "rope_theta": 10000.0, "max_position_embeddings": 4096})
    gguf = edgellm.convert(hf, tmp_path / "g", format="gguf", quant="F32", verify=False).model_file
    dequantize_gguf(gguf, tmp_path / "back")
    back = json.loads((tmp_path / "back" / "config.json").read_text())["rope_scaling"]
    assert back["rope_type"] == "llama3" and back["factor"] == 8.0
    ids = list(range(3, 203))
    np.testing.assert_allclose(tiny_models.reference_logits(tmp_path / "back", ids),
                               tiny_models.reference_logits(hf, ids), atol=1e-5)
    parity = edgellm.convert(gguf, tmp_path / "onnx", format="onnx", exporter="builder",
                             verify_with=hf).manifest["parity"]  # the builder's llama3 tables too
    assert parity["max_abs_logit_diff"] <= 1e-3 and parity["top1_agreement"] == 1.0, parity


def test_verify_against_a_gguf_runs_llamacpp(tiny_gguf_of, tmp_path: Path) -> None:
    require("llama_cpp", "onnx")
    gguf = tiny_gguf_of("qwen3", "F32")
    art = edgellm.convert(gguf, tmp_path / "o", format="onnx", exporter="builder", verify=False)
    report = edgellm.verify(art.path, gguf, prompts=["The capital of France is"])
    assert (report.reference_by, report.reference, report.n_prompts) == ("llama.cpp", str(gguf), 1)
    # an F32 GGUF: llama.cpp's mixed precision only (tests/test_gguf_architectures.py's F32 bound)
    assert report.top1_agreement == 1.0 and report.max_abs_logit_diff < 0.1
    assert edgellm.inspect(art.path)["parity"]["reference_by"] == "llama.cpp"  # recorded


def test_llamacpp_laid_out_file_runs_alike_in_transformers(tmp_path: Path) -> None:
    from edgellm.runtimes.base import RuntimeOptions, open_runtime

    require("llama_cpp")
    gguf = tiny_gguf.build_tiny_gguf(tmp_path / "t.gguf", seed=3)
    info = dequantize_gguf(gguf, tmp_path / "hf")
    assert info["tokenizer"]["pre"] == "default" and info["tokenizer_check"]["status"] == "match"
    ids = IDS[:24]
    runtime = open_runtime(gguf, "gguf", RuntimeOptions(n_ctx=64, threads=1, kv_precision="f32"))
    try:
        cpp = runtime.forward(ids, all_logits=True)
    finally:
        runtime.close()
    ref = tiny_models.reference_logits(tmp_path / "hf", ids)
    # Q/K rows left permuted would rotate the wrong pairs: the logits would differ by ~1e-1
    assert float(np.abs(cpp - ref).max()) < 1e-3, float(np.abs(cpp - ref).max())
    assert open_checkpoint(tmp_path / "hf").names()  # a checkpoint the HF reader opens


def _q8_1_tensor(rows: int, cols: int) -> tuple[np.ndarray, GGMLQuantizationType]:
    """Zeroed Q8_1 blocks, a type gguf-py cannot dequantize."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1]
    return np.zeros((rows, cols // block * size), np.uint8), GGMLQuantizationType.Q8_1


F32, STRING, U32 = GGMLQuantizationType.F32, GGUFValueType.STRING, GGUFValueType.UINT32
#: a well-formed header of an architecture llama.cpp knows and edgellm does not
FALCON = {"general.architecture": ("falcon", STRING), "falcon.block_count": (tiny_gguf.LAYERS, U32),
          "falcon.embedding_length": (tiny_gguf.HIDDEN, U32),
          "falcon.attention.head_count": (tiny_gguf.HEADS, U32),
          "falcon.feed_forward_length": (tiny_gguf.FF, U32), "falcon.context_length": (256, U32)}


@pytest.mark.parametrize(("edit", "error", "message"), [
    ({"raw_tensors": {"blk.1.ffn_down.weight": _q8_1_tensor(64, 128)}},
     errors.UnknownQuantizationError, r"t.gguf: tensor 'blk.1.ffn_down.weight' is stored as Q8_1, which "
                                      r"gguf-py cannot dequantize.*re-quantize"),
    ({"kv": FALCON},
     errors.UnsupportedArchitectureError, r"GGUF architecture 'falcon' is not supported; supported: llama"),
    ({"raw_tensors": {"rope_freqs.weight": (np.array([1, 3, 2, 8, 1, 5, 8, 8], np.float32), F32)}},
     errors.ConversionError, r"t.gguf: the GGUF's rope_freqs tensor holds frequency divisors that no Llama "
                             r"3.1 rope_scaling reproduces.*original Hugging"),
    ({"raw_tensors": {"blk.0.ffn_gate_exps.weight": (np.ones((2, 64), np.float32), F32)}},
     errors.ConversionError, r"tensor 'blk.0.ffn_gate_exps.weight' has no Hugging Face name in a llama"),
    ({"kv": {"tokenizer.ggml.model": ("bert", STRING)}},
     errors.ConversionError, r"GGUF tokenizer model 'bert' cannot be rebuilt \(known: gpt2, llama\)"),
])
def test_bad_gguf_is_one_line_and_leaves_nothing(edit, error, message, tmp_path: Path) -> None:
    require("onnx")
    gguf = tiny_gguf.build_tiny_gguf(tmp_path / "t.gguf", **edit)
    with pytest.raises(error, match=message) as exc:
        edgellm.convert(gguf, tmp_path / "out", format="onnx", exporter="builder", verify=False)
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_cli_bad_gguf_to_onnx_is_one_line_exit_2(tmp_path: Path) -> None:
    raw = {"blk.0.attn_q.weight": _q8_1_tensor(64, 64)}
    gguf = tiny_gguf.build_tiny_gguf(tmp_path / "t.gguf", raw_tensors=raw)
    proc = subprocess.run([sys.executable, "-m", "edgellm", "convert", str(gguf), "--format", "onnx",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellm: error: ") and "Q8_1" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()

