"""The memory planner: byte arithmetic by hand, the choice on every built-in profile, errors, CLI,
the load/convert integration, and (slow) its predictions against what ``edgellm bench`` measures.

Every test runs with ``EDGELLM_DEVICES_DIR`` pointing at a folder of its own, so profiles in
the developer's ``~/.config/edgellm/devices`` never change what is planned.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import edgellm
from edgellm.cli.main import main
from edgellm.devices import CpuSpec, DeviceProfile, GpuSpec, Plan, load_profile, plan
from edgellm.devices import planner as planner_module
from edgellm.devices.planner import find_quant, host_profile, kv_bytes_per_token, weight_bytes
from edgellm.errors import InvalidInputError, NoCompatibleRuntimeError, UnknownDeviceError
from edgellm.runtimes.base import get_backend
from edgellm.spec import ModelSpec

MiB = 2**20
GiB = 2**30
REPO = Path(__file__).resolve().parents[1]

#: SmolLM2-135M-Instruct's shape (its config.json).
SMOLLM2 = ModelSpec("llama", n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3, head_dim=64,
                    intermediate_size=1536, vocab_size=49152, max_positions=8192, tied_embeddings=True)
#: Llama-3.2-1B's shape, no weights.
LLAMA_1B = ModelSpec("llama", n_layers=16, hidden_size=2048, n_heads=32, n_kv_heads=8, head_dim=64,
                     intermediate_size=8192, vocab_size=128256, max_positions=131072, tied_embeddings=True)
#: Llama-2-7B's shape, no weights.
LLAMA_7B = ModelSpec("llama", n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=32, head_dim=128,
                     intermediate_size=11008, vocab_size=32000, max_positions=4096)

# Parameters by hand: per layer q (h x heads*d) + k, v (2 x h x kv*d) + o + MLP (3 x h x inter) + 2 norms;
# the embedding once when tied (twice with an untied lm_head), plus the final norm.
SMOLLM2_PARAMS = 30 * (576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536 + 2 * 576) + 49152 * 576 + 576
LLAMA_1B_PARAMS = (16 * (2048 * 2048 + 2 * 2048 * 512 + 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048)
                   + 128256 * 2048 + 2048)
LLAMA_7B_PARAMS = (32 * (4096 * 4096 + 2 * 4096 * 4096 + 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096)
                   + 2 * 32000 * 4096 + 4096)

# The calibrated constants as the module docstring gives them (hand arithmetic below uses these).
PROCESS = int(31.5 * MiB)  # CPython + numpy + edgellm
LLAMA_IMPORT = int(13.4 * MiB)
LLAMA_VOCAB_BYTES = 572  # per vocabulary entry


# every test gets its own empty user profile folder (conftest.user_devices_dir)
pytestmark = pytest.mark.usefixtures("user_devices_dir")


def _box(budget_bytes: int, backends: tuple[tuple[str, str], ...] = (("llamacpp", "cpu"),),
         gpu: GpuSpec | None = None) -> DeviceProfile:
    """A made-up x86 device with a given budget."""
    return DeviceProfile(name="test-box", description="test", total_memory_bytes=64 * GiB,
                         budget_bytes=budget_bytes, cpu=CpuSpec("x86_64", 4, 4, ("avx2",)),
                         backends=backends, gpu=gpu)


def _one_line(exc: BaseException, *needles: str) -> str:
    text = str(exc)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    return text


# -- arithmetic -------------------------------------------------------------------------------------


def test_parameter_counts_by_hand() -> None:
    assert SMOLLM2.n_params() == SMOLLM2_PARAMS == 134_515_008
    assert LLAMA_1B.n_params() == LLAMA_1B_PARAMS == 1_235_814_400
    assert LLAMA_7B.n_params() == LLAMA_7B_PARAMS == 6_738_415_616


@pytest.mark.parametrize(("spec", "expected"), [
    # 2 (K and V) x layers x kv heads x head_dim x bytes; q8_0 is 34 B per 32, q4_0 18 B per 32
    (SMOLLM2, {"f32": 2 * 30 * 3 * 64 * 4, "f16": 23040, "q8_0": 2 * 30 * 3 * 64 * 34 // 32,
               "q4_0": 2 * 30 * 3 * 64 * 18 // 32, "u8": 11520}),
    (LLAMA_1B, {"f32": 65536, "f16": 2 * 16 * 8 * 64 * 2, "q8_0": 17408, "q4_0": 9216, "u8": 16384}),
    (LLAMA_7B, {"f32": 1048576, "f16": 2 * 32 * 32 * 128 * 2, "q8_0": 278528, "q4_0": 147456,
                "u8": 262144}),
])
def test_kv_bytes_per_token_exactly(spec: ModelSpec, expected: dict[str, int]) -> None:
    assert {k: kv_bytes_per_token(spec, k) for k in expected} == expected
    assert plan(spec, "raspberry-pi-5-8gb", 64).to_dict()["kv_bytes_per_token"] == expected


def test_onnxruntime_kv_copies_follow_the_exporter() -> None:
    onnx = [c for c in plan(SMOLLM2, "raspberry-pi-5-8gb", 1024).candidates if c.backend == "onnxruntime"]
    by_quant = {c.quantization: c.kv_bytes_per_token for c in onnx}
    # int8/int4: the builder's graph updates one buffer in place; fp16 is optimum's (ping-pong)
    assert by_quant == {"fp16": 2 * 23040, "int8": 46080, "int4": 46080}


def test_weight_bytes_from_parameters_and_bits_per_weight() -> None:
    assert weight_bytes(LLAMA_7B, find_quant("gguf", "F16")) == LLAMA_7B_PARAMS * 2
    assert weight_bytes(LLAMA_7B, find_quant("gguf", "Q8_0")) == int(LLAMA_7B_PARAMS * 8.5 / 8)
    assert weight_bytes(LLAMA_7B, find_quant("gguf", "Q4_K_M")) == int(LLAMA_7B_PARAMS * 4.84 / 8)
    assert 3.7 * GiB < weight_bytes(LLAMA_7B, find_quant("gguf", "Q4_K_M")) < 3.9 * GiB
    # OpenVINO int4: blocks at 4 + 16/64 + 4/64 bits, the tied embedding in int8 (8.04)
    table = 49152 * 576
    assert weight_bytes(SMOLLM2, find_quant("openvino", "int4")) == int(
        ((SMOLLM2_PARAMS - table) * 4.3125 + table * 8.04) / 8)
    # ONNX int4 (builder): MatMulNBits at 5.125 bits, the tied table stored once for both uses
    assert weight_bytes(SMOLLM2, find_quant("onnx", "int4")) == int(SMOLLM2_PARAMS * 5.125 / 8)
    # optimum's int4 stores the tied table twice, both int4 (GatherBlockQuantized + lm_head)
    assert weight_bytes(SMOLLM2, find_quant("onnx", "int4", "optimum")) == int(
        ((SMOLLM2_PARAMS - table) * 5.125 + 2 * table * 5.125) / 8)
    # an untied lm_head: GGUF at the same bits, OpenVINO int4 keeps it int8 like the embedding
    table7 = 32000 * 4096
    assert weight_bytes(LLAMA_7B, find_quant("openvino", "int4")) == int(
        ((LLAMA_7B_PARAMS - 2 * table7) * 4.3125 + 2 * table7 * 8.04) / 8)


def _llama_fixed(spec: ModelSpec, weights: int) -> int:
    """llama.cpp's context-independent bytes once n_ctx >= 512: weights, runtime, vocabulary, and
    the compute buffer's 3.5 float32 rows of (hidden + intermediate) per batch token."""
    compute_rows = int(512 * (spec.hidden_size + spec.intermediate_size) * 4 * 3.5)
    return weights + PROCESS + LLAMA_IMPORT + LLAMA_VOCAB_BYTES * spec.vocab_size + compute_rows


