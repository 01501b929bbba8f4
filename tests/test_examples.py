"""The examples run as an app would run them (default model, piped input)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_stream_with_stop(smollm2_gguf: Path) -> None:
    proc = _run("stream_with_stop.py", str(smollm2_gguf))
    assert proc.returncode == 0, proc.stderr
    assert "-- finish: stop" in proc.stdout
    assert "\n4." not in proc.stdout.split("-- finish")[0]


def test_chat_app_answers_over_a_pipe(smollm2_gguf: Path) -> None:
    proc = _run("chat_app.py", str(smollm2_gguf), stdin="What is the capital of France?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tok/s]" in proc.stdout


def test_chat_app_bad_model_is_one_line(tmp_path: Path) -> None:
    proc = _run("chat_app.py", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("chat_app:") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_convert_and_verify_example(tiny_model, tmp_path: Path) -> None:
    proc = _run("convert_and_verify.py", str(tiny_model("qwen2")), str(tmp_path / "out"), "Q8_0")
    assert proc.returncode == 0, proc.stderr
    row = [ln for ln in proc.stdout.splitlines() if ln.startswith("Q8_0")]
    assert row and float(row[0].split()[2]) >= 0.9
