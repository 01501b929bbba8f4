"""`import edgellm` stays light: no heavy library is imported until a function needs it."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "llama_cpp", "openvino", "onnxruntime", "optimum", "gguf",
         "safetensors", "accelerate")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_edgellm_is_light() -> None:
    loaded = _modules_after("import edgellm")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_cli_and_public_names_are_light() -> None:
    loaded = _modules_after(
        "import edgellm, edgellm.cli.main\n"
        "from edgellm import load, convert, verify, inspect, ModelSpec, errors\n"
        "from edgellm.runtimes.base import backend_names, select_backend\n"
        "backend_names(); select_backend('gguf', 'cpu')"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_loading_a_gguf_model_never_imports_torch(smollm2_gguf) -> None:
    loaded = _modules_after(
        f"import edgellm\nm = edgellm.load({str(smollm2_gguf)!r}, n_ctx=128)\n"
        "m.generate('Hi', max_tokens=2, temperature=0)\nm.close()"
    )
    assert "llama_cpp" in loaded  # the backend was really used
    assert not loaded & {"torch", "transformers", "safetensors", "accelerate"}