def test_max_context_for_a_budget_by_hand() -> None:
    weights = SMOLLM2_PARAMS * 2  # GGUF F16
    per_token = 23040 + 512 * 2  # f16 KV + the f16 KQ mask row of a 512-token batch
    budget = _llama_fixed(SMOLLM2, weights) + 3000 * per_token + per_token - 1
    p = plan(SMOLLM2, _box(budget), 2048)
    c = p.choice
    assert c is not None and (c.format, c.quantization, c.kv_precision) == ("gguf", "F16", "f16")
    assert c.max_context == 3000
    assert c.predicted_peak_bytes == _llama_fixed(SMOLLM2, weights) + 2048 * per_token
    # one byte less than 3000 tokens need: 2999
    tighter = plan(SMOLLM2, _box(budget - per_token), 2048).choice
    assert tighter is not None and tighter.max_context == 2999


def test_the_kv_precision_ladder_buys_context() -> None:
    weights = SMOLLM2_PARAMS * 2
    budget = _llama_fixed(SMOLLM2, weights) + 4096 * (12240 + 1024)  # q8_0 KV fits 4096, f16 does not
    rows = plan(SMOLLM2, _box(budget)).candidates
    f16, q8 = rows[0], rows[1]
    assert (f16.kv_precision, f16.status) == ("f16", "rejected")
    assert f16.reason.startswith("needs ") and "at 4096 tokens > budget" in f16.reason
    assert f"fits up to {f16.max_context} tokens" in f16.reason and 2000 < f16.max_context < 4096
    assert (q8.kv_precision, q8.status, q8.max_context) == ("q8_0", "chosen", 4096)
    assert q8.runtime_options == {"kv_precision": "q8_0"}


