"""The file fuzzer's short form in the unit tier: 30 mutated files of the tiny GGUF and the tiny
safetensors checkpoint, each opened in a worker subprocess. The long run is
``python -m tests.fuzz.run --cases 1000`` (outside the default pytest run)."""

from __future__ import annotations

from tests.fuzz.run import run_fuzz


def test_thirty_mutated_files_no_crash_no_hang_no_raw_exception(tiny_model) -> None:
    report = run_fuzz(30, seed=13, targets=["tiny-gguf", "safetensors"], timeout_s=30,
                      hf_seed=tiny_model("llama"))
    totals = report["totals"]
    assert totals["crash"] == totals["hang"] == totals["raw"] == totals["multiline"] == 0, report["findings"]
    assert totals["ok"] + totals["edgellm"] == 30
    assert totals["edgellm"] > 0 and totals["ok"] > 0  # both paths exercised: refusals and loads
