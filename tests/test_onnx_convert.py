"""ONNX conversion with ``exporter="optimum"``: optimum's export of every tiny architecture,
ONNX Runtime's quantizers, external data, GGUF sources, and the recipe edgellm records.

Tolerances (max |logit difference| against transformers' eager attention, logits std ~2.5):
fp32 1e-4 (measured <= 8e-6); fp16 5e-2. int8/int4 on *random* tiny models only check that
the quantized operators are there and parity was measured: random weights have no outliers
to protect, so their agreement says nothing; SmolLM2's numbers are in tests/test_onnx_smollm2.py.
edgellm's own graph builder (the default exporter) is tested in tests/test_onnx_builder.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import edgellm
from edgellm import errors
from edgellm.converters import onnx as onnx_conv
from tests.fixtures import require, tiny_models

require("onnx", "onnxruntime", "optimum.exporters.onnx")

OPTIMUM = {"format": "onnx", "exporter": "optimum"}  # the builder is the default exporter
F32_TOL = 1e-4
F16_TOL = 5e-2


def _manifest(path: Path) -> dict:
    return json.loads((path / "edgellm.json").read_text())


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_fp32_export_matches_transformers(arch: str, tiny_model, tmp_path: Path) -> None:
    art = edgellm.convert(tiny_model(arch), tmp_path / arch, **OPTIMUM, quant="fp32")
    manifest = _manifest(art.path)
    parity = manifest["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] < F32_TOL, parity
    assert parity["greedy_identical"] == parity["n_prompts"]
    graph = manifest["graph"]
    assert graph["contract"] == "optimum-concat/1" and graph["kv"]["past_present_share_buffer"] is False
    assert ("position_ids" in graph["inputs"]) == (not arch.startswith("gemma"))  # Gemma's compute them
    files = manifest["files"]
    assert (files["model"], files["weights"]) == ("model.onnx", [])  # one file below 2 GiB
    assert {"config.json", "tokenizer.json"} <= set(files["tokenizer"])
    assert all((art.path / name).is_file() for name in files["tokenizer"])
    assert not [p.name for p in art.path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("quant", "op", "size_ratio"), [
    ("fp16", None, 0.65), ("int8", "MatMulNBits", 0.6), ("int4", "MatMulNBits", 0.6),
    ("int8-dynamic", "MatMulInteger", 0.75)])
def test_quantized_exports(quant: str, op: str | None, size_ratio: float, tiny_model,
                           tmp_path: Path) -> None:
    fp32 = edgellm.convert(tiny_model("llama"), tmp_path / "fp32", **OPTIMUM, verify=False)
    art = edgellm.convert(tiny_model("llama"), tmp_path / quant, **OPTIMUM, quant=quant)
    manifest = _manifest(art.path)
    assert manifest["quantization"] == quant and manifest["recipe"]["quant"] == quant
    if op:
        assert manifest["operators"][op] > 0
    assert manifest["size_bytes"] < size_ratio * _manifest(fp32.path)["size_bytes"]
    parity = manifest["parity"]
    assert parity["status"] == "measured" and parity["backend"] == "onnxruntime"
    if quant == "fp16":
        assert parity["max_abs_logit_diff"] < F16_TOL and parity["top1_agreement"] >= 0.95


def test_int4_recipe_options(tiny_model, tmp_path: Path) -> None:
    art = edgellm.convert(tiny_model("llama"), tmp_path / "q", **OPTIMUM, quant="int4",
                          block_size=64, sym=True, accuracy_level=0, verify=False)
    assert _manifest(art.path)["recipe"] == {
        "quant": "int4", "method": onnx_conv.ONNX_QUANTS["int4"], "bits": 4, "block_size": 64,
        "sym": True, "accuracy_level": 0, "embeddings": "int4 lm_head and embedding"}
    import onnx

    nodes = [n for n in onnx.load(str(art.model_file)).graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert (attrs["block_size"], attrs["bits"], attrs.get("accuracy_level", 0)) == (64, 4, 0)


def test_recipe_errors() -> None:
    with pytest.raises(errors.UnknownQuantizationError, match="'q4_k_m'.*fp32, fp16, int8, int4"):
        onnx_conv.onnx_recipe("q4_k_m")
    with pytest.raises(errors.InvalidInputError, match=r"block_size must be one of \(32, 64, 128\), got 48"):
        onnx_conv.onnx_recipe("int4", block_size=48)
    with pytest.raises(errors.InvalidInputError, match="accuracy_level"):
        onnx_conv.onnx_recipe("int4", accuracy_level=7)
    with pytest.raises(errors.InvalidInputError, match="only apply to --quant int4 or int8, not fp16"):
        onnx_conv.onnx_recipe("fp16", block_size=32)
    assert onnx_conv.onnx_recipe("INT4").to_dict()["block_size"] == 32
    assert onnx_conv.onnx_recipe("int8").bits == 8 and onnx_conv.onnx_recipe("int8-dynamic").bits is None


def test_external_data_past_the_threshold(tiny_model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_conv, "EXTERNAL_DATA_THRESHOLD", 0)  # as if it were > 2 GiB
    art = edgellm.convert(tiny_model("qwen3"), tmp_path / "ext", **OPTIMUM, quant="fp16")
    manifest = _manifest(art.path)
    assert manifest["files"]["weights"] == [onnx_conv.DATA_FILE]
    data = art.path / onnx_conv.DATA_FILE
    assert data.stat().st_size > (art.path / "model.onnx").stat().st_size
    assert manifest["parity"]["max_abs_logit_diff"] < F16_TOL  # loaded and run from the data file


def test_gguf_source(tiny_model, tmp_path: Path) -> None:
    hf = tiny_model("qwen3")
    gguf = edgellm.convert(hf, tmp_path / "gguf", format="gguf", quant="F32").model_file
    art = edgellm.convert(gguf, tmp_path / "onnx", **OPTIMUM, verify_with=hf)
    manifest = _manifest(art.path)
    assert manifest["source"]["source_kind"] == "gguf"
    assert manifest["source"]["dequantized"]["tokenizer_check"]["status"] == "match"
    assert manifest["parity"]["max_abs_logit_diff"] < 1e-3 and manifest["parity"]["top1_agreement"] == 1.0


def test_refuses_overwrite_and_bad_inputs_leave_nothing(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(errors.OutputExistsError):
        edgellm.convert(tiny_model("llama"), out, **OPTIMUM)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(errors.ModelNotFoundError, match="does not exist"):
        edgellm.convert(tmp_path / "missing", tmp_path / "x", **OPTIMUM)
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"\0" * 16)
    with pytest.raises(errors.InvalidModelError, match="not a model folder or .gguf file"):
        edgellm.convert(bogus, tmp_path / "y", **OPTIMUM)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_export_failure_is_one_line_and_leaves_nothing(tiny_model, tmp_path: Path, monkeypatch) -> None:
    def broken(model, output, **kwargs):
        (Path(output) / "model.onnx").parent.mkdir(parents=True, exist_ok=True)
        (Path(output) / "model.onnx").write_bytes(b"half")
        raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset\nversion 17 is not supported")

    import optimum.exporters.onnx as exporter

    monkeypatch.setattr(exporter, "onnx_export_from_model", broken)
    with pytest.raises(errors.ConversionError) as exc:
        edgellm.convert(tiny_model("llama"), tmp_path / "z", **OPTIMUM)
    assert "\n" not in str(exc.value) and "aten::foo" in str(exc.value)
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".*partial*"))


def test_cli_int4_flags_and_bad_block(tiny_model, tmp_path: Path) -> None:
    src = str(tiny_model("llama"))
    ok = subprocess.run([sys.executable, "-m", "edgellm", "convert", src, "--format", "onnx",
                         "--exporter", "optimum",
                         "--quant", "int4", "--block-size", "128", "--sym", "--no-verify",
                         "-o", str(tmp_path / "q")], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "[INFO]" not in ok.stderr and "pre-processing" not in ok.stderr  # ORT's chatter kept out
    recipe = _manifest(tmp_path / "q")["recipe"]
    assert (recipe["block_size"], recipe["sym"]) == (128, True)
    bad = subprocess.run([sys.executable, "-m", "edgellm", "convert", src, "--format", "onnx",
                         "--exporter", "optimum",
                          "--quant", "int4", "--block-size", "48", "-o", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("edgellm: error:") and "48" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def _transposed_weight_matmuls(graph) -> list[str]:
    """MatMuls whose B input is a Transpose of a stored weight (a tied lm_head, as optimum writes it)."""
    weights = {t.name for t in graph.initializer}
    transposed = {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in transposed]


def test_int4_quantizes_a_tied_lm_head_and_embedding(tiny_model, tmp_path: Path) -> None:
    import onnx

    fp32 = edgellm.convert(tiny_model("qwen3"), tmp_path / "f", **OPTIMUM, verify=False)
    assert _transposed_weight_matmuls(onnx.load(str(fp32.model_file)).graph) == ["/lm_head/MatMul"]
    art = edgellm.convert(tiny_model("qwen3"), tmp_path / "q", **OPTIMUM, quant="int4")
    graph = onnx.load(str(art.model_file)).graph
    assert _transposed_weight_matmuls(graph) == []
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1  # the embedding
    ops = _manifest(art.path)["operators"]
    assert ops["MatMulNBits"] == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert _manifest(art.path)["parity"]["status"] == "measured"