def test_a_kv_budget_sizes_the_context_and_is_counted_whole() -> None:
    weights = SMOLLM2_PARAMS * 2
    budget = _llama_fixed(SMOLLM2, weights) + 8192 * (23040 + 1024)  # plenty of memory
    kv_budget = 1000 * 23040 + 5
    c = plan(SMOLLM2, _box(budget), kv_budget=kv_budget, backends=["llamacpp"]).choice
    assert c is not None and (c.kv_precision, c.context, c.max_context) == ("f16", 1000, 1000)
    assert c.breakdown["kv"] == kv_budget  # every session together may fill the budget
    q8 = plan(SMOLLM2, _box(budget), kv_budget="11.25MiB", kv_precision="q8_0", backends=["llamacpp"]).choice
    assert q8 is not None and q8.kv_precision == "q8_0" and q8.context == 11.25 * MiB // 12240
    # two sessions of 400 tokens fit the budget: the context is per session
    two = plan(SMOLLM2, _box(budget), 400, kv_budget=800 * 23040, backends=["llamacpp"]).choice
    assert two is not None and two.context == 400 and two.breakdown["kv"] == 800 * 23040
    with pytest.raises(NoCompatibleRuntimeError) as info:
        plan(SMOLLM2, _box(budget), 2000, kv_budget=kv_budget, backends=["llamacpp"], kv_precision="f16")
    assert "a session of 2000 tokens needs" in str(info.value.reasons)
    with pytest.raises(InvalidInputError, match="kv_budget"):
        plan(SMOLLM2, _box(budget), kv_budget="lots")


def test_hand_computed_peak_of_the_7b_on_a_raspberry_pi_8gb() -> None:
    c = plan(LLAMA_7B, "raspberry-pi-5-8gb").choice
    assert c is not None
    weights = int(LLAMA_7B_PARAMS * 4.84 / 8)  # Q4_K_M
    kv = 278528 * 4096  # q8_0 at the default context, min(4096, 4096 positions)
    mask = 512 * 4096 * 2
    assert c.predicted_peak_bytes == _llama_fixed(LLAMA_7B, weights) + kv + mask
    assert c.predicted_peak_bytes == sum(c.breakdown.values())
    assert c.predicted_peak_bytes < load_profile("raspberry-pi-5-8gb").budget_bytes


def test_a_discrete_gpu_budget_counts_only_what_lives_on_the_gpu() -> None:
    c = plan(LLAMA_7B, "x86-desktop-rtx-4060-8gb").choice
    assert c is not None and c.device == "gpu"
    parts = c.breakdown
    assert c.required_bytes == parts["weights"] + parts["kv"] + parts["compute"]
    assert c.predicted_peak_bytes == c.required_bytes + parts["runtime"] + parts["tokenizer"]


# -- the choice on every built-in profile -------------------------------------------------------------

