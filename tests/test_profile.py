"""``edgellm.profile`` and ``edgellm profile``: phases, timeline, breakdown, report folder.

The fake backend covers the shape of everything (unit tier); one SmolLM2 run checks a KV
eviction is seen on the timeline and the planner's prediction is set beside the runtime's
accounting (real tier). Speeds are never asserted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import edgellm
from edgellm.cli.main import main
from edgellm.errors import InvalidInputError
from edgellm.profiling import report as report_mod
from edgellm.profiling.profile import ProfileReport, breakdown, profile

MiB = 2**20


@pytest.fixture()
def fake_model(tmp_path: Path) -> Path:
    folder = tmp_path / "fake-model"
    folder.mkdir()
    (folder / "edgellm.json").write_text(json.dumps({"format": "fake", "files": {"model": "fake.json"}}))
    (folder / "fake.json").write_text(json.dumps({"script": "A reply long enough to profile."}))
    return folder


@pytest.fixture()
def fake_report(fake_model: Path) -> ProfileReport:
    return profile(fake_model, prompt_tokens=20, gen_tokens=12, backend="fake")


def test_profile_is_on_the_public_face() -> None:
    assert edgellm.profile is profile and "profile" in edgellm.__all__


def test_profile_phases_and_counts(fake_report: ProfileReport) -> None:
    r = fake_report
    assert (r.prompt_tokens, r.gen_tokens) == (20, 12)  # exact: the prompt is cut, EOS ignored
    assert [p.name for p in r.phases] == ["load", "prefill", "decode"]
    load, prefill, decode = r.phases
    assert 0.0 == load.start_ms <= load.end_ms <= prefill.start_ms <= prefill.end_ms
    assert prefill.end_ms == decode.start_ms <= decode.end_ms
    assert decode.end_ms <= r.timeline[-1][0]  # the sampler ran past the last phase
    assert len(r.timeline) >= 2 and r.interval_ms <= 10
    assert r.peak_rss_bytes == max(rss for _, rss in r.timeline)
    # the KV probe saw the cache fill up to prompt + generated tokens (the last is not evaluated)
    assert max(n for _, n in r.kv_timeline) == 20 + 12 - 1
    assert r.evictions == ()
    assert r.backend["backend"] == "fake" and r.backend["n_ctx"] == 32


def test_profile_without_planner_says_why(fake_report: ProfileReport) -> None:
    assert "does not size fake" in fake_report.prediction
    rows = fake_report.breakdown
    assert list(rows) == ["weights", "kv", "scratch", "other", "total"]
    assert all(v["predicted"] is None and v["error_pct"] is None for v in rows.values())
    assert rows["total"]["measured"] == fake_report.peak_rss_bytes


def test_breakdown_arithmetic() -> None:
    measured = {"weights": 100 * MiB, "compute": 10 * MiB, "kv": 4 * MiB}
    predicted = {"weights": 100 * MiB, "kv": 5 * MiB, "compute": 20 * MiB, "runtime": 30 * MiB,
                 "tokenizer": 10 * MiB}
    rows = breakdown(measured, 150 * MiB, predicted)
    assert rows["kv"] == {"measured": 4 * MiB, "predicted": 5 * MiB, "error_pct": -20.0}
    assert rows["scratch"]["error_pct"] == -50.0
    assert rows["other"]["measured"] == 36 * MiB and rows["other"]["predicted"] == 40 * MiB
    assert rows["total"] == {"measured": 150 * MiB, "predicted": 165 * MiB,
                             "error_pct": pytest.approx(-100 * 15 / 165)}
    unknown = breakdown({"weights": None, "compute": None, "kv": 4 * MiB}, 150 * MiB, predicted)
    assert unknown["weights"]["measured"] is None and unknown["weights"]["error_pct"] is None
    assert unknown["other"]["measured"] == 146 * MiB  # only what the runtime reported is subtracted


@pytest.mark.parametrize("kwargs", [{"prompt_tokens": 0}, {"gen_tokens": -1}, {"gen_tokens": 2.5},
                                    {"interval_ms": 20}, {"interval_ms": 0}])
def test_profile_rejects_bad_numbers(fake_model: Path, kwargs: dict) -> None:
    with pytest.raises(InvalidInputError):
        profile(fake_model, backend="fake", **kwargs)


def _md_value(md: str, label: str) -> str:
    match = re.search(rf"^\| {re.escape(label)} \| ([^|]+) \|", md, re.M)
    assert match, f"no row {label!r} in\n{md}"
    return match.group(1).strip()


def test_report_folder_md_holds_the_json_numbers(fake_report: ProfileReport, tmp_path: Path) -> None:
    files = report_mod.write_report(fake_report, tmp_path / "out")
    data = json.loads(files.paths["json"].read_text())
    md = files.paths["markdown"].read_text()
    for label, key, unit in (("load", "load_ms", "ms"), ("TTFT", "ttft_ms", "ms"),
                             ("prefill", "prefill_tps", "tok/s"), ("decode", "decode_tps", "tok/s"),
                             ("total (prefill + decode)", "total_ms", "ms")):
        assert _md_value(md, label) == f"{data[key]:.1f} {unit}"
    assert _md_value(md, "peak RSS (sampled)") == f"{data['peak_rss_bytes'] / MiB:.1f} MiB"
    assert _md_value(md, "KV evictions") == str(len(data["evictions"]))
    for phase in data["phases"]:
        assert f"| {phase['name']} | {phase['start_ms']:.1f} | {phase['end_ms']:.1f} |" in md
    total = data["breakdown"]["total"]
    assert f"| total | {total['measured'] / MiB:.1f} MiB | n/a | n/a |" in md
    assert data["prediction"] in md


def test_report_folder_draws_the_phases(fake_report: ProfileReport, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures import require

    require("matplotlib")
    texts: list[str] = []
    import matplotlib.axes

    real_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: texts.append(s) or real_text(self, x, y, s, *a, **k))
    files = report_mod.write_report(fake_report, tmp_path / "out")
    png = files.paths["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files.note is None
    assert texts == ["load", "prefill", "decode"]
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary left behind


def test_report_folder_without_matplotlib(fake_report: ProfileReport, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_mod, "has_matplotlib", lambda: False)
    files = report_mod.write_report(fake_report, tmp_path / "out")
    assert set(files.paths) == {"json", "markdown"} and not (tmp_path / "out" / "memory.png").exists()
    assert files.note == report_mod.PLOT_HINT and "edgellm[plot]" in files.note


def test_cli_profile_json_and_report(fake_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(report_mod, "has_matplotlib", lambda: False)
    code = main(["profile", str(fake_model), "--backend", "fake", "--prompt-tokens", "8",
                 "--gen-tokens", "4", "--json", "--report", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["prompt_tokens"] == 8 and data["gen_tokens"] == 4
    assert json.loads((tmp_path / "r" / "profile.json").read_text())["gen_tokens"] == 4
    assert report_mod.PLOT_HINT in err


def test_cli_profile_report_on_a_file_is_exit_2(fake_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    code = main(["profile", str(fake_model), "--backend", "fake", "--gen-tokens", "2",
                 "--report", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("edgellm: error: --report") and str(target) in err[0] and "folder" in err[0]


def test_profile_smollm2_sees_eviction_and_prediction(smollm2_gguf: Path) -> None:
    # 4 MiB of f16 KV holds 182 SmolLM2 tokens: 128 + 96 overflow once and slide
    r = profile(smollm2_gguf, prompt_tokens=128, gen_tokens=96, kv_budget="4MiB", threads=1)
    assert len(r.evictions) >= 1
    e = r.evictions[0]
    assert e["tokens_after"] < e["tokens_before"] <= 182
    decode = r.phases[2]
    assert decode.start_ms <= e["t_ms"] <= decode.end_ms + r.max_gap_ms
    assert r.prediction.startswith("planner: gguf Q4_1 on llamacpp:cpu")
    rows = r.breakdown
    assert rows["weights"]["measured"] == rows["weights"]["predicted"]  # both llama.cpp's tensor bytes
    assert all(rows[k]["error_pct"] is not None for k in ("kv", "total"))
