"""Thread counts: explicit is exact, $EDGELLM_THREADS next, "auto" from the cores free now.

The idle measurement is replaced by fixed numbers: what is tested is the arithmetic and the
knobs each backend gets for an automatic count. Speeds are measured in
benchmarks/bench_contention.py, never here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import edgellm
from edgellm.cli.main import main
from edgellm.errors import InvalidInputError
from edgellm.runtimes import threads as th
from edgellm.runtimes.base import RuntimeOptions


@pytest.fixture()
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(th.THREADS_ENV, raising=False)  # conftest sets 1 for the suite
    return monkeypatch


def _host(monkeypatch: pytest.MonkeyPatch, idle: float, usable: int, logical: int, physical: int) -> None:
    monkeypatch.setattr(th, "free_cores", lambda window_s=th.IDLE_WINDOW_S: (idle, usable))
    monkeypatch.setattr(th, "cpu_counts", lambda: (logical, physical))
    monkeypatch.setattr(th, "max_threads", lambda: 8)  # explicit counts up to 8 are allowed


@pytest.mark.parametrize(("idle", "usable", "logical", "physical", "expected"), [
    (2.0, 2, 2, 2, 2),    # quiet 2-core machine: every core
    (1.0, 2, 2, 2, 1),    # one busy peer on 2 cores: one thread (DESIGN.md: 85 vs 11 tok/s)
    (1.6, 2, 2, 2, 2),    # a peer using 40% of a core leaves it mostly free
    (0.05, 2, 2, 2, 1),   # everything busy: still one thread
    (8.0, 8, 8, 4, 4),    # hyper-threads: physical cores only
    (4.0, 8, 8, 4, 2),    # half the CPUs idle on a hyper-threaded 4-core: 2 threads
    (2.0, 2, 8, 4, 1),    # pinned to 2 logical CPUs of a 4-core/8-thread part: one core's worth
])
def test_auto_counts(no_env: pytest.MonkeyPatch, idle: float, usable: int, logical: int,
                     physical: int, expected: int) -> None:
    _host(no_env, idle, usable, logical, physical)
    choice = th.choose_threads("auto")
    assert choice.count == expected and choice.auto
    assert f"{idle:.1f} of {usable} CPUs idle" in choice.reason
    assert th.choose_threads(None).count == expected


def test_explicit_and_env_are_exact(no_env: pytest.MonkeyPatch) -> None:
    _host(no_env, 0.0, 2, 2, 2)
    assert th.choose_threads(7) == th.ThreadChoice(7, False, "asked for")
    no_env.setenv(th.THREADS_ENV, "3")
    assert th.choose_threads("auto") == th.ThreadChoice(3, False, "$EDGELLM_THREADS")
    assert th.choose_threads(5).count == 5  # an explicit count beats the environment
    no_env.setenv(th.THREADS_ENV, "auto")
    assert th.choose_threads(None).auto
    assert RuntimeOptions(threads=2).thread_choice() == th.ThreadChoice(2, False, "asked for")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "two", ""])
def test_bad_thread_values(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="is not a usable thread count"):
        th.parse_threads(bad)


def test_bad_env_value(no_env: pytest.MonkeyPatch) -> None:
    no_env.setenv(th.THREADS_ENV, "many")
    with pytest.raises(InvalidInputError, match="EDGELLM_THREADS='many'"):
        th.choose_threads()


def test_free_cores_reads_the_usable_cpus() -> None:
    idle, usable = th.free_cores(0.05)
    assert 0.0 <= idle <= usable and usable >= 1


def test_load_refuses_bad_threads_before_loading(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="threads=0 is not a usable thread count"):
        edgellm.load(tmp_path / "missing", threads=0)


def test_cli_threads_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "m"), "hi", "--threads", "zero"]) == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_onnxruntime_stops_spinning_for_auto() -> None:
    from tests.fixtures import require

    require("onnxruntime")
    from edgellm.runtimes.onnxruntime import session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2, spin=False).get_session_config_entry(key) == "0"
    with pytest.raises(Exception, match="does not have configuration"):
        session_options(2).get_session_config_entry(key)  # left to ORT's default (spinning)


def test_contended_means_other_work_held_cores_at_load() -> None:
    from edgellm.runtimes.threads import ThreadChoice

    assert not ThreadChoice(2, True, "2 of 2 cores idle", 2).contended  # ORT spins, as a fixed count
    assert ThreadChoice(1, True, "1 of 2 cores idle", 2).contended  # ORT never spins
    assert not ThreadChoice(2, False, "asked for").contended  # an explicit count is left to ORT


def test_openvino_unpins_for_auto() -> None:
    from tests.fixtures import require

    require("openvino")
    from edgellm.runtimes.openvino import build_properties

    assert build_properties("CPU", 1, {}, None, shared=True)["ENABLE_CPU_PINNING"] == "NO"
    assert "ENABLE_CPU_PINNING" not in build_properties("CPU", 1, {}, None)
    assert "ENABLE_CPU_PINNING" not in build_properties("GPU", 1, {}, None, shared=True)


# -- ThreadTuner: the count follows the other work while decoding ------------------------------


class _Clock:
    """Scripted /proc/stat readings: each check, others took ``others`` cores over 1 s."""

    def __init__(self, usable: int = 2) -> None:
        self.busy, self.own, self.wall, self.usable = 0.0, 0.0, 0.0, usable

    def advance(self, others: float, own: float = 1.0) -> None:
        self.busy += others + own
        self.own += own
        self.wall += 1.0

    def read(self) -> tuple[list[float], float, float]:
        return [self.busy / self.usable] * self.usable, self.own, self.wall


def _tuner(monkeypatch: pytest.MonkeyPatch, clock: _Clock, current: int) -> tuple[th.ThreadTuner, list[int]]:
    monkeypatch.setattr(th, "_counters", clock.read)
    monkeypatch.setattr(th, "cpu_counts", lambda: (clock.usable, clock.usable))
    applied: list[int] = []
    return th.ThreadTuner([1, 2], current, applied.append), applied


def _steps(tuner: th.ThreadTuner, clock: _Clock, others: float, n: int, seconds: float = 0.01) -> None:
    for _ in range(n):
        if (tuner._steps + 1) % tuner.CHECK_STEPS == 0:
            clock.advance(others)
        tuner.observe(seconds)


def test_tuner_drops_to_one_thread_when_a_peer_gets_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    tuner, applied = _tuner(monkeypatch, clock, current=2)
    _steps(tuner, clock, others=0.0, n=64)
    assert applied == [] and tuner.current == 2  # quiet: stays
    _steps(tuner, clock, others=1.0, n=16)
    assert applied == []  # one check is not enough: no flapping on a blip
    _steps(tuner, clock, others=1.0, n=16)
    assert applied == [1] and tuner.current == 1  # at once: fewer threads are never a trial
    _steps(tuner, clock, others=0.1, n=32)
    assert applied == [1]  # more threads only from step FIRST_TRIAL (a short reply keeps its count)
    _steps(tuner, clock, others=0.1, n=tuner.FIRST_TRIAL - 96 + 32)
    assert applied == [1, 2]  # the peer stopped: back to both cores
    assert [h[2] for h in tuner.history][-1] == 2


def test_tuner_ignores_alternating_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    tuner, applied = _tuner(monkeypatch, clock, current=2)
    for others in (1.0, 0.0) * 4:
        _steps(tuner, clock, others=others, n=16)
    assert applied == []


def test_tuner_checks_early_when_steps_slow_down(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    tuner, _ = _tuner(monkeypatch, clock, current=2)
    _steps(tuner, clock, others=0.0, n=10, seconds=0.01)  # a baseline, no check due yet
    assert tuner._checked == 0
    clock.advance(1.0)
    for _ in range(tuner.WINDOW):
        tuner.observe(0.05)  # 5x slower: a check before the 16th step
    assert 0 < tuner._checked < tuner.CHECK_STEPS


def test_only_an_automatic_count_is_tuned() -> None:
    assert th.ThreadChoice(2, False, "asked for", 2).tuner(print) is None
    assert th.ThreadChoice(1, True, "auto", 1).tuner(print) is None  # one core: nothing to tune
    assert isinstance(th.ThreadChoice(1, True, "auto", 2).tuner(lambda n: None), th.ThreadTuner)


def test_decode_steps_reach_the_tuner(tmp_path: Path) -> None:
    import json

    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "edgellm.json").write_text(json.dumps({"format": "fake", "files": {"model": "f.json"}}))
    (folder / "f.json").write_text(json.dumps({"script": "some words to decode"}))
    seen: list[float] = []
    with edgellm.load(folder, backend="fake") as model:
        model.engine.tuner = type("Stub", (), {"observe": lambda self, s: seen.append(s)})()
        r = model.generate("hi", max_tokens=6, temperature=0, ignore_eos=True)
    assert len(seen) == r.completion_tokens - 1 == 5  # one per one-token step after the first
    assert all(s >= 0 for s in seen)


def test_more_threads_are_a_trial_undone_when_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    tuner, applied = _tuner(monkeypatch, clock, current=1)
    _steps(tuner, clock, others=0.0, n=tuner.FIRST_TRIAL + 16, seconds=0.013)  # idle: checks agree on 2
    assert applied == [2]
    for _ in range(tuner.TRIAL_STEPS):
        tuner.observe(0.110)  # 2 threads collapse (as llama.cpp did here: 9 tok/s against 78)
    assert applied == [2, 1] and tuner.current == 1 and tuner.history[-1][1] == -1.0
    _steps(tuner, clock, others=0.0, n=tuner.BACKOFF - 16, seconds=0.013)
    assert applied == [2, 1]  # no second try during the backoff
    _steps(tuner, clock, others=0.0, n=64, seconds=0.013)
    assert applied == [2, 1, 2]  # tried again after it
    for _ in range(tuner.TRIAL_STEPS):
        tuner.observe(0.008)  # faster now: kept
    assert applied == [2, 1, 2] and tuner.current == 2 and tuner._backoff == tuner.BACKOFF
