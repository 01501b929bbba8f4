"""The one decode loop shared by every backend.

A backend only maps token ids to logits (:class:`~edgellm.runtimes.base.Runtime`).
Everything an application can observe lives here, once: prefix reuse of the KV state,
prefill, sampling, stop conditions, incremental detokenization and timings. Switching
backend therefore never changes what the caller sees.

Usage::

    decoder = Decoder(runtime)
    gen = decoder.run(prompt_ids, SamplingParams(temperature=0), max_tokens=64, stop=["\\n\\n"])
    for piece in gen:
        print(piece, end="")
    gen.result.timings.decode_tps

Context rule: a generation never makes prompt + completion exceed ``runtime.n_ctx``. A
prompt that leaves no room for even one token raises
:class:`~edgellm.errors.ContextOverflowError`; otherwise ``max_tokens`` is clamped to the
room left and the generation ends with ``finish_reason="length"`` when the context is full.

Threads: one :class:`Decoder` serialises runtime calls with a lock held per forward pass,
never across a ``yield``. Each generation knows its full token sequence; if another
generation used the runtime in between (another thread, or an abandoned stream resumed
later), the next step re-synchronises the KV state by prefix reuse, so interleaving costs
time but never correctness, and no abandoned stream can block the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgellm.errors import ContextOverflowError, InvalidInputError
from edgellm.runtimes.sampling import Sampler, SamplingParams
from edgellm.text.detok import StreamDecoder

if TYPE_CHECKING:
    from edgellm.runtimes.base import Runtime
    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["Decoder", "FinishReason", "Generation", "Result", "Timings"]

FinishReason = Literal["stop", "length", "eos"]


@dataclass(frozen=True)
class Timings:
    """Where the time of one generation went.

    ``ttft_ms`` runs from the start of the request (``started_at``) to the first sampled
    token. ``prefill_tps`` counts the prompt tokens actually evaluated (``prompt_tokens -
    cached_tokens``); ``decode_tps`` counts single-token forward passes after the first
    token, as llama.cpp's "eval time" does (``completion_tokens - 1``, plus one when the
    model ended with EOS, since sampling EOS took a forward pass too).
    """

    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    prefill_tps: float
    decode_tps: float
    cached_tokens: int = 0  # prompt tokens reused from the KV state, not evaluated

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON reports."""
        return asdict(self)


@dataclass(frozen=True)
class Result:
    """A finished generation: text, generated ids (EOS excluded), why it ended, timings.

    ``finish_reason``: "eos" the model ended its text, "stop" a stop string matched (or
    the stream was closed early), "length" ``max_tokens`` or the context was reached.
    """

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    timings: Timings
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON output."""
        return {
            "text": self.text,
            "tokens": list(self.tokens),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "timings": self.timings.to_dict(),
        }


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _last_row(logits: Any) -> np.ndarray:
    arr = np.asarray(logits)
    return arr[-1] if arr.ndim > 1 else arr


class _StopMatcher:
    """Finds stop strings in streamed text; holds back text that may start one."""

    __slots__ = ("held", "stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string matched (text cut before it)."""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = self._partial_len(buf)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def rest(self) -> str:
        out, self.held = self.held, ""
        return out


