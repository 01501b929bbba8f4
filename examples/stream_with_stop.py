"""Stream a completion with stop strings and print the timings edgellm measured.

    python examples/stream_with_stop.py [MODEL]
"""

from __future__ import annotations

import sys

import edgellm
from edgellm.models import default_model_path

path = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
with edgellm.load(path, n_ctx=1024, seed=42) as model:
    prompt = "A numbered list of three fruits:\n1."
    for piece in model.stream(prompt, max_tokens=64, temperature=0, stop=["\n4.", "\n\n"]):
        print(piece, end="", flush=True)
    result = model.last_result
    assert result is not None
    t = result.timings
    print(f"\n-- finish: {result.finish_reason}; TTFT {t.ttft_ms:.0f} ms, "
          f"prefill {t.prefill_tps:.0f} tok/s, decode {t.decode_tps:.1f} tok/s")