#: (format, quantization, backend, device, KV precision) chosen per profile; None: nothing fits.
EXPECTED: dict[str, dict[str, tuple[str, str, str, str, str] | None]] = {
    "smollm2": {
        "apple-m2-16gb": ("gguf", "F16", "llamacpp", "gpu", "f16"),
        "cpu-only-x86-8gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "intel-core-ultra-7-155h-laptop": ("openvino", "fp16", "openvino", "gpu", "f16"),
        "jetson-orin-nano-8gb": ("gguf", "F16", "llamacpp", "gpu", "f16"),
        "raspberry-pi-5-4gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "raspberry-pi-5-8gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "rockchip-rk3588-8gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "snapdragon-8-gen-3-phone-12gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "snapdragon-x-elite-laptop": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "x86-desktop-rtx-4060-8gb": ("gguf", "F16", "llamacpp", "gpu", "f16"),
    },
    "1b": {
        "apple-m2-16gb": ("gguf", "F16", "llamacpp", "gpu", "f16"),
        "cpu-only-x86-8gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        # fp16 + a float32 working copy + 4096 prompt tokens of 128256-wide logits > 8 GiB of GPU
        # fp16 fits since OpenVINO computes one row of logits (4096 x 128256 floats were 2 GiB)
        "intel-core-ultra-7-155h-laptop": ("openvino", "fp16", "openvino", "gpu", "f16"),
        "jetson-orin-nano-8gb": ("gguf", "F16", "llamacpp", "gpu", "f16"),
        "raspberry-pi-5-4gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),  # 2.3 GiB of weights
        "raspberry-pi-5-8gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "rockchip-rk3588-8gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "snapdragon-8-gen-3-phone-12gb": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "snapdragon-x-elite-laptop": ("gguf", "F16", "llamacpp", "cpu", "f16"),
        "x86-desktop-rtx-4060-8gb": ("gguf", "F16", "llamacpp", "gpu", "f16"),
    },
    "7b": {
        "apple-m2-16gb": ("gguf", "Q8_0", "llamacpp", "gpu", "f16"),
        "cpu-only-x86-8gb": ("gguf", "Q4_K_M", "llamacpp", "cpu", "q8_0"),
        "intel-core-ultra-7-155h-laptop": ("openvino", "int4", "openvino", "gpu", "f16"),
        "jetson-orin-nano-8gb": ("gguf", "Q4_K_M", "llamacpp", "gpu", "q8_0"),
        "raspberry-pi-5-4gb": None,
        "raspberry-pi-5-8gb": ("gguf", "Q4_K_M", "llamacpp", "cpu", "q8_0"),
        "rockchip-rk3588-8gb": ("gguf", "Q4_K_M", "llamacpp", "cpu", "q8_0"),
        "snapdragon-8-gen-3-phone-12gb": ("gguf", "Q4_K_M", "llamacpp", "cpu", "f16"),
        "snapdragon-x-elite-laptop": ("gguf", "Q8_0", "llamacpp", "cpu", "f16"),
        "x86-desktop-rtx-4060-8gb": ("gguf", "Q4_K_M", "llamacpp", "gpu", "f16"),
    },
}
SPECS = {"smollm2": SMOLLM2, "1b": LLAMA_1B, "7b": LLAMA_7B}


def test_every_builtin_profile_is_covered() -> None:
    from edgellm.devices import profile_names

    for table in EXPECTED.values():
        assert set(table) == set(profile_names())


@pytest.mark.parametrize(("model", "profile"), [(m, p) for m, t in EXPECTED.items() for p in t])
def test_choice_per_builtin_profile(model: str, profile: str) -> None:
    expected = EXPECTED[model][profile]
    if expected is None:
        with pytest.raises(NoCompatibleRuntimeError):
            plan(SPECS[model], profile)
        return
    p = plan(SPECS[model], profile)
    c = p.choice
    assert c is not None
    assert (c.format, c.quantization, c.backend, c.device, c.kv_precision) == expected
    assert c.context == min(4096, SPECS[model].max_positions)
    assert c.required_bytes is not None and c.required_bytes <= c.budget_bytes
    # the choice is the first pair of the profile that fits anything
    pairs = load_profile(profile).backends
    earlier = pairs[:pairs.index((c.backend, c.device))]
    for row in p.rejected:
        assert row.reason and row.status in ("rejected", "fits")
        if (row.backend, row.device) in earlier:
            assert row.status == "rejected"


