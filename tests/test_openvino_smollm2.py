"""SmolLM2-135M-Instruct through edgellm's OpenVINO converter and runtime, against transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgellm
from tests.fixtures import TEST_THREADS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ir(smollm2_converted):
    """``ir(quant)``: SmolLM2 as OpenVINO IR, parity measured (converted once per session)."""
    return lambda quant: smollm2_converted("openvino", quant)


def test_fp16_greedy_tokens_match_except_at_ties(ir) -> None:
    parity = ir("fp16").manifest["parity"]
    assert parity["backend"] == "openvino" and parity["n_prompts"] == 5
    assert parity["greedy_identical"] >= 4, parity["per_prompt"]
    assert parity["top1_agreement"] >= 0.99
    for row in parity["per_prompt"]:  # a flip only where transformers itself is tied
        if not row["greedy_identical"]:
            assert row["ref_margin"] < row["max_abs_diff"], row


def test_int8_top1_agreement(ir) -> None:
    assert ir("int8").manifest["parity"]["top1_agreement"] >= 0.95


def test_int4_group_size_and_agreement_recorded(ir) -> None:
    manifest = ir("int4").manifest
    assert manifest["weight_compression"]["group_size"] == 64  # 128 does not divide 576
    assert manifest["parity"]["status"] == "measured"
    assert 0.3 <= manifest["parity"]["top1_agreement"] <= 1.0


def test_chat_on_int4_answers_paris(ir) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm", "chat", str(ir("int4").path), "--max-tokens", "48",
         "--temperature", "0", "--repeat-penalty", "1.1"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_optimum_intel_loads_our_ir_and_generates_the_same_tokens(ir) -> None:
    import torch
    from optimum.intel import OVModelForCausalLM

    path = ir("int8").path
    prompt = "The capital of France is"
    exact = {"precision": "f32", "kv_precision": "f32"}  # same numerics on both sides
    with edgellm.load(path, backend="openvino", n_ctx=256, **exact) as model:
        ids = model.tokenize(prompt)
        ours = model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).tokens
    # ...and the same thread count: OpenVINO's CPU plugin splits f32 reductions by thread, and a
    # near-tie flipped at token 5 when ours ran at TEST_THREADS=1 and optimum at its default (all cores).
    theirs_model = OVModelForCausalLM.from_pretrained(
        path, compile=True, ov_config={"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
                                       "INFERENCE_NUM_THREADS": str(TEST_THREADS)})
    out = theirs_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out[0, len(ids):].tolist() == ours


def _int4_loader(ir):  # type: ignore[no-untyped-def]
    path = ir("int4").path
    return lambda **kw: edgellm.load(path, backend="openvino", device="cpu", threads=TEST_THREADS, **kw)


def test_interleaved_streams_and_threads_on_the_model_equal_serial(ir) -> None:
    from tests.fixtures import session_checks

    session_checks.check_default_interleaving_matches_serial(_int4_loader(ir))


def test_chat_markers_typed_by_a_user_stay_text(ir) -> None:
    from tests.fixtures import session_checks

    session_checks.check_chat_markers_stay_text(_int4_loader(ir))
