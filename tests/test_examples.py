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


def test_embedded_service_keeps_serving_across_bad_requests(smollm2_gguf: Path) -> None:
    import json

    lines = [
        {"id": 1, "prompt": "The capital of France is", "max_tokens": 8},
        "not json",
        {"id": 3, "prompt": 5},
        {"id": 4, "prompt": "x", "max_tokens": -1},
        {"id": 5, "prompt": "word " * 3000},  # more than the plan's context under a 16 MiB KV budget
        [1, 2],
        {"id": 7, "messages": "hi"},
        {"id": 8, "max_tokens": 16,
         "messages": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is the capital of France?"}]},
    ]
    stdin = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    proc = _run("embedded_service.py", str(smollm2_gguf), "--device", "raspberry-pi-5-4gb",
                "--kv-budget", "16MiB", stdin=stdin)
    assert proc.returncode == 0, proc.stderr[-2000:]
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(replies) == len(lines)
    good = {r["id"]: r for r in replies if "text" in r}
    assert set(good) == {1, 8}
    assert "Paris" in good[1]["text"] and "Paris" in good[8]["text"]
    errors = [r["error"] for r in replies if "error" in r]
    assert len(errors) == 6 and all(e and "\n" not in e for e in errors)
    assert any("context" in e.lower() or "tokens" in e for e in errors)  # the long prompt, said why
    # The memory log: the plan, then one line per request, the KV never past its budget.
    log = proc.stderr
    assert "plan: gguf" in log and log.count("memory: rss") == len(lines) + 1
    for line in log.splitlines():
        if "KV held" in line:
            held = line.split("KV held ")[1].split(" of budget")[0]
            assert not held.endswith("GiB") and (not held.endswith("MiB") or float(held.split()[0]) <= 16.0)


def test_convert_for_device_prints_the_plan_and_the_verify_report(tiny_model, tmp_path: Path) -> None:
    import json

    proc = _run("convert_for_device.py", str(tiny_model("llama")), "raspberry-pi-5-4gb", str(tmp_path / "pi"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("plan for raspberry-pi-5-4gb: budget")
    chosen = [ln for ln in out.splitlines() if ln.lstrip().startswith("->")]
    assert len(chosen) == 1
    manifest = json.loads((tmp_path / "pi" / "edgellm.json").read_text())
    # The plan's choice is what was converted, and the report quotes the manifest's parity.
    assert f"{manifest['format']} {manifest['quantization']}".lower() in chosen[0].lower()
    report = [ln for ln in out.splitlines() if ln.startswith("verify (")][0]
    assert f"top-1 {manifest['parity']['top1_agreement']:.3f}" in report


def test_convert_for_device_unknown_device_is_one_line(tiny_model, tmp_path: Path) -> None:
    proc = _run("convert_for_device.py", str(tiny_model("llama")), "toaster-9000", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("convert_for_device:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()
