"""onnxruntime-genai peer for the ONNX benchmark.

Run with the *separate* venv's python (see benchmarks/setup_ort_genai.sh), not the
project's python: onnxruntime-genai's model builder needs transformers 5.

    /work/venvs/ort-genai/bin/python benchmarks/ort_genai_peer.py MODEL_DIR \
        --prompt "The capital of France is" --tokens 64 --threads 2

MODEL_DIR is a folder made by `python -m onnxruntime_genai.models.builder`
(model.onnx + genai_config.json + tokenizer files).

Greedy decoding of exactly N new tokens: the raw prompt (no chat template) is
tokenized by the model's own tokenizer, min_length = max_length = prompt + N so
EOS cannot stop generation early. One short warm-up generation runs first.

Timing, with the generator loop API:
  * append_tokens(prompt) runs the prefill forward pass; the first
    generate_next_token() then picks the first new token from its logits, so
    ttft_ms = append_tokens + first generate_next_token.
  * each further generate_next_token() runs one decode forward pass for the
    previous token and picks the next one, so decode_tps = (N-1) / time of
    those N-1 calls.
Threads: the decoder's ORT session option intra_op_num_threads is set through
og.Config.overlay() (in memory; genai_config.json on disk is not modified).

With --runs K the generation is timed K times in the process and the medians are reported.

Prints ONE JSON line on stdout:
  {"decode_tps", "ttft_ms", "load_s", "n_prompt_tokens", "n_new_tokens"}
With --show-text the generated text is added as "text" (for sanity checks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og


def _load(model_dir: str, threads: int | None):
    config = og.Config(model_dir)
    config.clear_providers()  # CPU execution provider
    if threads:
        config.overlay(
            json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
            )
        )
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    return model, tokenizer


def _generate(model, prompt_ids: np.ndarray, n_new: int, allow_eos: bool = False):
    """Greedy-generate exactly n_new tokens (up to EOS with allow_eos); (tokens, ttft_s, decode_s)."""
    total = int(prompt_ids.shape[0]) + n_new
    params = og.GeneratorParams(model)
    params.set_search_options(
        do_sample=False,
        num_beams=1,
        batch_size=1,
        max_length=total,
        min_length=0 if allow_eos else total,  # min_length masks EOS until max_length: no early stop
        repetition_penalty=1.0,
    )
    generator = og.Generator(model, params)

    t0 = time.perf_counter()
    generator.append_tokens(prompt_ids)  # prefill
    generator.generate_next_token()  # first new token from prefill logits
    tokens = [int(generator.get_next_tokens()[0])]
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        if generator.is_done():
            break
        generator.generate_next_token()  # one decode step + greedy pick
        tokens.append(int(generator.get_next_tokens()[0]))
    t2 = time.perf_counter()
    del generator
    return tokens, t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (0 = ORT default)")
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1,
                    help="timed generations after the warm-up; the medians are reported")
    ap.add_argument("--show-text", action="store_true", help="add the generated text to the JSON")
    ap.add_argument("--allow-eos", action="store_true",
                    help="plain greedy decoding that may stop at EOS (for token comparisons: min_length "
                         "masks EOS, which changes the greedy choice)")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be >= 2 (decode rate needs N-1 >= 1 tokens)")

    t = time.perf_counter()
    model, tokenizer = _load(args.model_dir, args.threads)
    load_s = time.perf_counter() - t

    prompt_ids = np.asarray(tokenizer.encode(args.prompt), dtype=np.int32)

    _generate(model, prompt_ids, max(2, args.warmup_tokens))  # warm-up
    timed = [_generate(model, prompt_ids, args.tokens, args.allow_eos) for _ in range(max(1, args.runs))]
    tokens = timed[0][0]
    ttft_s = statistics.median(t[1] for t in timed)
    decode_s = statistics.median(t[2] for t in timed)
    if len(tokens) != args.tokens and not args.allow_eos:
        print(f"error: generated {len(tokens)} tokens, wanted {args.tokens}", file=sys.stderr)
        return 1

    out = {
        "decode_tps": round((len(tokens) - 1) / decode_s, 3) if decode_s > 0 else None,
        "ttft_ms": round(ttft_s * 1000.0, 3),
        "load_s": round(load_s, 4),
        "n_prompt_tokens": int(prompt_ids.shape[0]),
        "n_new_tokens": len(tokens),
    }
    if args.show_text:
        out["text"] = tokenizer.decode(np.asarray(tokens, dtype=np.int32))
        out["token_ids"] = tokens
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
