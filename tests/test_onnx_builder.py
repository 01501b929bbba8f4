"""edgellm's ONNX graph builder: every tiny architecture against transformers, the features the
fused operators must express, the in-place KV binding, the manifest's graph record, and the
promise that a builder conversion never imports torch.

Tolerance: max |logit difference| <= 1e-3 against transformers float32 eager attention
(logits std ~2.5; measured about 1e-5 on every architecture). Each architecture's figure is
attached to its test as the ``max_abs_logit_diff`` property (``--junitxml`` shows it).
int4/int8 on random tiny models only check the operators and that parity was measured;
SmolLM2's numbers are in tests/test_onnx_smollm2.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm import errors
from edgellm.converters import onnx as onnx_conv
from edgellm.runtimes.base import RuntimeOptions
from tests.fixtures import require, tiny_models, top_modules_after

require("onnx", "onnxruntime")

TOL = 1e-3
BUILDER = {"format": "onnx", "exporter": "builder"}


def _open(art, **kw):
    """An engine and one session, opened the way the registry opens any ONNX artifact."""
    from edgellm.runtimes.base import open_runtime

    options = RuntimeOptions(n_ctx=kw.pop("n_ctx", 128), threads=2, extra=kw)
    return open_runtime(art.model_file, "onnx", options)


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_fp32_builder_matches_transformers(arch: str, tiny_model, tmp_path: Path, record_property) -> None:
    art = edgellm.convert(tiny_model(arch), tmp_path / arch, format="onnx", quant="fp32")
    m = art.manifest
    parity = m["parity"]
    record_property("max_abs_logit_diff", parity["max_abs_logit_diff"])
    assert m["exporter"] == "builder" and m["graph"]["contract"] == "gqa-shared-kv/1"
    assert parity["max_abs_logit_diff"] <= TOL and parity["top1_agreement"] == 1.0, parity
    assert parity["greedy_identical"] == parity["n_prompts"] == 5
    assert m["operators"]["GroupQueryAttention"] == 2 and "MatMulNBits" not in m["operators"]
    assert m["graph"]["kv"]["past_present_share_buffer"] is True
    names = {p.name for p in art.path.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.startswith(".")]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prefill_chunks_tokens_and_trim_agree(arch: str, tiny_model, tmp_path: Path) -> None:
    art = edgellm.convert(tiny_model(arch), tmp_path / arch, verify=False, **BUILDER)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 600, 40)]
    ref = tiny_models.reference_logits(tiny_model(arch), ids)
    rt = _open(art, n_batch=7)  # prefill runs in chunks of 7 tokens
    try:
        assert np.abs(rt.forward(ids, all_logits=True) - ref).max() <= TOL
        rt.reset()
        steps = [rt.forward(ids[:5], all_logits=True)] + [rt.forward([t], all_logits=True) for t in ids[5:]]
        assert np.abs(np.concatenate(steps) - ref).max() <= TOL
        rt.trim(20)  # drop the last 20 positions in place, then take them again
        assert rt.n_past == 20 and np.abs(rt.forward(ids[20:]) - ref[-1]).max() <= TOL
        spec, cache = rt.spec, rt.cache
        one_copy = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * 4  # K and V, f32, once
        assert type(rt.engine).__name__ == "GQAEngine" and rt.info()["kv_shared_buffer"] is True
        assert rt.engine.kv_bytes_per_token() == cache.bytes_per_token == one_copy
        assert cache.capacity_bytes == 128 * one_copy and cache.held_bytes() == 40 * one_copy
        state = rt.session.save_state()
        rt.reset()
        rt.session.load_state(state, 40)  # a snapshot brings the same next logits back
        assert np.abs(rt.forward([ids[0]]) - rt_logits_after(art, ids + [ids[0]])).max() <= TOL
    finally:
        rt.close()
    with pytest.raises(errors.InvalidInputError, match="closed"):
        rt.forward([1])


def rt_logits_after(art, ids: list[int]) -> np.ndarray:
    rt = _open(art)
    try:
        return rt.forward(ids)
    finally:
        rt.close()


#: Features the tiny fixtures leave unused, each switched on against transformers.
FEATURES = {
    "mistral-sliding": ("mistral", {"sliding_window": 8}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
    "gemma2-sliding": ("gemma2", {"sliding_window": 8}),
    "gemma3-local-and-global": ("gemma3", {"sliding_window": 8, "sliding_window_pattern": 2}),
    "llama3-rope": ("llama", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "phi3-longrope": ("phi3", {"original_max_position_embeddings": 32, "rope_scaling": {
        "type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0],
        "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0]}}),
}


@pytest.mark.parametrize("case", FEATURES)
def test_features_against_transformers(case: str, tmp_path: Path) -> None:
    arch, overrides = FEATURES[case]
    src = tiny_models.build_tiny_model(arch, tmp_path / "hf", config_overrides=overrides)
    art = edgellm.convert(src, tmp_path / "onnx", verify=False, **BUILDER)
    rt = _open(art)
    try:
        for n in (20, 40):  # longrope switches tables past 32 positions; windows of 8 slide
            ids = list(range(3, 3 + n))
            rt.reset()
            ref = tiny_models.reference_logits(src, ids)
            assert np.abs(rt.forward(ids, all_logits=True) - ref).max() <= TOL
        if case != "phi3-longrope":  # token by token (longrope re-rotates nothing, as transformers' cache)
            rt.reset()
            steps = [rt.forward([t], all_logits=True) for t in ids]
            assert np.abs(np.concatenate(steps) - tiny_models.reference_logits(src, ids)).max() <= TOL
    finally:
        rt.close()
    features = art.manifest["builder"]
    if "sliding" in case or "local" in case:
        assert features["sliding_layers"] and features["sliding_window"] == 8


@pytest.mark.parametrize(("quant", "quantized_embedding", "size_ratio"), [("int4", 1, 0.6), ("int8", 0, 0.9)])
def test_quantized_graphs(quant: str, quantized_embedding: int, size_ratio: float, tiny_model,
                          tmp_path: Path) -> None:
    fp32 = edgellm.convert(tiny_model("qwen3"), tmp_path / "fp32", verify=False, **BUILDER)
    art = edgellm.convert(tiny_model("qwen3"), tmp_path / quant, quant=quant, **BUILDER)
    ops = art.manifest["operators"]
    assert ops["MatMulNBits"] == 2 * 4 + 1  # fused qkv, o, fused gate/up, down per layer; lm_head
    assert ops.get("GatherBlockQuantized", 0) == quantized_embedding and "MatMul" not in ops
    assert art.manifest["size_bytes"] < size_ratio * fp32.manifest["size_bytes"]
    assert art.manifest["parity"]["status"] == "measured"
    recipe = art.manifest["recipe"]
    assert recipe["bits"] == int(quant[-1]) and recipe["method"].startswith("edgellm graph builder")


def test_genai_config_names_the_graph(tiny_model, tmp_path: Path) -> None:
    art = edgellm.convert(tiny_model("phi3"), tmp_path / "p", verify=False, **BUILDER)
    config = json.loads((art.path / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "phi3" and decoder["filename"] == "model.onnx"
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert config["search"]["past_present_share_buffer"] is True
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)


def test_exporter_choice_and_refusals(tiny_model) -> None:
    from edgellm.spec import ModelSpec, read_hf_config

    cfg = read_hf_config(tiny_model("phi3"))
    spec = ModelSpec.from_hf_config(cfg)
    assert onnx_conv.choose_exporter(None, spec, "int4", cfg) == "builder"
    assert onnx_conv.choose_exporter(None, spec, "fp16", cfg) == "optimum"
    assert onnx_conv.choose_exporter("optimum", spec, "fp32", cfg) == "optimum"
    with pytest.raises(errors.InvalidInputError, match="'fp16' is not one the builder writes"):
        onnx_conv.choose_exporter("builder", spec, "fp16", cfg)
    with pytest.raises(errors.InvalidInputError, match="unknown ONNX exporter 'torch'.*builder, optimum"):
        onnx_conv.choose_exporter("torch", spec, "fp32", cfg)
    partial = {**cfg, "partial_rotary_factor": 0.5}
    assert onnx_conv.choose_exporter(None, spec, "fp32", partial) == "optimum"
    with pytest.raises(errors.InvalidInputError, match="partial_rotary_factor 0.5"):
        onnx_conv.choose_exporter("builder", spec, "fp32", partial)
    yarn = {**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(errors.InvalidInputError, match="rope_scaling type 'yarn'"):
        onnx_conv.choose_exporter("builder", spec, "fp32", yarn)


def test_default_falls_back_to_optimum_and_says_why(tiny_model, tmp_path: Path) -> None:
    require("optimum.exporters.onnx")
    art = edgellm.convert(tiny_model("llama"), tmp_path / "f16", format="onnx", quant="fp16", verify=False)
    m = art.manifest
    assert m["exporter"] == "optimum" and m["graph"]["contract"] == "optimum-concat/1"
    assert "quantization 'fp16' is not one the builder writes" in m["exporter_why"]


def test_runtime_binds_by_the_record_only(tiny_model, tmp_path: Path) -> None:
    art = edgellm.convert(tiny_model("llama"), tmp_path / "l", verify=False, **BUILDER)
    manifest_path = art.path / "edgellm.json"
    manifest = json.loads(manifest_path.read_text())
    with pytest.raises(errors.InvalidInputError, match="n_ctx 1000 is beyond the 512 positions"):
        _open(art, n_ctx=1000)
    manifest["graph"]["kv"]["past_key"] = "past.%d.k"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(errors.InvalidModelError, match="does not match its manifest record.*'past.0.k'"):
        _open(art)
    manifest["graph"]["contract"] = "gqa-shared-kv/9"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(errors.InvalidModelError, match="graph contract 'gqa-shared-kv/9'.*upgrade edgellm"):
        _open(art)
    from edgellm.runtimes.ort_gqa import GQAEngine

    manifest["graph"]["contract"] = "optimum-concat/1"
    with pytest.raises(errors.InvalidModelError, match="graph contract 'optimum-concat/1' is not one"):
        GQAEngine(art.model_file, RuntimeOptions(), manifest["graph"])


def test_missing_tensor_is_one_line_and_leaves_nothing(tiny_model, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "broken"
    src.mkdir()
    for p in tiny_model("llama").iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(errors.ConversionError, match="'model.layers.1.mlp.up_proj.weight' is missing") as exc:
        edgellm.convert(src, tmp_path / "out", verify=False, **BUILDER)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_builder_conversion_never_imports_torch(source: str, tiny_model, tmp_path: Path) -> None:
    src = tiny_model("gemma3")
    if source == "gguf":  # Q8_0: gguf-py dequantizes on read
        src = _gguf(src, tmp_path / "g", "Q8_0")
    code = (f"import edgellm; a = edgellm.convert({str(src)!r}, {str(tmp_path / 'o')!r}, "
            "format='onnx', quant='int4', verify=False); assert a.manifest['exporter'] == 'builder'; "
            f"assert a.manifest['source']['source_kind'] == {source!r}")
    modules = top_modules_after(code)
    assert "onnx" in modules and not modules & {"torch", "transformers", "optimum", "accelerate"}


def _gguf(hf: Path, out: Path, quant: str = "F32") -> Path:
    return edgellm.convert(hf, out, format="gguf", quant=quant, verify=False).model_file


def _without_torch(code: str) -> str:
    """``code`` in a process where torch and transformers cannot be imported."""
    return f"import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n{code}"


def test_gguf_parity_without_torch_is_against_llamacpp_on_the_gguf(tiny_model, tmp_path: Path) -> None:
    require("llama_cpp")
    gguf = _gguf(tiny_model("qwen2"), tmp_path / "g")
    code = (f"import edgellm; p = edgellm.convert({str(gguf)!r}, {str(tmp_path / 'o')!r}, format='onnx', "
            "quant='fp32').manifest['parity']; "
            "assert (p['status'], p['reference_by']) == ('measured', 'llama.cpp'), p; "
            f"assert p['reference'] == {str(gguf)!r}, p; "
            "assert p['top1_agreement'] >= 0.98 and p['max_abs_logit_diff'] < 0.1, p")
    assert "llama_cpp" in top_modules_after(_without_torch(code))


def test_gguf_parity_with_no_reference_says_why(tiny_model, tmp_path: Path) -> None:
    gguf = _gguf(tiny_model("llama"), tmp_path / "g")
    code = ("sys.modules['llama_cpp'] = None\nimport edgellm; "
            f"p = edgellm.convert({str(gguf)!r}, {str(tmp_path / 'o')!r}, format='onnx', quant='fp32')"
            ".manifest['parity']; assert p['status'] == 'skipped', p; "
            "assert 'transformers' in p['reason'] and 'llama.cpp could not run' in p['reason'], p")
    top_modules_after(_without_torch(code))


def test_tensor_shape_against_config_is_checked_first(tiny_model, tmp_path: Path) -> None:
    src = tmp_path / "wrong"
    src.mkdir()
    for p in tiny_model("qwen2").iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96  # the checkpoint's MLP is 128 wide
    (src / "config.json").write_text(json.dumps(config))
    wrong = r"model.safetensors: tensor 'model.layers.0.mlp.[\w.]+' has shape \[.*128.*\] but config.json"
    with pytest.raises(errors.ConversionError, match=wrong + r" implies \[.*96.*\]"):
        edgellm.convert(src, tmp_path / "out", verify=False, **BUILDER)
    assert not (tmp_path / "out").exists()


def test_gguf_source_is_read_directly_and_parity_uses_the_given_reference(tiny_model, tmp_path: Path) -> None:
    """The builder reads a GGUF's tensors itself: no float checkpoint is written for it."""
    hf = tiny_model("qwen3")
    gguf = edgellm.convert(hf, tmp_path / "gguf", format="gguf", quant="F32").model_file
    art = edgellm.convert(gguf, tmp_path / "onnx", verify_with=hf, **BUILDER)
    m = art.manifest
    assert m["source"]["source_kind"] == "gguf" and m["exporter"] == "builder"
    assert "dtype" not in m["source"]["dequantized"]  # config and tokenizer only: no weights written
    assert m["source"]["dequantized"]["weights"].startswith("not written")
    assert m["parity"]["reference"] == str(hf) and m["parity"]["reference_by"] == "transformers"
    assert m["parity"]["max_abs_logit_diff"] <= TOL and m["parity"]["top1_agreement"] == 1.0
    assert not [p.name for p in art.path.iterdir() if p.name.startswith(".")]  # no dequantized copy left


