"""The test tiers (tests/fixtures/tiers.py): a test lands in its tier by what it uses.

Each case runs pytest in-process on a small suite of its own, where ``smollm2_gguf`` is a
stand-in fixture with the real one's name (nothing is loaded).
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest

pytest_plugins = ["tests.fixtures.tiers"]


@pytest.fixture
def smollm2_gguf():
    return "stand-in"


@pytest.fixture
def built_on_smollm2(smollm2_gguf):
    return smollm2_gguf
"""

SUITE = """
import pytest


def test_real_direct(smollm2_gguf):
    assert smollm2_gguf


def test_unit_first():
    pass


def test_real_through_a_fixture(built_on_smollm2):
    assert built_on_smollm2


@pytest.mark.slow
def test_real_marked_slow():
    pass


def test_unit_second():
    FAIL_HERE
"""


@pytest.fixture(autouse=True)
def _no_plugin_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    # The inner runs need only the tiers plugin; installed plugins (hypothesis, benchmark, ...)
    # would be set up again for each of them.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def _suite(pytester: pytest.Pytester, fail_unit: bool = False) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE.replace("FAIL_HERE", "assert False" if fail_unit else "pass"))


def _collected(result: pytest.RunResult) -> list[str]:
    return [line.split("::")[1] for line in result.outlines if line.startswith("test_suite.py::")]


def test_tiers_are_chosen_by_fixture_and_marker(pytester: pytest.Pytester) -> None:
    _suite(pytester)
    unit = pytester.runpytest_inprocess("--collect-only", "-q", "-m", "unit")
    assert _collected(unit) == ["test_unit_first", "test_unit_second"]
    real = pytester.runpytest_inprocess("--collect-only", "-q", "-m", "real")
    assert _collected(real) == ["test_real_direct", "test_real_through_a_fixture", "test_real_marked_slow"]


def test_the_default_run_is_everything_unit_tier_first(pytester: pytest.Pytester) -> None:
    _suite(pytester)
    result = pytester.runpytest_inprocess("-v")
    result.assert_outcomes(passed=5)
    ran = [line.split("::")[1].split()[0] for line in result.outlines if "PASSED" in line]
    assert ran == ["test_unit_first", "test_unit_second", "test_real_direct",
                   "test_real_through_a_fixture", "test_real_marked_slow"]
    result.stdout.fnmatch_lines(["tiers: 2 unit, then 3 real*"])


def test_a_unit_failure_stops_the_run_before_the_real_tier(pytester: pytest.Pytester) -> None:
    _suite(pytester, fail_unit=True)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*1 unit-tier test(s) failed, so the real tier was not run*"])
    keep_going = pytester.runpytest_inprocess("--real-after-unit-failures")
    keep_going.assert_outcomes(passed=4, failed=1)


def test_a_real_tier_failure_does_not_stop_the_real_tier(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite="""
        def test_real_fails(smollm2_gguf):
            assert False

        def test_real_after(smollm2_gguf):
            pass
    """)
    pytester.runpytest_inprocess().assert_outcomes(passed=1, failed=1)


def test_a_unit_marker_on_a_real_test_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite="""
        import pytest

        @pytest.mark.unit
        def test_claims_unit(smollm2_gguf):
            pass
    """)
    result = pytester.runpytest_inprocess("--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_claims_unit is marked 'unit' but belongs to the real tier*"])
