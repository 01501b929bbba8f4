"""Bad inputs to `edgellm convert` / `load`: one clear line, exit 2, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgellm
from edgellm import errors

CLI = [sys.executable, "-m", "edgellm"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgellm: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture()
def src(tiny_model, tmp_path: Path) -> Path:
    """A private copy of the tiny llama checkpoint that a test may damage."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), dst)
    return dst


def test_missing_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("convert", str(tmp_path / "nope"), "--format", "gguf", "-o", str(out))
    assert_one_line_error(proc, "nope", "does not exist")
    assert not out.exists()


def test_no_config_json(src: Path, tmp_path: Path) -> None:
    (src / "config.json").unlink()
    proc = run_cli("convert", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "config.json")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(src: Path, tmp_path: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("convert", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "'mamba'", "supported:", "llama", "qwen3", "gemma3")
    with pytest.raises(errors.UnsupportedArchitectureError):
        edgellm.convert(src, tmp_path / "out2")


def test_truncated_safetensors(src: Path, tmp_path: Path) -> None:
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    proc = run_cli("convert", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_corrupt_safetensors_header(src: Path, tmp_path: Path) -> None:
    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 16] = b"\xff" * 16  # garbage inside the JSON header
    weights.write_bytes(bytes(data))
    proc = run_cli("convert", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "model.safetensors", "corrupt")


def test_pickle_checkpoint_refused_unless_allowed(src: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.numpy import load_file

    state = {k: torch.from_numpy(v.copy()) for k, v in load_file(src / "model.safetensors").items()}
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    proc = run_cli("convert", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "pytorch_model.bin", "--allow-pickle")
    assert not (tmp_path / "out").exists()
    ok = run_cli("convert", str(src), "-o", str(tmp_path / "out"), "--allow-pickle", "--quant", "f16")
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "out" / "edgellm.json").read_text())
    assert manifest["parity"]["top1_agreement"] >= 0.98


def test_unknown_quant_type(src: Path, tmp_path: Path) -> None:
    proc = run_cli("convert", str(src), "--quant", "q3_banana", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "q3_banana", "Q4_K_M", "Q8_0")


def test_output_exists_needs_force(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = run_cli("convert", str(src), "--quant", "f16", "-o", str(out))
    assert_one_line_error(proc, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "user data"
    ok = run_cli("convert", str(src), "--quant", "f16", "-o", str(out), "--force")
    assert ok.returncode == 0, ok.stderr
    assert (out / "edgellm.json").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_bad_gguf_file(damage: str, tmp_path: Path, smollm2_gguf: Path) -> None:
    bad = tmp_path / "bad.gguf"
    data = smollm2_gguf.read_bytes()
    bad.write_bytes(b"GGML" + data[4:] if damage == "magic" else data[: len(data) // 2])
    needle = "not a GGUF file" if damage == "magic" else "truncated"
    assert_one_line_error(run_cli("inspect", str(bad)), "bad.gguf", needle)
    assert_one_line_error(run_cli("run", str(bad), "hello"), "bad.gguf", needle)
    assert_one_line_error(run_cli("convert", str(bad), "--quant", "q4_0", "-o", str(tmp_path / "o")),
                          "bad.gguf", needle)
    assert not (tmp_path / "o").exists()
    with pytest.raises(errors.InvalidModelError):
        edgellm.load(bad)


def test_conversion_killed_midway_leaves_nothing_at_final_name(smollm2_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "convert", str(smollm2_hf), "--quant", "f16", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    partial: list[Path] = []
    while time.monotonic() < deadline and not partial:
        partial = [p for p in tmp_path.glob(".out.partial-*") if any(p.glob("*.gguf"))]
        time.sleep(0.05)
    assert partial, "the conversion never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # the next conversion cleans the dead process's partial folder and succeeds
    ok = run_cli("convert", str(smollm2_hf), "--quant", "q8_0", "-o", str(out), "--no-verify")
    assert ok.returncode == 0, ok.stderr
    assert not partial[0].exists()
    assert (out / "edgellm.json").is_file()
