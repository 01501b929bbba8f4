"""edgellm: convert, run and profile language models on small devices.

The public face::

    import edgellm
    edgellm.convert("./SmolLM2-135M-Instruct", "./smollm2-q8", format="gguf", quant="Q8_0")
    with edgellm.load("./smollm2-q8") as model:
        print(model.chat([{"role": "user", "content": "Hi!"}]).text)
    print(edgellm.profile("./smollm2-q8", prompt_tokens=128, gen_tokens=128).to_markdown())

``import edgellm`` imports no heavy library: torch, transformers, llama_cpp, openvino and
onnxruntime are imported only by the function that needs them.
"""

from __future__ import annotations

from edgellm import errors
from edgellm.api import convert, inspect, load, verify
from edgellm.errors import EdgeLLMError
from edgellm.profiling.profile import profile
from edgellm.spec import ModelSpec

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "convert",
    "errors",
    "EdgeLLMError",
    "inspect",
    "load",
    "ModelSpec",
    "profile",
    "verify",
]
