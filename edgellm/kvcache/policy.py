"""What happens when a session's KV cache is full: one policy, decided in the shared loop.

``kv_overflow`` (a load option, or per session):

* ``error`` (default): a prompt that does not fit is refused before any compute, with the
  tokens needed, the tokens available and the budget; a generation that reaches the end of
  the cache stops with ``finish_reason="length"``.
* ``sliding``: the first ``kv_sinks`` tokens stay (attention sinks: Xiao et al. 2023,
  "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453; 4 sinks is
  their default) and the most recent tokens fill the rest. When the cache is full, half of
  the tokens after the sinks are dropped at once, as llama.cpp's context shift does
  (``n_discard = n_left / 2`` in its examples and server), so the cost of an eviction is
  paid once per half window, not per token. Generation goes on indefinitely. A prompt
  longer than the cache keeps its sinks and its newest tokens.
* ``truncate``: a chat drops its oldest whole turns (the system prompt always stays) until
  the rendered conversation leaves room for the reply; a raw prompt keeps its sinks and its
  newest tokens. Generation stops at the end of the cache, like ``error``.

How an eviction is carried out depends on the session's abilities (``KVAbility``). With
``SHIFT`` the cache is moved: llama.cpp by ``llama_memory_seq_rm`` + ``llama_memory_seq_add``
(its K-shift re-applies RoPE to the moved keys), OpenVINO and ONNX Runtime by edgellm's own
rotation of the cached keys (:mod:`edgellm.kvcache.rope`). Without it (RoPE that depends on
the sequence length) the cache is trimmed to the sinks and the kept tokens are re-prefilled
at their new positions. Chosen by measurement (``benchmarks/bench_kv.py``, SmolLM2 int4 on
OpenVINO, 512-token window, 4,096 tokens): re-prefilling grew RSS 40.5 MiB past the first 512
tokens; shifting the states 30.2 MiB, all of it freed heap that glibc kept from the state copies,
and -6.4 MiB once those pages are given back
(:func:`~edgellm.kvcache.arrays.release_freed_memory`); decode speed against a cache that never
evicts 1.20x re-prefilling, 1.50-1.70x shifting (the shorter window attends to fewer keys);
perplexity over the last window 16.2 re-prefilled, 15.4 shifted. On a tiny Llama the rotated
cache scores a text like llama.cpp's K-shift (max |d logprob| 0.015) where re-prefilling
differs by 0.32. Keep the sinks when shifting: without them the same window scored 45.1
(llama.cpp: 26.7 against 11.9 with 4 sinks).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from edgellm.errors import InvalidInputError

__all__ = ["DEFAULT_SINKS", "Overflow", "OverflowPolicy"]

#: StreamingLLM's default number of attention-sink tokens (arXiv:2309.17453, section 3.2).
DEFAULT_SINKS = 4


class Overflow(enum.Enum):
    """The ``kv_overflow`` choices."""

    ERROR = "error"
    SLIDING = "sliding"
    TRUNCATE = "truncate"


@dataclass(frozen=True)
class OverflowPolicy:
    """A ``kv_overflow`` choice with its number of attention sinks."""

    kind: Overflow = Overflow.ERROR
    sinks: int = DEFAULT_SINKS

    @classmethod
    def parse(cls, kind: Any = "error", sinks: Any = DEFAULT_SINKS) -> OverflowPolicy:
        """From user values (``kv_overflow="sliding"``, ``kv_sinks=4``), checked."""
        if isinstance(kind, Overflow):
            parsed = kind
        else:
            try:
                parsed = Overflow(str(kind).strip().lower())
            except ValueError:
                names = ", ".join(o.value for o in Overflow)
                raise InvalidInputError(
                    f"kv_overflow {kind!r} is not a policy; use one of: {names}") from None
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise InvalidInputError(f"kv_sinks must be an integer >= 0, got {sinks!r}")
        return cls(parsed, sinks)

    @property
    def slides(self) -> bool:
        """True when generation may continue past a full cache."""
        return self.kind is Overflow.SLIDING

    def check_capacity(self, capacity: int) -> None:
        """A cache must hold the sinks and at least two more tokens to slide."""
        if self.kind is not Overflow.ERROR and self.sinks > capacity - 2:
            raise InvalidInputError(
                f"kv_sinks {self.sinks} leaves no room in a cache of {capacity} tokens; use at most "
                f"{max(0, capacity - 2)} sinks or a larger cache"
            )

    def fit_prompt(self, prompt: list[int], capacity: int, max_tokens: int) -> list[int] | None:
        """The tokens of ``prompt`` to keep in a cache of ``capacity``; None when it cannot fit.

        A prompt leaving room for at least one token is kept whole. Otherwise ``error``
        gives None (the caller raises) and the other policies keep the sinks and the newest
        tokens, leaving room for ``min(max_tokens, half the window)`` new tokens.
        """
        if len(prompt) < capacity:
            return prompt
        if self.kind is Overflow.ERROR:
            return None
        window = capacity - self.sinks
        room = max(1, min(max_tokens, window // 2))
        return prompt[: self.sinks] + prompt[len(prompt) - (window - room):]

    def discard(self, n_tokens: int) -> int:
        """How many tokens after the sinks one eviction drops from a full cache of ``n_tokens``."""
        return max(1, (n_tokens - self.sinks) // 2)