def test_rejections_say_why_for_the_7b_on_a_raspberry_pi_8gb() -> None:
    rows = {(c.quantization, c.kv_precision): c for c in plan(LLAMA_7B, "raspberry-pi-5-8gb").candidates
            if c.backend == "llamacpp"}
    assert rows[("F16", "f16")].reason == "weights 12.6 GiB > budget 5.6 GiB"
    assert rows[("Q8_0", "f16")].reason == "weights 6.7 GiB > budget 5.6 GiB"
    q4 = rows[("Q4_K_M", "f16")]
    assert q4.status == "rejected" and q4.reason.startswith("needs 6.0 GiB at 4096 tokens > budget 5.6 GiB")
    assert rows[("Q4_K_M", "q8_0")].status == "chosen"
    later = [c for c in plan(LLAMA_7B, "raspberry-pi-5-8gb").candidates if c.backend != "llamacpp"]
    assert later and all(c.reason for c in later)


def test_npu_needs_static_shapes_and_the_openvino_recipe() -> None:
    p = plan(SMOLLM2, "intel-core-ultra-7-155h-laptop", 8192)
    npu = [c for c in p.candidates if c.device == "npu"]
    assert npu and {c.quantization for c in npu} == {"int4"}  # the symmetric int4 NPU recipe only
    for c in npu:
        assert c.status == "rejected"
        assert c.reason == ("device npu needs static shapes: context 8192 > max_prompt_len 1024 "
                            "+ min_response_len 128 = 1152")
        assert c.convert_options == {"npu": True, "max_prompt_len": 1024}
    fitting = plan(SMOLLM2, "intel-core-ultra-7-155h-laptop", 1024, backends=["openvino"],
                   formats=["openvino"])
    npu_fit = [c for c in fitting.candidates if c.device == "npu"]
    assert npu_fit[0].fits and npu_fit[0].max_context == 1152  # capped by the static shape
    phone = plan(SMOLLM2, "snapdragon-8-gen-3-phone-12gb")
    (ort_npu,) = [c for c in phone.candidates if c.device == "npu"]
    assert "needs static shapes" in ort_npu.reason and "onnxruntime" in ort_npu.reason


def test_installation_only_matters_on_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_backend("openvino")
    monkeypatch.setattr(type(spec), "installed", lambda self: self.name != "openvino")
    away = plan(SMOLLM2, "intel-core-ultra-7-155h-laptop")
    assert away.choice is not None and away.choice.backend == "openvino"
    assert not any("not installed" in c.reason for c in away.candidates)
    here = DeviceProfile("this-host", "test", 8 * GiB, 4 * GiB, CpuSpec("x86_64", 2, 2, ("avx2",)),
                         (("openvino", "cpu"), ("llamacpp", "cpu")))
    p = plan(SMOLLM2, here)
    assert p.candidates[0].reason == 'backend openvino not installed (pip install "edgellm[openvino]")'
    assert p.choice is not None and p.choice.backend == "llamacpp"


# -- existing artifacts -------------------------------------------------------------------------------


def test_a_gguf_artifact_has_exact_weights_and_a_fixed_format(smollm2_gguf: Path) -> None:
    from edgellm.gguf_meta import gguf_summary

    p = plan(smollm2_gguf, "cpu-only-x86-8gb")
    c = p.choice
    assert c is not None and (c.format, c.quantization, c.backend) == ("gguf", "Q4_1", "llamacpp")
    assert c.weights_exact and c.weight_bytes == gguf_summary(smollm2_gguf)["tensor_bytes"]
    assert p.model.to_dict()["kind"] == "artifact"
    others = {c.backend: c.reason for c in p.candidates if c.backend != "llamacpp"}
    assert others == {"openvino": "openvino reads openvino, not this gguf model",
                      "onnxruntime": "onnxruntime reads onnx, not this gguf model"}
    assert {c.quantization for c in p.candidates if c.backend == "llamacpp"} == {"Q4_1"}


# -- bad inputs --------------------------------------------------------------------------------------


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(UnknownDeviceError) as info:
        plan(SMOLLM2, "raspberry-pi-6")
    _one_line(info.value, "'raspberry-pi-6'", "raspberry-pi-5-8gb", "cpu-only-x86-8gb")


