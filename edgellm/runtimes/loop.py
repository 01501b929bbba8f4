"""The one decode loop shared by every backend.

A backend session only maps token ids to logits over its own KV cache
(:class:`~edgellm.runtimes.base.BackendSession`). Everything an application can observe
lives here, once: prefix reuse of the KV cache, prefill, sampling, stop conditions,
incremental detokenization, timings, and the KV overflow policy
(:class:`~edgellm.kvcache.OverflowPolicy`). Switching backend therefore never changes what
the caller sees.

Usage::

    decoder = Decoder(session, tokenizer, n_vocab)
    gen = decoder.run(prompt_ids, SamplingParams(temperature=0), max_tokens=64, stop=["\\n\\n"])
    for piece in gen:
        print(piece, end="")
    gen.result.timings.decode_tps

Context rule: under ``error`` and ``truncate`` a generation never makes prompt + completion
exceed the session's capacity: a prompt that leaves no room for even one token raises
:class:`~edgellm.errors.ContextOverflowError` (``truncate`` shortens it first), and
``max_tokens`` is clamped to the room left (``finish_reason="length"``). Under ``sliding``
the cache keeps its sinks and drops half of the rest when full, and generation goes on: by
a shift of the cache where the session can (:attr:`KVAbility.SHIFT`), otherwise by
trimming to the sinks and re-prefilling the kept tokens.

Threads: one :class:`Decoder` serialises its session's calls with a lock held per forward
pass, never across a ``yield``. Each generation knows what its session's cache should hold;
if another generation used the session in between (another thread, or an abandoned stream
resumed later), the next step re-synchronises the cache by prefix reuse, so interleaving
costs time but never correctness, and no abandoned stream can block the session. Different
sessions never share a lock: they run in parallel where the backend releases the GIL.
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
from edgellm.kvcache import KVAbility, OverflowPolicy
from edgellm.runtimes.sampling import Sampler, SamplingParams
from edgellm.text.chat import check_text
from edgellm.text.detok import StreamDecoder

if TYPE_CHECKING:
    from edgellm.runtimes.base import BackendSession
    from edgellm.runtimes.threads import ThreadTuner
    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["Decoder", "FinishReason", "Generation", "Result", "Timings", "check_ids", "common_prefix"]

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
    evicted_tokens: int = 0  # tokens dropped from the KV cache by the sliding policy
    dropped_prompt_tokens: int = 0  # prompt tokens left out by the sliding/truncate policy

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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
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
    """The decode loop bound to one session; remembers which ids its KV cache holds.

    ``capacity_note`` describes where the cache's size came from (e.g. "kv_budget 12 MiB
    at f16"), for the overflow error.
    """

    def __init__(self, session: BackendSession, tokenizer: Tokenizer, n_vocab: int,
                 policy: OverflowPolicy | None = None, capacity_note: str = "",
                 tuner: ThreadTuner | None = None) -> None:
        self.session = session
        self.tuner = tuner  # told each one-token step's time (an automatic thread count adapts)
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self.policy = policy or OverflowPolicy()
        self.policy.check_capacity(session.n_ctx)
        self.capacity_note = capacity_note
        self.lock = threading.Lock()  # held per session call, never across a yield
        self._state: list[int] = []  # ids in the session's KV cache, in position order
        self._owner: Generation | None = None

    @property
    def state(self) -> list[int]:
        """A copy of the ids the KV cache holds, in position order."""
        return list(self._state)

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
        value) lets a caller include its tokenization in ``ttft_ms``. Arguments, and whether
        the prompt fits the cache, are checked here, before any compute.
        """
        prompt = list(prompt_ids)
        _check_prompt(prompt, self.n_vocab)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        stops = _check_stop(stop)
        capacity = self.session.n_ctx
        view = self.policy.fit_prompt(prompt, capacity, max_tokens)
        if view is None:
            note = f" ({self.capacity_note})" if self.capacity_note else ""
            raise ContextOverflowError(
                f"prompt of {len(prompt)} tokens needs {len(prompt) + 1} with one token to generate, "
                f"but the session's KV cache holds {capacity} tokens{note}; shorten the prompt, "
                "raise n_ctx or kv_budget, or load with kv_overflow='sliding' or 'truncate'"
            )
        budget = max_tokens if self.policy.slides else min(max_tokens, capacity - len(view))
        if budget < max_tokens:
            logger.debug("max_tokens %d clamped to %d by the cache size", max_tokens, budget)
        eos = frozenset(self.tokenizer.eos_ids if eos_ids is None else eos_ids)
        return Generation(self, prompt, view, params, budget, stops,
                          _special_stop_ids(self.tokenizer, stops), eos, started_at)

    def reset(self) -> None:
        """Empty the session's KV cache (and this decoder's record of it)."""
        with self.lock:
            self.session.reset()
            self._state.clear()
            self._owner = None

    def adopt(self, ids: Sequence[int]) -> None:
        """Record that the cache now holds ``ids`` (after a restore put them there)."""
        with self.lock:
            self._state = list(ids)
            self._owner = None

    def logprobs(self, ids: Sequence[int], chunk: int = 64) -> np.ndarray:
        """Log-probability of each of ``ids[1:]`` given the tokens before it (teacher forcing).

        The ids are fed through the session in chunks from an empty cache, under the overflow
        policy: ``sliding`` evicts as generation would (shift or re-prefill), so the result
        measures what a long conversation costs in quality; ``error`` and ``truncate`` refuse
        a text longer than the cache. The cache holds the text afterwards.
        """
        ids = [int(t) for t in ids]
        _check_prompt(ids, self.n_vocab)
        capacity, policy = self.session.n_ctx, self.policy
        if len(ids) > capacity and not policy.slides:
            raise ContextOverflowError(
                f"a text of {len(ids)} tokens does not fit a cache of {capacity} tokens; use "
                "kv_overflow='sliding' to score it through a sliding window")
        step = max(1, min(chunk, capacity - policy.sinks - 1))
        out = np.empty(len(ids) - 1, dtype=np.float64)
        with self.lock:
            self.session.reset()
            self._state, self._owner = [], None
            prev: np.ndarray | None = None
            for start in range(0, len(ids), step):
                piece = ids[start:start + step]
                while len(self._state) + len(piece) > capacity:
                    self._evict_state(max(len(piece), policy.discard(len(self._state))))
                rows = np.asarray(self.session.forward(piece, all_logits=True), dtype=np.float64)
                self._state.extend(piece)
                rows = rows - _logsumexp(rows)
                targets = ids[start + 1:start + len(piece) + 1]
                if prev is not None:
                    out[start - 1] = prev[piece[0]]
                out[start:start + len(targets)] = rows[np.arange(len(targets)), targets]
                prev = rows[-1]
        return out

    # The methods below run with self.lock held.

    def _sync(self, owner: Generation, view: list[int]) -> tuple[np.ndarray, int]:
        """Make the KV cache hold ``view`` reusing the longest common prefix; last logits."""
        sess, state = self.session, self._state
        if sess.n_past != len(state):  # someone used the session behind our back
            logger.debug("KV cache (%d) differs from the record (%d); resetting", sess.n_past, len(state))
            sess.reset()
            state.clear()
        keep = min(common_prefix(state, view), len(view) - 1)  # always evaluate >= 1 token
        if keep < len(state):
            sess.trim(keep)
            del state[keep:]
        new = view[keep:]
        self._owner = owner
        try:
            logits = _last_row(sess.forward(new))
        except BaseException:
            state.clear()  # unknown state now: the next sync resets the session
            raise
        state.extend(new)
        return logits, len(new)

    def _step(self, owner: Generation, view: list[int]) -> np.ndarray:
        """Logits after appending ``view[-1]``: one-token forward, or a resync if needed."""
        state = self._state
        if self._owner is owner and len(state) == len(view) - 1 and self.session.n_past == len(state):
            t0 = time.perf_counter()
            try:
                logits = _last_row(self.session.forward(view[-1:]))
            except BaseException:
                state.clear()
                raise
            if self.tuner is not None:
                self.tuner.observe(time.perf_counter() - t0)
            state.append(view[-1])
            return logits
        return self._sync(owner, view)[0]

    def _evict(self, owner: Generation, view: list[int]) -> tuple[list[int], np.ndarray, int]:
        """Sliding: drop half the tokens after the sinks; the new view, its logits, how many dropped.

        ``view`` ends with the token to evaluate next and is one longer than the cache.
        """
        sinks = self.policy.sinks
        n_drop = self.policy.discard(len(view) - 1)
        kept = view[:sinks] + view[sinks + n_drop:]
        if self._owner is owner and self._state == view[:-1] and self.session.n_past == len(self._state):
            self._evict_state(n_drop)
            return kept, self._step(owner, kept), n_drop
        return kept, self._sync(owner, kept)[0], n_drop  # someone else used the session: rebuild

    def _evict_state(self, n_drop: int) -> None:
        """Drop ``n_drop`` tokens after the sinks from the cache: a shift where the backend can,
        else a trim to the sinks and a re-prefill of the kept tokens at their new positions."""
        sinks, state = self.policy.sinks, self._state
        n_drop = min(n_drop, len(state) - sinks)
        kept = state[:sinks] + state[sinks + n_drop:]
        if self.session.cache.can(KVAbility.SHIFT):
            self.session.shift(sinks, n_drop)
        else:
            self.session.trim(sinks)
            del state[sinks:]
            if len(kept) > sinks:
                self.session.forward(kept[sinks:])
        self._state = kept


