"""``edgellm profile --emulate PROFILE``: a child pinned to the device's cores, stopped past its
budget, and the bandwidth bound on decode speed.

The fake backend's ``resident_bytes_per_token`` makes a KV cache that really grows, so the
out-of-memory verdict lands mid-generation on any host (unit tier).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import psutil
import pytest

from edgellm.cli.main import main
from edgellm.devices.profile import list_profiles, load_profile, profile_from_dict
from edgellm.errors import DeviceProfileError
from edgellm.profiling import emulate as emu
from edgellm.profiling.profile import ProfileReport

MiB = 2**20

BOARD = """\
name = "tiny-board"
description = "a board with little memory"
memory = "4 GiB"
budget = "{budget}"
bandwidth = "10 GB/s"
backends = [["llamacpp", "cpu"]]

[cpu]
arch = "x86_64"
cores = 1
threads = 1
isa = ["avx2"]
"""


@pytest.fixture()
def growing_model(tmp_path: Path) -> Path:
    """A fake model whose cache holds 2 MiB of real memory per token."""
    folder = tmp_path / "growing"
    folder.mkdir()
    (folder / "edgellm.json").write_text(json.dumps({"format": "fake", "files": {"model": "fake.json"}}))
    (folder / "fake.json").write_text(json.dumps({"script": "grow", "resident_bytes_per_token": 2 * MiB}))
    return folder


def _board(folder: Path, budget: str) -> str:
    (folder / "tiny-board.toml").write_text(BOARD.format(budget=budget))
    return "tiny-board"


def test_over_budget_stops_the_child_at_a_token(growing_model: Path, user_devices_dir: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    r = emu.emulate(growing_model, _board(user_devices_dir, "150 MiB"), prompt_tokens=4,
                    gen_tokens=400, backend="fake")
    assert r.oom is not None and r.profile is None
    assert 1 <= r.oom["token"] < 400  # mid-generation: the cache grew past the budget
    assert r.oom["needed_bytes"] > r.oom["budget_bytes"] == 150 * MiB
    assert re.match(r"would run out of memory on tiny-board at token \d+ \(needed 1[5-9]\d\.\d MiB, "
                    r"budget 150\.0 MiB\); pinned to 1 CPU", r.message), r.message
    assert r.pinned_cpus == tuple(sorted(os.sched_getaffinity(0)))[:1]
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before  # the child is gone; this process (the host) carried on


def test_within_budget_gives_the_childs_profile(growing_model: Path, user_devices_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    device = _board(user_devices_dir, "2 GiB")
    code = main(["profile", str(growing_model), "--backend", "fake", "--emulate", device,
                 "--prompt-tokens", "4", "--gen-tokens", "8", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["oom"] is None and data["message"].startswith("fits tiny-board: peak ")
    report = ProfileReport.from_dict(data["profile"])  # the child's report, whole
    assert (report.prompt_tokens, report.gen_tokens) == (4, 8)
    assert [p.name for p in report.phases] == ["load", "prefill", "decode"]
    assert data["peak_rss_bytes"] >= report.peak_rss_bytes
    assert data["decode_upper_bound_tps"] is None and "no estimate" in data["estimate_note"]


def test_cli_emulate_over_budget_is_exit_1(growing_model: Path, user_devices_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    device = _board(user_devices_dir, "150 MiB")
    code = main(["profile", str(growing_model), "--backend", "fake", "--emulate", device,
                 "--prompt-tokens", "4", "--gen-tokens", "400"])
    out = capsys.readouterr().out
    assert code == 1 and "**would run out of memory on tiny-board at token " in out


def test_child_errors_come_back_as_one_line(tmp_path: Path, user_devices_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["profile", str(tmp_path / "missing"), "--emulate", _board(user_devices_dir, "1 GiB")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("edgellm: error: ")
    assert "missing" in err[0] and "Traceback" not in err[0]


def test_unknown_profile_is_refused(growing_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", str(growing_model), "--emulate", "no-such-board"]) == 2
    assert "no-such-board" in capsys.readouterr().err


def test_decode_upper_bound_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgellm.devices import planner
    from edgellm.spec import ModelSpec

    spec = ModelSpec(architecture="llama", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2,
                     head_dim=16, intermediate_size=128, vocab_size=100, max_positions=512)
    monkeypatch.setattr(planner, "describe_model",
                        lambda path: planner.ModelInfo(spec, str(path), "gguf", "Q8_0", 10_000_000))
    total, tps, note = emu.decode_upper_bound("m.gguf", 1e9, "f16", 100)
    assert total == 10_000_000 + 2 * 2 * 2 * 16 * 2 * 100  # weights + K and V of 100 tokens at f16
    assert tps == pytest.approx(1e9 / total)
    assert note.startswith("upper-bound estimate") and "1.0 GB/s" in note
    assert emu.decode_upper_bound("m.gguf", None, "f16", 100)[:2] == (None, None)


# -- bandwidth in the device profiles -------------------------------------------------------------


def test_every_builtin_profile_has_a_sourced_bandwidth() -> None:
    for p in list_profiles():
        if not p.source.endswith(".toml") or "user-devices" in p.source:
            continue
        assert p.memory_bandwidth is not None and 1e9 < p.memory_bandwidth < 1e12, p.name
        line = next(ln for ln in Path(p.source).read_text().splitlines() if ln.startswith("bandwidth"))
        assert "# " in line and "https://" in line, f"{p.name}: cite the datasheet for {line!r}"


@pytest.mark.parametrize(("text", "value"), [("17.1 GB/s", 17.1e9), ("800 MB/s", 8e8), ("1 GiB/s", 2.0**30)])
def test_bandwidth_values(text: str, value: float) -> None:
    data = {"name": "b", "description": "d", "memory": "1 GiB", "budget": "1 GiB", "bandwidth": text,
            "backends": [["llamacpp", "cpu"]], "cpu": {"arch": "x86_64", "cores": 1, "threads": 1, "isa": []}}
    assert profile_from_dict(data).memory_bandwidth == pytest.approx(value)


def test_bad_bandwidth_names_the_field(user_devices_dir: Path) -> None:
    (user_devices_dir / "tiny-board.toml").write_text(BOARD.format(budget="1 GiB").replace(
        '"10 GB/s"', '"fast"'))
    with pytest.raises(DeviceProfileError, match=r'bandwidth = "fast".*17\.1 GB/s'):
        load_profile("tiny-board")


def test_devices_show_prints_the_bandwidth(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "show", "raspberry-pi-5-4gb"]) == 0
    assert "memory bandwidth: 17.1 GB/s (datasheet peak)" in capsys.readouterr().out