def test_nothing_fits_says_what_is_missing_and_what_would_fit() -> None:
    with pytest.raises(NoCompatibleRuntimeError) as info:
        plan(LLAMA_7B, "raspberry-pi-5-4gb")
    text = _one_line(info.value, "raspberry-pi-5-4gb (budget 2.8 GiB)",
                     "gguf Q4_K_M on llamacpp:cpu, KV q8_0: weights need 3.8 GiB, budget 2.8 GiB:",
                     "missing", "Q2_K (2.6 GiB, KV q8_0) would fit with up to")
    assert "1021 MiB missing" in text  # 3.80 - 2.80 GiB
    reasons = info.value.reasons
    assert len(reasons) >= 9 and all(reasons.values())
    assert reasons["llamacpp:cpu gguf F16 kv=f16"] == "weights 12.6 GiB > budget 2.8 GiB"
    assert isinstance(info.value.plan, Plan)  # type: ignore[attr-defined]


def test_a_tight_budget_suggests_a_smaller_quantization_or_context() -> None:
    with pytest.raises(NoCompatibleRuntimeError) as info:
        plan(SMOLLM2, _box(200 * MiB))
    _one_line(info.value, "needs 216 MiB at 4096 tokens, budget 200 MiB: 16 MiB missing",
              "Q2_K (54 MiB, KV q8_0) would fit at 4096 tokens",
              "gguf Q4_K_M on llamacpp:cpu, KV q8_0 fits with --context")


@pytest.mark.parametrize("context", [0, -5])
def test_context_must_be_positive(context: int) -> None:
    with pytest.raises(InvalidInputError) as info:
        plan(SMOLLM2, "raspberry-pi-5-8gb", context)
    _one_line(info.value, f"context must be a positive integer, got {context}")


def test_context_beyond_the_model_is_refused() -> None:
    with pytest.raises(InvalidInputError) as info:
        plan(LLAMA_7B, "raspberry-pi-5-8gb", 8192)
    _one_line(info.value, "context 8192 > the model's 4096 positions")


def test_a_path_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError) as info:
        plan(tmp_path, "raspberry-pi-5-8gb")
    _one_line(info.value, "not a model", "Hugging Face checkpoint folder", ".gguf file")
    with pytest.raises(InvalidInputError) as info:
        plan(tmp_path / "notes.txt", "raspberry-pi-5-8gb")
    _one_line(info.value, "notes.txt", "not a model")
    (tmp_path / "spec.json").write_text('{"n_layers": 2}')
    with pytest.raises(InvalidInputError) as info:
        plan(tmp_path / "spec.json", "raspberry-pi-5-8gb")
    _one_line(info.value, "spec.json", "not a ModelSpec or config.json")


# -- CLI -----------------------------------------------------------------------------------------------


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "smollm2-spec.json"
    path.write_text(json.dumps(SMOLLM2.to_dict()))
    return path


def test_cli_json_gives_the_choice(spec_file: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edgellm", "plan", str(spec_file), "--device",
                          "raspberry-pi-5-8gb", "--json"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ}, check=True)
    data = json.loads(out.stdout)
    choice = data["choice"]
    assert (choice["format"], choice["quantization"], choice["backend"], choice["device"]) == (
        "gguf", "F16", "llamacpp", "cpu")
    assert choice["predicted_peak_bytes"] == sum(choice["breakdown"].values())
    assert data["model"]["n_params"] == SMOLLM2_PARAMS
    assert data["kv_bytes_per_token"]["f16"] == 23040
    assert [c for c in data["candidates"] if c["status"] != "chosen"]


def test_cli_human_output_lists_rejected_candidates(spec_file: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(spec_file), "--device", "snapdragon-x-elite-laptop", "--context", "2048"]) == 0
    text = capsys.readouterr().out
    assert "choice: gguf F16 on llamacpp:cpu, KV f16 at 2048 tokens" in text
    assert "onnxruntime:npu" in text and "needs static shapes" in text
    assert "fits, but gguf F16 on llamacpp:cpu, KV f16 comes first" in text


