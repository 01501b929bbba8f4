"""OpenVINO conversion: the weight-compression choices edgellm makes, and the export itself."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import edgellm
from edgellm import errors
from edgellm.converters.openvino import choose_group_size, recipe_for

SMOLLM2 = edgellm.ModelSpec(architecture="llama", n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3,
                            head_dim=64, intermediate_size=1536, vocab_size=49152, max_positions=8192)
LLAMA2_7B = replace(SMOLLM2, n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=32, head_dim=128,
                    intermediate_size=11008, vocab_size=32000)
ODD = replace(SMOLLM2, hidden_size=600, n_heads=10, head_dim=60, intermediate_size=1500)


def test_group_size_never_fails_the_way_nncf_does_on_smollm2() -> None:
    # NNCF's default group 128 does not divide 576 (= 4.5 x 128): edgellm picks 64
    assert choose_group_size(SMOLLM2)[0] == 64
    assert choose_group_size(LLAMA2_7B)[0] == 128  # 4096 and 11008 are multiples of 128
    group, reason = choose_group_size(ODD)  # 600 = 8 x 75: no power-of-two group fits
    assert group == -1 and "channel-wise" in reason


def test_recipes() -> None:
    int4 = recipe_for(SMOLLM2, "INT4")
    assert (int4.bits, int4.group_size, int4.sym, int4.ratio) == (4, 64, False, 1.0)
    npu = recipe_for(SMOLLM2, "int4", npu=True)
    assert (npu.sym, npu.group_size) == (True, -1)  # what Intel NPUs execute
    assert recipe_for(SMOLLM2, "int4", sym=True, ratio=0.8).sym is True
    assert recipe_for(SMOLLM2, "int8").group_size == -1
    assert recipe_for(SMOLLM2, "fp16").bits is None
    with pytest.raises(errors.UnknownQuantizationError, match="'q4_k_m'.*fp32, fp16, int8, int4"):
        recipe_for(SMOLLM2, "q4_k_m")
    with pytest.raises(errors.UnknownQuantizationError, match="ratio"):
        recipe_for(SMOLLM2, "int4", ratio=1.5)


@pytest.mark.parametrize("quant", ["fp16", "int8", "int4"])
def test_export_writes_a_compressed_stateful_ir(quant: str, tiny_model, tmp_path: Path) -> None:
    artifact = edgellm.convert(tiny_model("llama"), tmp_path / quant, format="openvino", quant=quant,
                               verify=False)
    manifest = json.loads((artifact.path / "edgellm.json").read_text())
    assert manifest["format"] == "openvino" and manifest["quantization"] == quant
    assert manifest["weight_compression"]["quant"] == quant
    assert (artifact.path / "tokenizer.json").is_file()
    import openvino as ov

    model = ov.Core().read_model(artifact.model_file)
    assert {i.get_any_name() for i in model.inputs} >= {"input_ids", "attention_mask", "beam_idx"}
    assert model.get_sinks(), "the KV cache must live in the model's state (stateful IR)"
    weights = (artifact.path / "openvino_model.bin").stat().st_size
    fp32 = sum(p.stat().st_size for p in tiny_model("llama").glob("*.safetensors"))
    assert weights < {"fp16": 0.6, "int8": 0.35, "int4": 0.3}[quant] * fp32


def test_openvino_refuses_overwrite_and_unknown_quant(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.OutputExistsError):
        edgellm.convert(tiny_model("llama"), out, format="openvino", quant="fp16")
    with pytest.raises(errors.UnknownQuantizationError):
        edgellm.convert(tiny_model("llama"), tmp_path / "x", format="openvino", quant="int3")
    assert not (tmp_path / "x").exists()


def test_cli_npu_recipe_and_bad_ratio(tiny_model, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "npu"
    proc = subprocess.run([sys.executable, "-m", "edgellm", "convert", str(tiny_model("llama")),
                           "--format", "openvino", "--quant", "int4", "--npu", "--no-verify", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    recipe = json.loads((out / "edgellm.json").read_text())["weight_compression"]
    assert (recipe["bits"], recipe["sym"], recipe["group_size"]) == (4, True, -1)
    bad = subprocess.run([sys.executable, "-m", "edgellm", "convert", str(tiny_model("llama")),
                          "--format", "openvino", "--quant", "int4", "--ratio", "2",
                          "-o", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("edgellm: error:") and "ratio" in bad.stderr
    assert not (tmp_path / "r").exists()
