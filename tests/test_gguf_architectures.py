"""One shared runner: every supported architecture -> GGUF -> llama.cpp, against PyTorch.

Tolerances (stated here, measured on the tiny random models, whose logits spread over
roughly +-2): llama.cpp computes activations in mixed precision even for F32 weights, so
F32 and F16 get the same bounds on max |logit difference|; Q8_0 is looser. Top-1 agreement
is over 2 prompts x 32 teacher-forced positions (one flip in 64 is 0.984).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm.converters.verify import DEFAULT_PROMPTS
from edgellm.gguf_meta import read_gguf_metadata, read_gguf_spec
from edgellm.runtimes.base import RuntimeOptions, open_runtime
from tests.fixtures import tiny_models

TOLERANCE = {  # quant -> (max |dlogit| vs PyTorch, min top-1 agreement, max mean KL)
    "F16": (0.1, 0.98, 1e-3),
    "Q8_0": (0.5, 0.90, 2e-2),
}
PARITY_PROMPTS = DEFAULT_PROMPTS[:2]  # 2 x 32 teacher-forced positions per conversion
PROMPT = "def add(a, b):\n    return a + b  # 42 tokens of text"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_model):
    cache: dict[tuple[str, str], edgellm.artifact.Artifact] = {}

    def get(arch: str, quant: str):
        if (arch, quant) not in cache:
            out = tmp_path_factory.mktemp(f"gguf-{arch}") / quant
            cache[arch, quant] = edgellm.convert(tiny_model(arch), out, format="gguf", quant=quant,
                                                 prompts=PARITY_PROMPTS)
        return cache[arch, quant]

    return get


@pytest.mark.parametrize("quant", sorted(TOLERANCE))
@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_architecture_matches_pytorch(arch: str, quant: str, converted, tiny_model) -> None:
    artifact = converted(arch, quant)
    max_diff, min_top1, max_kl = TOLERANCE[quant]

    # the parity the converter measured and recorded
    parity = artifact.manifest["parity"]
    assert parity["status"] == "measured"
    assert parity["top1_agreement"] >= min_top1, parity
    assert parity["mean_kl"] <= max_kl, parity

    # an independent check: llama.cpp logits for every position vs transformers
    runtime = open_runtime(artifact.model_file, "gguf", RuntimeOptions(n_ctx=256))
    try:
        ids = runtime.tokenizer.encode(PROMPT, add_special=False)
        got = runtime.forward(ids, all_logits=True)
    finally:
        runtime.close()
    want = tiny_models.reference_logits(tiny_model(arch), ids)
    assert got.shape == want.shape
    assert float(np.std(want)) > 0.1  # the check means something only if logits spread
    assert float(np.abs(got - want).max()) <= max_diff
    assert _mean_kl(want, got) <= max_kl
    # where PyTorch is decided (top-2 margin above the tolerance), llama.cpp picks the same token
    top2 = np.sort(want, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > max_diff
    assert (got.argmax(-1) == want.argmax(-1))[decided].all()


def _mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_gguf_metadata_describes_the_model(arch: str, converted, tiny_model) -> None:
    artifact = converted(arch, "F16")
    meta = read_gguf_metadata(artifact.model_file)
    spec = edgellm.ModelSpec.from_hf_dir(tiny_model(arch))
    gguf_spec = edgellm.ModelSpec.from_gguf_metadata(meta)
    for field in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
        assert getattr(gguf_spec, field) == getattr(spec, field), field
    assert read_gguf_spec(artifact.model_file)[0].tied_embeddings == spec.tied_embeddings
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == spec.vocab_size
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert artifact.manifest["quantization"] == "F16"
    assert artifact.manifest["spec"]["architecture"] == spec.architecture


def test_sharded_and_bf16_checkpoints_convert(tiny_model, tmp_path: Path) -> None:
    sharded = tiny_model("qwen2", sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    a = edgellm.convert(sharded, tmp_path / "sharded", quant="F16", prompts=PARITY_PROMPTS)
    assert a.manifest["parity"]["top1_agreement"] >= 0.98
    bf16 = tiny_model("llama", dtype="bfloat16")
    b = edgellm.convert(bf16, tmp_path / "bf16", quant="BF16", prompts=PARITY_PROMPTS)
    assert b.manifest["parity"]["top1_agreement"] >= 0.9
    assert "BF16" in b.manifest["source"]["tensor_types"]


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0", "Q6_K"])
def test_llama_cpp_quantizer_types(quant: str, tiny_model, tmp_path: Path) -> None:
    a = edgellm.convert(tiny_model("llama"), tmp_path / quant, quant=quant.lower(),
                        prompts=PARITY_PROMPTS)
    assert a.model_file.name.endswith(f"-{quant}.gguf")
    assert a.manifest["quantization"] == quant
    assert a.manifest["parity"]["status"] == "measured"
    assert 0.0 <= a.manifest["parity"]["top1_agreement"] <= 1.0
    info = edgellm.inspect(a.path)
    assert info["quantization"] == quant
    # no intermediate or log files are left beside the model
    assert sorted(p.name for p in a.path.iterdir()) == sorted([a.model_file.name, "edgellm.json"])


ROPE_SCALINGS = {
    # Llama 3.1/3.2 checkpoints ship this: llama.cpp needs a rope_freqs tensor from the converter
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear": ("qwen2", {"rope_type": "linear", "factor": 4.0}),
    "yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_pytorch(kind: str, tmp_path: Path) -> None:
    arch, rope = ROPE_SCALINGS[kind]
    src = tiny_models.build_tiny_model(arch, tmp_path / "src", config_overrides={"rope_scaling": rope})
    artifact = edgellm.convert(src, tmp_path / "out", quant="F32", prompts=PARITY_PROMPTS)
    assert artifact.manifest["parity"]["top1_agreement"] >= 0.98
    runtime = open_runtime(artifact.model_file, "gguf", RuntimeOptions(n_ctx=256))
    try:
        ids = runtime.tokenizer.encode(PROMPT * 3, add_special=False)  # long enough for RoPE to matter
        got = runtime.forward(ids, all_logits=True)
    finally:
        runtime.close()
    want = tiny_models.reference_logits(src, ids)
    assert float(np.abs(got - want).max()) <= TOLERANCE["F16"][0]
    # and the scaling is really in effect: without it, PyTorch gives different logits
    plain = tiny_models.build_tiny_model(arch, tmp_path / "plain")
    assert float(np.abs(tiny_models.reference_logits(plain, ids) - want).max()) > 0.1


def test_progress_reports_writing_and_quantizing(tiny_model, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    edgellm.convert(tiny_model("llama"), tmp_path / "q", quant="Q4_K_M", verify=False,
                    progress=lambda done, total, name: calls.append((done, total, name)))
    writing = [c for c in calls if not c[2].startswith("quantize")]
    quantizing = [c for c in calls if c[2] == "quantize Q4_K_M"]
    assert writing and quantizing
    assert [d for d, _, _ in writing] == sorted(d for d, _, _ in writing)
    assert writing[-1][0] == writing[-1][1]  # the intermediate was written completely
    assert quantizing[-1][0] == quantizing[-1][1] == (tmp_path / "q" / f"{tiny_model('llama').name}"
                                                      "-Q4_K_M.gguf").stat().st_size