def test_cli_errors_are_one_line(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(spec_file), "--device", "raspberry-pi-5-8gb", "--context", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "edgellm: error: context must be a positive integer, got 0"
    assert main(["plan", str(spec_file), "--device", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown device profile 'nowhere'; known profiles:" in err


def test_cli_prints_the_rejections_when_nothing_fits(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "7b.json"
    path.write_text(json.dumps(LLAMA_7B.to_dict()))
    assert main(["plan", str(path), "--device", "raspberry-pi-5-4gb"]) == 1
    captured = capsys.readouterr()
    assert "weights 12.6 GiB > budget 2.8 GiB" in captured.out
    assert captured.err.count("\n") == 1 and "1021 MiB missing" in captured.err


# -- integration: load(device="auto"), convert(device=...) ----------------------------------------------


def test_host_profile_for_gguf_imports_no_other_runtime() -> None:
    code = ("import sys, json\nfrom edgellm.devices.planner import host_profile\n"
            "p = host_profile(['gguf'])\nprint(json.dumps([sorted(sys.modules), p.backends]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    modules, backends = json.loads(out.stdout)
    assert "openvino" not in modules and "onnxruntime" not in modules
    assert {b for b, _ in backends} <= {"llamacpp"}


def test_load_auto_opens_the_planned_backend(smollm2_gguf: Path) -> None:
    with edgellm.load(smollm2_gguf) as model:  # device="auto" is the default
        info = model.info()
    assert (info["backend"], info["device"], info["kv_precision"]) == ("llamacpp", "cpu", "f16")
    assert info["n_ctx"] == 4096  # min(4096, the GGUF's 8192 positions), the plan's context
    with edgellm.load(smollm2_gguf, n_ctx=256, kv_precision="q8_0") as model:  # the caller's choices win
        assert (model.info()["n_ctx"], model.info()["kv_precision"]) == (256, "q8_0")


def test_load_auto_refuses_when_nothing_fits(smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = DeviceProfile("this-host", "test", 8 * GiB, 64 * MiB, CpuSpec("x86_64", 2, 2, ("avx2",)),
                         (("llamacpp", "cpu"),))
    monkeypatch.setattr(planner_module, "host_profile", lambda formats=None: tiny)
    with pytest.raises(NoCompatibleRuntimeError) as info:
        edgellm.load(smollm2_gguf)
    _one_line(info.value, "nothing fits this-host (budget 64 MiB)", "missing")
    assert info.value.reasons


def _smollm2_config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "smollm2-config"
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30,
              "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
              "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192,
              "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace every converter by a recorder: convert(device=...) is checked without converting."""
    import edgellm.converters as converters

    calls: list[dict[str, Any]] = []

    def fake_get(fmt: Any) -> Any:
        def convert(src: Path, output: Path, **kwargs: Any) -> str:
            calls.append({"format": fmt.value, **kwargs})
            return "converted"
        return convert

    monkeypatch.setattr(converters, "get_converter", fake_get)
    return calls


def test_convert_for_a_device_takes_the_plans_format_and_quant(tmp_path: Path,
                                                               recorded: list[dict[str, Any]]) -> None:
    src = _smollm2_config_dir(tmp_path)
    edgellm.convert(src, tmp_path / "out", device="raspberry-pi-5-8gb", verify=False)
    assert (recorded[-1]["format"], recorded[-1]["quant"]) == ("gguf", "F16")
    edgellm.convert(src, tmp_path / "out", format="onnx", device="raspberry-pi-5-8gb", verify=False)
    assert (recorded[-1]["format"], recorded[-1]["quant"]) == ("onnx", "fp16")
    edgellm.convert(src, tmp_path / "out", quant="int4", device="raspberry-pi-5-8gb", verify=False)
    assert (recorded[-1]["format"], recorded[-1]["quant"]) == ("onnx", "int4")  # the pi lists ORT first
    edgellm.convert(src, tmp_path / "out", format="gguf", quant="Q4_0", device="raspberry-pi-5-8gb")
    assert (recorded[-1]["format"], recorded[-1]["quant"]) == ("gguf", "Q4_0")  # both given: as given


def test_convert_for_an_npu_passes_the_npu_recipe(tmp_path: Path, user_devices_dir: Path,
                                                  recorded: list[dict[str, Any]]) -> None:
    (user_devices_dir / "npu-box.toml").write_text(
        'name = "npu-box"\ndescription = "an Intel NPU first"\nmemory = "16 GiB"\nbudget = "11 GiB"\n'
        'backends = [["openvino", "npu"], ["llamacpp", "cpu"]]\n'
        '[cpu]\narch = "x86_64"\ncores = 4\nthreads = 8\nisa = ["avx2"]\n'
        '[npu]\nkind = "intel-npu"\nstatic_shapes = true\nsymmetric_int4 = true\nmax_prompt_len = 1024\n')
    edgellm.convert(_smollm2_config_dir(tmp_path), tmp_path / "out", device="npu-box", verify=False)
    call = recorded[-1]
    assert (call["format"], call["quant"], call["npu"], call["max_prompt_len"]) == (
        "openvino", "int4", True, 1024)


def test_convert_for_a_device_where_nothing_fits_converts_nothing(tmp_path: Path,
                                                                  recorded: list[dict[str, Any]]) -> None:
    src = tmp_path / "7b"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096}))
    with pytest.raises(NoCompatibleRuntimeError, match="weights need 3.8 GiB"):
        edgellm.convert(src, tmp_path / "out", device="raspberry-pi-5-4gb")
    assert recorded == []


def test_cli_convert_device_flag(tiny_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny_model("llama")
    out = tmp_path / "tiny-pi"
    assert main(["convert", str(src), "-o", str(out), "--device", "raspberry-pi-5-8gb", "--no-verify",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["format"], data["manifest"]["quantization"]) == ("gguf", "F16")


# -- predicted vs measured (the acceptance) ------------------------------------------------------

#: What is measured: (format, quantization, backend). Each backend installed here is measured.
MEASURED = [("gguf", "Q8_0", "llamacpp"), ("openvino", "int4", "openvino"), ("onnx", "int4", "onnxruntime")]
CONTEXTS = (512, 2048)
MAX_TOKENS = 16
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def smollm2_artifact(smollm2_converted: Any) -> Any:
    """``smollm2_artifact(fmt, quant) -> folder``: the session's shared SmolLM2 conversion."""
    return lambda fmt, quant: smollm2_converted(fmt, quant).path


def _filling_prompt(hf_dir: Path, n_tokens: int) -> str:
    """A prompt of ``n_tokens`` tokens, so a run fills the context the planner sized."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    unit = ("The bicycle was invented in the nineteenth century and changed how people travelled. "
            "Early designs had no pedals; riders pushed along the ground with their feet. ")
    text = unit * math.ceil(n_tokens / max(1, len(tok.encode(unit).ids)) + 1)
    return tok.decode(tok.encode(text).ids[:n_tokens])


def _bench_peak_bytes(path: Path, n_ctx: int, prompt: str, cache: Path) -> tuple[int, int]:
    """``edgellm bench`` in a fresh process: (peak RSS bytes, prompt tokens)."""
    cmd = [sys.executable, "-m", "edgellm", "bench", str(path), "--n-ctx", str(n_ctx), "--prompt", prompt,
           "--max-tokens", str(MAX_TOKENS), "--repeats", "1", "--warmup", "0", "--json"]
    env = {**os.environ, "EDGELLM_CACHE": str(cache)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    return int(report["peak_rss_bytes"]), int(report["runs"][0]["prompt_tokens"])


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "quant", "backend"),
                         [m for m in MEASURED if get_backend(m[2]).installed()], ids=lambda v: str(v))
def test_predicted_peak_is_within_15_percent_of_bench(fmt: str, quant: str, backend: str, smollm2_hf: Path,
                                                      smollm2_artifact: Any, tmp_path: Path) -> None:
    """SmolLM2 on each installed backend at two contexts, each filled by its prompt (the planner sizes a
    full context: ONNX Runtime commits its KV pages and OpenVINO its activations only as they fill)."""
    path = smollm2_artifact(fmt, quant)
    here = host_profile([fmt])
    rows = []
    for n_ctx in CONTEXTS:
        chosen = plan(path, here, n_ctx).choice
        assert chosen is not None and (chosen.backend, chosen.device) == (backend, "cpu")
        prompt = _filling_prompt(smollm2_hf, n_ctx - MAX_TOKENS - 24)
        measured, prompt_tokens = _bench_peak_bytes(path, n_ctx, prompt, tmp_path / "cache")
        predicted = chosen.predicted_peak_bytes or 0
        assert prompt_tokens > 0.9 * (n_ctx - MAX_TOKENS - 24)
        rows.append((n_ctx, predicted / MiB, measured / MiB, (predicted - measured) / measured))
    table = "; ".join(f"n_ctx {n}: predicted {p:.1f} MiB, measured {m:.1f} MiB, error {e:+.1%}"
                      for n, p, m, e in rows)
    print(f"{backend} {fmt} {quant}: {table}")  # shown by pytest -rP
    assert all(abs(e) <= TOLERANCE for *_, e in rows), f"{backend} {fmt} {quant}: {table}"