class Decoder:
    """The decode loop bound to one runtime; remembers which ids its KV state holds."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()  # held per runtime call, never across a yield
        self._state: list[int] = []  # ids in the runtime's KV state, in order
        self._owner: Generation | None = None

    def run(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_tokens: int,
        stop: Sequence[str] = (),
        *,
        eos_ids: AbstractSet[int] | None = None,
        started_at: float | None = None,
    ) -> Generation:
        """Start a generation; iterate the result for text pieces, then read ``.result``.

        ``eos_ids`` defaults to the tokenizer's; ``started_at`` (a ``time.perf_counter()``
        value) lets a caller include its tokenization in ``ttft_ms``. Arguments are
        checked here, before any runtime work.
        """
        prompt = list(prompt_ids)
        _check_prompt(prompt, self.runtime.n_vocab)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        stops = _check_stop(stop)
        room = self.runtime.n_ctx - len(prompt)
        if room < 1:
            raise ContextOverflowError(
                f"prompt of {len(prompt)} tokens leaves no room in a context of {self.runtime.n_ctx} "
                f"tokens (max_tokens={max_tokens}); shorten the prompt, or load the model with a "
                "larger n_ctx"
            )
        if max_tokens > room:
            logger.debug("max_tokens %d clamped to %d by the context size", max_tokens, room)
        tok = self.runtime.tokenizer
        eos = frozenset(tok.eos_ids if eos_ids is None else eos_ids)
        return Generation(
            self, prompt, params, min(max_tokens, room), stops, _special_stop_ids(tok, stops), eos, started_at
        )

    def reset(self) -> None:
        """Empty the runtime's KV state (and this decoder's record of it)."""
        with self.lock:
            self.runtime.reset()
            self._state.clear()
            self._owner = None

    # Both methods below run with self.lock held.

    def _sync(self, owner: Generation, seq: list[int]) -> tuple[np.ndarray, int]:
        """Make the KV state equal ``seq`` reusing the longest common prefix; last logits."""
        rt, state = self.runtime, self._state
        if rt.n_past != len(state):  # someone used the runtime behind our back
            logger.debug("KV state (%d) differs from the record (%d); resetting", rt.n_past, len(state))
            rt.reset()
            state.clear()
        keep = min(_common_prefix(state, seq), len(seq) - 1)  # always evaluate >= 1 token
        if keep < len(state):
            rt.trim(keep)
            del state[keep:]
        new = seq[keep:]
        self._owner = owner
        try:
            logits = _last_row(rt.forward(new))
        except BaseException:
            state.clear()  # unknown state now: the next sync resets the runtime
            raise
        state.extend(new)
        return logits, len(new)

    def _step(self, owner: Generation, seq: list[int]) -> np.ndarray:
        """Logits after appending ``seq[-1]``: one-token forward, or a resync if needed."""
        state = self._state
        if self._owner is owner and len(state) == len(seq) - 1 and self.runtime.n_past == len(state):
            try:
                logits = _last_row(self.runtime.forward(seq[-1:]))
            except BaseException:
                state.clear()
                raise
            state.append(seq[-1])
            return logits
        return self._sync(owner, seq)[0]


def _check_prompt(prompt: list[int], n_vocab: int) -> None:
    if not prompt:
        raise InvalidInputError("the prompt is empty (0 tokens); pass some text or token ids")
    lo, hi = min(prompt), max(prompt)
    if lo < 0 or hi >= n_vocab:
        bad = lo if lo < 0 else hi
        raise InvalidInputError(f"prompt token id {bad} is outside the vocabulary [0, {n_vocab})")


def _special_stop_ids(tokenizer: Tokenizer, stops: tuple[str, ...]) -> frozenset[int]:
    """Special tokens spelled exactly like a stop string (e.g. "<|im_end|>").

    Special tokens produce no text in the stream, so their stop strings are matched on
    the token id instead.
    """
    found = set()
    for s in stops:
        ids = tokenizer.encode(s, add_special=False, parse_special=True)
        if len(ids) == 1 and tokenizer.is_special(ids[0]):
            found.add(ids[0])
    return frozenset(found)


def _check_stop(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidInputError(f"stop strings must be non-empty str, got {s!r}")
    return stops


class Generation:
    """One running generation: an iterator of text pieces, then ``result``.

    Closing it early (``close()``, or dropping a half-read stream) ends it with
    ``finish_reason="stop"`` and the text emitted so far.
    """

    def __init__(
        self,
        decoder: Decoder,
        prompt: list[int],
        params: SamplingParams,
        budget: int,
        stops: tuple[str, ...],
        stop_ids: frozenset[int],
        eos_ids: frozenset[int],
        started_at: float | None,
    ) -> None:
        self.result: Result | None = None
        self._decoder = decoder
        self._prompt = prompt
        self._params = params
        self._budget = budget
        self._stops = stops
        self._eos = eos_ids
        self._stop_ids = stop_ids
        self._t0 = time.perf_counter() if started_at is None else started_at
        self._steps = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._steps)

    def close(self) -> None:
        """Stop generating; ``result`` then holds what was produced."""
        self._steps.close()

    def text(self) -> str:
        """Run to the end and return the whole text (``result`` is then set)."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result.text

    def _run(self) -> Generator[str, None, None]:
        dec, tok = self._decoder, self._decoder.runtime.tokenizer
        sampler, detok, stops = Sampler(self._params), StreamDecoder(tok), _StopMatcher(self._stops)
        seq = list(self._prompt)
        generated: list[int] = []
        pieces: list[str] = []
        finish: FinishReason = "stop"
        t_first = t_end = None
        decode_forwards = 0
        t_prefill = time.perf_counter()
        with dec.lock:
            logits, evaluated = dec._sync(self, seq)
        prefill_s = time.perf_counter() - t_prefill
        try:
            while True:
                token = sampler.sample(logits, seq)
                if t_first is None:
                    t_first = time.perf_counter()
                if token in self._eos:
                    finish = "eos"
                    break
                if token in self._stop_ids:
                    finish = "stop"
                    break
                generated.append(token)
                seq.append(token)
                out, hit = stops.push(detok.feed(token))
                if out:
                    pieces.append(out)
                    yield out
                if hit:
                    finish = "stop"
                    break
                if len(generated) >= self._budget:
                    finish = "length"
                    break
                with dec.lock:
                    logits = dec._step(self, seq)
                decode_forwards += 1
            t_end = time.perf_counter()
            if finish != "stop":
                out, hit = stops.push(detok.flush())
                out += "" if hit else stops.rest()
                finish = "stop" if hit else finish
                if out:
                    pieces.append(out)
                    yield out
        finally:
            # Also runs when the consumer closes the stream early (GeneratorExit).
            t_end = t_end or time.perf_counter()
            self.result = self._result(pieces, generated, finish, evaluated, prefill_s,
                                       t_first or t_end, t_end, decode_forwards)

    def _result(
        self, pieces: list[str], generated: list[int], finish: FinishReason, evaluated: int,
        prefill_s: float, t_first: float, t_end: float, decode_forwards: int,
    ) -> Result:
        n_prompt, n_out = len(self._prompt), len(generated)
        decode_s = t_end - t_first
        timings = Timings(
            prompt_tokens=n_prompt,
            completion_tokens=n_out,
            ttft_ms=(t_first - self._t0) * 1e3,
            prefill_ms=prefill_s * 1e3,
            decode_ms=decode_s * 1e3,
            total_ms=(t_end - self._t0) * 1e3,
            prefill_tps=evaluated / prefill_s if prefill_s > 0 else 0.0,
            decode_tps=decode_forwards / decode_s if decode_s > 0 and decode_forwards else 0.0,
            cached_tokens=n_prompt - evaluated,
        )
        logger.debug("generation: %d+%d tokens, %s, %.1f decode tok/s",
                     n_prompt, n_out, finish, timings.decode_tps)
        return Result("".join(pieces), generated, finish, timings, n_prompt, n_out)
