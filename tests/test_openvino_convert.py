"""OpenVINO conversion: the weight-compression choices edgellm makes, and the export itself."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import edgellm
from edgellm import errors
from edgellm.converters.from_gguf import PROBE_TEXTS, write_tokenizer_files
from edgellm.converters.openvino import EXPORT_CAVEATS, choose_group_size, read_calibration, recipe_for
from edgellm.spec import ModelSpec
from tests.fixtures import require, tiny_models

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
                           "--format", "openvino", "--quant", "int4", "--npu", "--no-verify", "--json",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "openvino"  # NNCF's progress bars kept off stdout
    recipe = json.loads((out / "edgellm.json").read_text())["weight_compression"]
    assert (recipe["bits"], recipe["sym"], recipe["group_size"]) == (4, True, -1)
    bad = subprocess.run([sys.executable, "-m", "edgellm", "convert", str(tiny_model("llama")),
                          "--format", "openvino", "--quant", "int4", "--ratio", "2",
                          "-o", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("edgellm: error:") and "ratio" in bad.stderr
    assert not (tmp_path / "r").exists()


# --- a GGUF file as the source -----------------------------------------------------------


def test_gguf_source_is_dequantized_and_its_tokenizer_checked(tiny_model, tmp_path: Path) -> None:
    hf = tiny_model("llama")
    gguf = edgellm.convert(hf, tmp_path / "gguf", format="gguf", quant="F32").model_file
    art = edgellm.convert(gguf, tmp_path / "ov", format="openvino", quant="fp32", verify_with=hf)
    manifest = json.loads((art.path / "edgellm.json").read_text())
    source = manifest["source"]
    assert source["source_kind"] == "gguf" and source["path"] == str(gguf.resolve())
    assert source["dequantized"]["tokenizer_check"] == {"status": "match", "reference": "llama.cpp",
                                                        "strings": len(PROBE_TEXTS)}
    # F32 GGUF -> dequantized -> fp32 IR computes what the original checkpoint computed
    parity = manifest["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] < 1e-3, parity
    assert not [p.name for p in art.path.iterdir() if p.name.startswith(".")]  # no dequantized copy left
    from edgellm.text.tokenizer import HFTokenizer

    ours, src = HFTokenizer.from_dir(art.path), HFTokenizer.from_dir(hf)
    assert all(ours.encode(t) == src.encode(t) for t in PROBE_TEXTS)


def test_unknown_gguf_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "deepseek-llm", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(errors.ConversionError, match="'deepseek-llm'.*original Hugging Face"):
        write_tokenizer_files(tmp_path, meta, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


# --- calibration (AWQ, scale estimation) --------------------------------------------------


def test_read_calibration(tmp_path: Path) -> None:
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text("first para\nstill first\n\n\nsecond para\n\nthird\n", encoding="utf-8")
    assert read_calibration(paragraphs).samples == ("first para\nstill first", "second para", "third")
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\nthree\n", encoding="utf-8")
    calib = read_calibration(lines, max_samples=2)
    assert calib.samples == ("one", "two") and calib.describe()["samples"] == 2
    (tmp_path / "empty.txt").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(errors.InvalidInputError, match="empty.txt is empty"):
        read_calibration(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe")
    with pytest.raises(errors.InvalidInputError, match=r"bin.txt is not UTF-8 text \(byte 2\)"):
        read_calibration(tmp_path / "bin.txt")
    with pytest.raises(errors.ModelNotFoundError, match="nope.txt"):
        read_calibration(tmp_path / "nope.txt")


def test_calibration_recipes(tmp_path: Path) -> None:
    text = tmp_path / "c.txt"
    text.write_text("a b c\n\nd e f\n", encoding="utf-8")
    calib = read_calibration(text)
    data_aware = recipe_for(SMOLLM2, "int4", calibration=calib)
    assert (data_aware.awq, data_aware.scale_estimation, data_aware.group_size) == (True, True, 64)
    assert data_aware.calibration == {"file": "c.txt", "sha256": calib.sha256, "samples": 2}
    assert recipe_for(SMOLLM2, "int4", calibration=calib, awq=False).awq is False
    with pytest.raises(errors.InvalidInputError, match="--calibration FILE"):
        recipe_for(SMOLLM2, "int4", awq=True)
    with pytest.raises(errors.InvalidInputError, match="only applies to int4.*not int8"):
        recipe_for(SMOLLM2, "int8", calibration=calib)


def test_awq_export_runs_and_is_recorded(tiny_model, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    samples = [f"{i}: {line}" for i, line in enumerate(tiny_models.training_corpus()[:16])]
    text.write_text("\n\n".join(samples), encoding="utf-8")
    art = edgellm.convert(tiny_model("llama"), tmp_path / "awq", format="openvino", quant="int4",
                          calibration=text, verify=False)
    recipe = json.loads((art.path / "edgellm.json").read_text())["weight_compression"]
    assert (recipe["awq"], recipe["scale_estimation"], recipe["calibration"]["samples"]) == (True, True, 16)


# --- NPU static shapes and OpenVINO tokenizer models ---------------------------------------


def test_npu_static_shapes_recorded_and_checked(tiny_model, tmp_path: Path) -> None:
    art = edgellm.convert(tiny_model("llama"), tmp_path / "npu", format="openvino", quant="int4",
                          npu=True, max_prompt_len=96, verify=False)
    manifest = json.loads((art.path / "edgellm.json").read_text())
    assert manifest["npu"] == {"max_prompt_len": 96, "min_response_len": 128}
    with pytest.raises(errors.InvalidInputError, match="only apply with --npu"):
        edgellm.convert(tiny_model("llama"), tmp_path / "x", format="openvino", max_prompt_len=64)
    spec = ModelSpec.from_hf_dir(tiny_model("llama"))
    with pytest.raises(errors.InvalidInputError, match=f"> the model's {spec.max_positions} positions"):
        edgellm.convert(tiny_model("llama"), tmp_path / "y", format="openvino", quant="int4", npu=True,
                        max_prompt_len=spec.max_positions)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_openvino_tokenizer_models_written_when_they_match(tiny_model, tmp_path: Path) -> None:
    require("openvino_tokenizers")
    art = edgellm.convert(tiny_model("qwen3"), tmp_path / "tok", format="openvino", quant="fp16",
                          verify=False)
    status = json.loads((art.path / "edgellm.json").read_text())["openvino_tokenizers"]
    assert status["status"] == "written", status
    import numpy as np
    import openvino as ov

    from edgellm.text.tokenizer import HFTokenizer

    core, hf = ov.Core(), HFTokenizer.from_dir(art.path)
    tok = core.compile_model(art.path / "openvino_tokenizer.xml", "CPU")
    detok = core.compile_model(art.path / "openvino_detokenizer.xml", "CPU")
    text = "Hello wörld 123"
    ids = [int(i) for i in tok([text])["input_ids"][0]]
    assert ids == hf.encode(text)
    assert str(detok(np.asarray([ids], dtype=np.int64))["string_output"][0]) == text


def test_failing_tokenizer_models_leave_nothing_and_say_why(tiny_model, tmp_path: Path, monkeypatch) -> None:
    require("openvino_tokenizers")
    import openvino_tokenizers

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported detokenizer step")

    monkeypatch.setattr(openvino_tokenizers, "convert_tokenizer", broken)
    art = edgellm.convert(tiny_model("llama"), tmp_path / "t", format="openvino", quant="fp16",
                          verify=False)
    status = json.loads((art.path / "edgellm.json").read_text())["openvino_tokenizers"]
    assert status == {"status": "not written", "reason": "unsupported detokenizer step"}
    assert not list(art.path.glob("openvino_*tokenizer*"))


def test_gemma2_export_caveat_is_recorded(tiny_model, tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="edgellm.converters.openvino"):
        art = edgellm.convert(tiny_model("gemma2"), tmp_path / "g2", format="openvino", quant="fp32")
    manifest = json.loads((art.path / "edgellm.json").read_text())
    assert manifest["caveats"] == [EXPORT_CAVEATS["gemma2"]] and "soft-capping" in caplog.text
    assert manifest["parity"]["max_abs_logit_diff"] > 1e-3  # the drift the caveat warns about
