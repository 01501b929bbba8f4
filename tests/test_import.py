"""`import edgellm` stays light: no heavy library is imported until a function needs it."""

from __future__ import annotations

from tests.fixtures import top_modules_after

HEAVY = ("torch", "transformers", "llama_cpp", "openvino", "onnxruntime", "optimum", "gguf",
         "safetensors", "accelerate", "matplotlib")


def test_import_edgellm_is_light() -> None:
    loaded = top_modules_after("import edgellm")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_cli_and_public_names_are_light() -> None:
    loaded = top_modules_after(
        "import edgellm, edgellm.cli.main\n"
        "from edgellm import load, convert, verify, inspect, profile, ModelSpec, errors\n"
        "from edgellm.runtimes.base import backend_names, select_backend\n"
        "backend_names(); select_backend('gguf', 'cpu')"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_loading_a_gguf_model_never_imports_torch(smollm2_gguf) -> None:
    loaded = top_modules_after(
        f"import edgellm\nm = edgellm.load({str(smollm2_gguf)!r}, n_ctx=128)\n"
        "m.generate('Hi', max_tokens=2, temperature=0)\nm.close()"
    )
    assert "llama_cpp" in loaded  # the backend was really used
    assert not loaded & {"torch", "transformers", "safetensors", "accelerate"}