def test_gguf_parity_with_torch_is_transformers_on_the_dequantized_gguf(tiny_model, tmp_path: Path) -> None:
    art = edgellm.convert(_gguf(tiny_model("gemma2"), tmp_path / "g", "Q8_0"), tmp_path / "o", **BUILDER)
    m = art.manifest
    assert m["parity"]["reference_by"] == "transformers"
    assert "dequantized by edgellm" in m["parity"]["reference"]
    assert m["source"]["dequantized"]["dtype"] == "float32"  # written for the reference only, then removed
    # the GGUF's own (dequantized) weights, so fp32 logits match to float32 rounding
    assert m["parity"]["max_abs_logit_diff"] <= TOL and m["parity"]["top1_agreement"] == 1.0, m["parity"]
    assert not [p.name for p in art.path.iterdir() if p.name.startswith(".")]


def test_builder_sessions_shift_like_llamacpp(tiny_model, tmp_path: Path) -> None:
    from tests.fixtures import session_checks

    art = edgellm.convert(tiny_model("llama"), tmp_path / "b", format="onnx", quant="fp32", verify=False)

    def load(**kw: object):  # type: ignore[no-untyped-def]
        return edgellm.load(art.path, backend="onnxruntime", device="cpu", threads=1, **kw)

    assert session_checks.check_sliding(load)["shift"]  # one in-place buffer, keys re-rotated
    session_checks.check_shift_matches_llamacpp(load, tiny_model("llama"), tmp_path)
    session_checks.check_save_restore(load, tmp_path)
    session_checks.check_trim_equals_recompute(load)
