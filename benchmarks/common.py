"""Pieces the benchmark scripts share."""

from __future__ import annotations

import time
from typing import Any


def time_hf_generate(model: Any, ids: Any, tokens: int) -> tuple[float, float]:
    """(TTFT in ms, decode tokens/s) of a transformers-style ``generate`` (optimum's models).

    Greedy; a warm-up first; TTFT is a one-token generate, decode the remaining tokens of an
    exactly-``tokens`` generate (EOS cannot stop it).
    """
    import torch

    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)  # warm-up
    t1 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t1
    t2 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    total = time.perf_counter() - t2
    return ttft * 1e3, (tokens - 1) / (total - ttft)
