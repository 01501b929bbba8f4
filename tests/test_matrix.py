"""``edgellm bench --matrix``: rows per format x quantization x backend, kept per host, used by plans.

A tiny llama (hidden 64, 2 layers) keeps this in the unit tier: two real rows (GGUF Q8_0 on
llama.cpp, ONNX int8 on ONNX Runtime) and one row that must fail with its reason. Speeds are
never asserted, only that they were measured and that the plan follows the faster one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgellm.cli.main import main
from edgellm.converters.provenance import source_fingerprint
from edgellm.devices import measured
from edgellm.devices.planner import host_profile, plan
from edgellm.profiling.matrix import MATRIX, MatrixReport, bench_matrix

ROWS = (("gguf", "Q8_0"), ("onnx", "int8"), ("gguf", "Q9_NOPE"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache folder for the module: the matrix is converted and measured once."""
    folder = tmp_path_factory.mktemp("matrix-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELLM_CACHE", str(folder))
        mp.setenv(measured.MEASURED_ENV, str(folder / "measured"))
        yield folder


@pytest.fixture(scope="module")
def matrix(tiny_model: Callable[..., Path], cache: Path) -> MatrixReport:
    return bench_matrix(tiny_model("llama"), ROWS, max_tokens=8, repeats=1)


def test_the_default_matrix_covers_the_issue() -> None:
    assert set(MATRIX) >= {("gguf", "Q8_0"), ("gguf", "Q4_K_M"), ("openvino", "int8"),
                           ("openvino", "int4"), ("onnx", "int8"), ("onnx", "int4")}


def test_matrix_rows(matrix: MatrixReport, cache: Path) -> None:
    good = [r for r in matrix.rows if "error" not in r]
    assert {(r["format"], r["backend"]) for r in good} == {("gguf", "llamacpp"), ("onnx", "onnxruntime")}
    for r in good:
        assert r["decode_tps"] > 0 and r["ttft_ms"] > 0 and r["peak_rss_bytes"] > 0
        assert r["size_bytes"] == sum(p.stat().st_size for p in Path(r["artifact"]).rglob("*") if p.is_file())
        assert 0.0 <= r["top1"] <= 1.0  # measured against the source by the conversion
        assert r["source"] == matrix.source_fingerprint and r["device"] == "cpu"
    bad = [r for r in matrix.rows if "error" in r]
    assert len(bad) == 1 and bad[0]["quantization"] == "Q9_NOPE" and "Q9_NOPE" in bad[0]["error"]
    md = matrix.to_markdown()
    assert "| gguf | Q8_0 | llamacpp |" in md and "failed: conversion failed" in md
    folder = Path(matrix.folder)
    written = json.loads((folder / "matrix.json").read_text())
    assert written["rows"] == json.loads(json.dumps(matrix.to_dict()))["rows"]
    assert (folder / "matrix.md").read_text() == md
    assert Path(matrix.store) == measured.store_path() and str(cache) in matrix.store


def test_plans_here_follow_the_measured_speed(matrix: MatrixReport, tiny_model: Callable[..., Path]) -> None:
    good = {(r["format"], r["backend"]): r for r in matrix.rows if "error" not in r}
    fastest = max(good.values(), key=lambda r: r["decode_tps"])
    choice = plan(tiny_model("llama"), host_profile()).choice
    assert choice is not None and (choice.format, choice.backend) == (fastest["format"], fastest["backend"])
    assert choice.quantization.lower() == fastest["quantization"].lower()
    assert f"fastest measured on this host: {fastest['decode_tps']:.1f} tok/s decode" in choice.reason
    # an artifact of the matrix: its plan cites its own measurement
    art = plan(good[("gguf", "llamacpp")]["artifact"], host_profile(["gguf"])).choice
    assert art is not None and "fastest measured on this host" in art.reason


def test_another_host_ignores_the_measurements(matrix: MatrixReport, tiny_model: Callable[..., Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measured, "host_key", lambda: "some-other-host")
    choice = plan(tiny_model("llama"), host_profile()).choice
    assert choice is not None and "measured" not in choice.reason


def test_damaged_store_is_ignored(tmp_path: Path, tiny_model: Callable[..., Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(measured.MEASURED_ENV, str(tmp_path))
    measured.store_path().parent.mkdir(parents=True, exist_ok=True)
    measured.store_path().write_text("{not json")
    choice = plan(tiny_model("llama"), host_profile()).choice
    assert choice is not None and "measured" not in choice.reason


def test_cli_matrix_refuses_a_non_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["bench", "--matrix", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgellm: error: ") and "empty" in err[0]


@pytest.mark.parametrize(("int4_top1", "chosen"), [(0.70, ("gguf", "Q8_0")), (0.95, ("onnx", "int4"))])
def test_speed_does_not_buy_a_large_quality_loss(int4_top1: float, chosen: tuple[str, str], tmp_path: Path,
                                                 tiny_model: Callable[..., Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The fastest measured row is chosen only when its top-1 is within TOP1_TOLERANCE of the best."""
    monkeypatch.setenv(measured.MEASURED_ENV, str(tmp_path))
    src = tiny_model("llama")
    source = source_fingerprint(src)["fingerprint"]
    common = {"source": source, "device": "cpu", "ttft_ms": 10.0, "measured_at": "2026-11-30",
              "kv_precision": None}
    measured.record([{**common, "format": "onnx", "quantization": "int4", "backend": "onnxruntime",
                      "decode_tps": 180.0, "top1": int4_top1},
                     {**common, "format": "gguf", "quantization": "Q8_0", "backend": "llamacpp",
                      "decode_tps": 110.0, "top1": 0.98}])
    result = plan(src, host_profile())
    choice = result.choice
    assert choice is not None and (choice.format, choice.quantization) == chosen
    assert "fastest measured on this host" in choice.reason
    int4 = next(c for c in result.candidates if (c.format, c.quantization) == ("onnx", "int4"))
    if chosen[0] == "gguf":
        assert f"top-1 agreement {int4_top1:.3f} is more than {measured.TOP1_TOLERANCE} below the best " \
               "measured here (0.980)" in int4.reason
