"""``edgellm check`` and ``load(..., isolate=True)``: an untrusted file is opened in a child first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import edgellm
from edgellm import isolate
from edgellm.errors import InvalidModelError
from tests.fixtures.tiny_gguf import build_tiny_gguf


@pytest.fixture(autouse=True)
def record_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "checked"


@pytest.fixture()
def tiny_gguf(tmp_path: Path) -> Path:
    return build_tiny_gguf(tmp_path / "tiny.gguf")


def _never_load_here(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the host loaded a file the child check refused")

    monkeypatch.setattr("edgellm.api.open_engine", refuse)


# programs standing in for a child whose native code crashes or hangs
CRASH = ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
ABORT = ["-c", "import os; os.abort()"]
HANG = ["-c", "import time; time.sleep(60)"]


@pytest.mark.parametrize(("entry", "needle"), [(CRASH, "signal SIGSEGV"), (ABORT, "signal SIGABRT"),
                                               (HANG, "did not finish within 2 s")])
def test_a_child_that_dies_or_hangs_is_one_error_and_no_load(entry: list[str], needle: str, tiny_gguf: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             record_dir: Path) -> None:
    monkeypatch.setattr(isolate, "CHILD_ENTRY", entry)
    _never_load_here(monkeypatch)
    with pytest.raises(InvalidModelError) as info:
        isolate.check_model(tiny_gguf, timeout_s=2.0)
    text = str(info.value)
    assert str(tiny_gguf) in text and needle in text and "not loaded here" in text and "\n" not in text
    if entry is not HANG:  # a hang is already covered; keep the test short
        with pytest.raises(InvalidModelError, match=needle):
            edgellm.load(tiny_gguf, device="cpu", isolate=True)
    assert not record_dir.exists() or not list(record_dir.iterdir())  # nothing recorded as passed


def test_a_good_file_passes_once_then_from_the_record(tiny_gguf: Path, record_dir: Path) -> None:
    first = isolate.check_model(tiny_gguf)
    assert first.status == "ok" and first.seconds > 0 and len(list(record_dir.iterdir())) == 1
    assert isolate.check_model(tiny_gguf).message == "passed before (recorded)"
    data = bytearray(tiny_gguf.read_bytes())  # one byte changed: a new check, not the record
    data[-1] ^= 1
    tiny_gguf.write_bytes(bytes(data))
    assert isolate.check_model(tiny_gguf).seconds > 0 and len(list(record_dir.iterdir())) == 2
    model = edgellm.load(tiny_gguf, device="cpu", n_ctx=64, threads=1, isolate=True)
    try:
        assert model.generate("hi", max_tokens=1, temperature=0).completion_tokens == 1
    finally:
        model.close()


def test_the_childs_edgellm_error_comes_back_as_itself(tmp_path: Path) -> None:
    from gguf import GGUFValueType as V

    bad = build_tiny_gguf(tmp_path / "bad.gguf", kv={"llama.block_count": (600, V.UINT32)})
    with pytest.raises(InvalidModelError, match="LLAMA_MAX_LAYERS"):
        isolate.check_model(bad)


def test_cli_check(tiny_gguf: Path, tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "edgellm", "check", str(tiny_gguf)], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok: {tiny_gguf}: opened"), ok.stderr
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:5000])
    bad = subprocess.run([sys.executable, "-m", "edgellm", "check", str(cut)], capture_output=True,
                         text=True, timeout=120)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "truncated at byte 5000" in lines[0], bad.stderr