def _logsumexp(rows: np.ndarray) -> np.ndarray:
    top = rows.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(rows - top).sum(axis=-1, keepdims=True))


def check_ids(ids: Any, n_vocab: int, what: str = "token ids") -> list[int]:
    """``ids`` as a list of ints in ``[0, n_vocab)``, or a one-line InvalidInputError."""
    if isinstance(ids, (str, bytes, bytearray)) or not hasattr(ids, "__iter__"):
        raise InvalidInputError(f"{what} takes a sequence of int token ids, not {type(ids).__name__}")
    out = list(ids)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InvalidInputError(f"{what}: token ids are ints, got {type(i).__name__} {i!r:.40}")
        if not 0 <= i < n_vocab:
            raise InvalidInputError(f"{what}: token id {i} is outside the vocabulary [0, {n_vocab})")
    return [int(i) for i in out]


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
    if isinstance(stop, str):
        stops: tuple[Any, ...] = (stop,)
    elif isinstance(stop, (list, tuple, set, frozenset)):
        stops = tuple(stop)
    else:
        raise InvalidInputError(
            f"stop must be a str or a list of str, got {type(stop).__name__}: {stop!r:.60}")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise InvalidInputError(f"stop strings must be non-empty str, got {s!r:.60}")
        check_text(s, f"stop[{i}]")
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
        view: list[int],
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
        self._view = view  # what the KV cache should hold: the fitted prompt, then new tokens
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
        dec, tok = self._decoder, self._decoder.tokenizer
        sampler, detok, stops = Sampler(self._params), StreamDecoder(tok), _StopMatcher(self._stops)
        seq, view = list(self._prompt), list(self._view)  # seq: every token, for penalties
        capacity = dec.session.n_ctx
        generated: list[int] = []
        pieces: list[str] = []
        finish: FinishReason = "stop"
        t_first = t_end = None
        decode_forwards = evicted = 0
        t_prefill = time.perf_counter()
        with dec.lock:
            logits, evaluated = dec._sync(self, view)
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
                view.append(token)
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
                    if len(view) > capacity:
                        view, logits, dropped = dec._evict(self, view)
                        evicted += dropped
                    else:
                        logits = dec._step(self, view)
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
                                       t_first or t_end, t_end, decode_forwards, evicted)

    def _result(
        self, pieces: list[str], generated: list[int], finish: FinishReason, evaluated: int,
        prefill_s: float, t_first: float, t_end: float, decode_forwards: int, evicted: int,
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
            cached_tokens=max(0, len(self._view) - evaluated),
            evicted_tokens=evicted,
            dropped_prompt_tokens=n_prompt - len(self._view),
        )
        logger.debug("generation: %d+%d tokens, %s, %.1f decode tok/s",
                     n_prompt, n_out, finish, timings.decode_tps)
        return Result("".join(pieces), generated, finish, timings, n_prompt, n_out)
