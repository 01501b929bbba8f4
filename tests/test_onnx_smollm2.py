"""SmolLM2-135M-Instruct through edgellm's ONNX converter and ONNX Runtime backend."""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgellm
from tests.fixtures import require

require("onnx", "onnxruntime", "optimum.exporters.onnx")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onnx_model(smollm2_converted):
    """``onnx_model(quant)``: SmolLM2 as ONNX, parity measured (converted once per session)."""
    return lambda quant: smollm2_converted("onnx", quant)


def test_fp32_same_32_greedy_tokens_on_5_prompts(onnx_model) -> None:
    parity = onnx_model("fp32").manifest["parity"]
    assert parity["backend"] == "onnxruntime" and parity["n_prompts"] == 5
    assert parity["n_greedy_tokens"] == 32 and parity["greedy_identical"] == 5, parity["per_prompt"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] < 1e-3


def test_int8_top1_agreement(onnx_model) -> None:
    manifest = onnx_model("int8").manifest
    assert manifest["recipe"]["bits"] == 8 and manifest["operators"]["MatMulNBits"] == 210
    assert manifest["parity"]["top1_agreement"] >= 0.90


def test_int4_agreement_recorded_and_chat_answers_paris(onnx_model) -> None:
    art = onnx_model("int4")
    parity = art.manifest["parity"]
    assert parity["status"] == "measured" and 0.3 <= parity["top1_agreement"] <= 1.0
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm", "chat", str(art.path), "--max-tokens", "48",
         "--temperature", "0", "--repeat-penalty", "1.1"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_optimum_loads_our_onnx_and_generates_the_same_tokens(onnx_model) -> None:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    path = onnx_model("fp32").path
    with edgellm.load(path, backend="onnxruntime", n_ctx=256) as model:
        ids = model.tokenize("The capital of France is")
        ours = model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).tokens
    theirs = ORTModelForCausalLM.from_pretrained(path, use_cache=True, use_io_binding=False)
    out = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out[0, len(ids):].tolist() == ours
