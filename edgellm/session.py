"""Sessions: one conversation each, with its own KV cache, on weights loaded once.

``model.session()`` opens a :class:`Session` on the model's engine; the model's own
``generate`` / ``stream`` / ``chat`` run on a default session opened at first use. Both
share one implementation (:class:`Conversation`), so a session behaves exactly like the
model did before sessions existed. Every session's KV cache is reserved against the
model's ``kv_budget``; closing a session gives its bytes back.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from edgellm.errors import ContextOverflowError, InvalidInputError, ModelClosedError
from edgellm.kvcache import KVAbility, Overflow, OverflowPolicy
from edgellm.runtimes.loop import Decoder, Generation, Result, check_ids
from edgellm.runtimes.sampling import SamplingParams
from edgellm.text.chat import DEFAULT_CHATML, check_text, encode_chat, validate_messages

if TYPE_CHECKING:
    import os

    from edgellm.kvcache import KVCache
    from edgellm.model import Model
    from edgellm.runtimes.base import BackendSession
    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["Conversation", "Session"]


class Conversation:
    """``generate``, ``stream`` and ``chat``, written once for :class:`Session` and ``Model``."""

    def _conversation(self) -> Session:  # pragma: no cover - both subclasses override it
        raise NotImplementedError

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        *,
        parse_special: bool = True,
    ) -> Result:
        """Complete ``prompt`` (text, or token ids used as they are) and return the Result.

        ``temperature <= 0`` decodes greedily. Generation ends at EOS, after ``max_tokens``
        (clamped to the room left in the KV cache unless ``kv_overflow="sliding"``) or before
        the first stop string, which is not included in the text. ``ignore_eos`` keeps
        decoding past end-of-sequence tokens (benchmarks that need a fixed number of tokens).

        ``parse_special`` (default True, as ``llama-cli`` tokenizes a raw prompt) turns text
        such as ``"<|im_end|>"`` in a str prompt into that special token; pass False when the
        prompt holds text from someone else (a server's user), so it stays text. :meth:`chat`
        always keeps message contents as text.
        """
        conv = self._conversation()
        conv._check_open()
        t0 = time.perf_counter()
        ids = conv._prompt_ids(prompt, parse_special)
        params = conv._params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        eos = frozenset() if ignore_eos else None
        return conv._finish(conv._start(ids, params, max_tokens, stop, t0, eos_ids=eos))

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        *,
        parse_special: bool = True,
    ) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as they are decoded.

        Arguments are checked now, not at the first piece. Pieces are always whole
        characters and never contain (the start of) a matched stop string.
        """
        conv = self._conversation()
        conv._check_open()
        t0 = time.perf_counter()
        ids = conv._prompt_ids(prompt, parse_special)
        params = conv._params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        eos = frozenset() if ignore_eos else None
        return conv._follow(conv._start(ids, params, max_tokens, stop, t0, eos_ids=eos))

    @overload
    def chat(self, messages: Sequence[dict[str, Any]], max_tokens: int = ..., temperature: float = ...,
             top_k: int = ..., top_p: float = ..., min_p: float = ..., repeat_penalty: float = ...,
             seed: int | None = ..., stop: str | Sequence[str] | None = ..., *,
             stream: Literal[False] = ..., tools: Sequence[dict[str, Any]] | None = ...) -> Result: ...

    @overload
    def chat(self, messages: Sequence[dict[str, Any]], max_tokens: int = ..., temperature: float = ...,
             top_k: int = ..., top_p: float = ..., min_p: float = ..., repeat_penalty: float = ...,
             seed: int | None = ..., stop: str | Sequence[str] | None = ..., *,
             stream: Literal[True], tools: Sequence[dict[str, Any]] | None = ...) -> Iterator[str]: ...

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        stream: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Result | Iterator[str]:
        """Answer a conversation: ``[{"role": "user", "content": "Hi"}, ...]``.

        The tokenizer's chat template (ChatML when the model has none) renders the
        messages with an assistant prompt; BOS is added only if the template did not
        already write it. The reply also ends at the template's end-of-turn token. Under
        ``kv_overflow="truncate"`` the oldest whole turns are dropped (system messages
        always stay) until the conversation leaves room for ``max_tokens`` (at most half
        the cache). With ``stream=True`` an iterator of text pieces is returned.
        """
        conv = self._conversation()
        conv._check_open()
        t0 = time.perf_counter()
        ids, template = conv._chat_ids(messages, tools, max_tokens)
        params = conv._params(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        eos = conv.tokenizer.eos_ids | conv._model._end_of_turn_ids(template)
        gen = conv._start(ids, params, max_tokens, stop, t0, eos_ids=eos)
        return conv._follow(gen) if stream else conv._finish(gen)

    def chat_tokens(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                    max_tokens: int = 256) -> list[int]:
        """The token ids :meth:`chat` would evaluate for ``messages`` (after ``truncate``, if set).

        A server uses it to find the session that already holds a conversation's start.
        """
        conv = self._conversation()
        conv._check_open()
        return conv._chat_ids(messages, tools, max_tokens)[0]


class Session(Conversation):
    """One conversation on a loaded model: its own KV cache and token history.

    Open one with ``model.session()``; use it like the model (``generate``, ``stream``,
    ``chat``); ``save(path)`` keeps its cache for ``model.restore(path)``; ``close()``
    frees its cache and gives its bytes back to the model's ``kv_budget``. Sessions of one
    model may run at the same time from different threads.
    """

    def __init__(self, model: Model, backend: BackendSession, policy: OverflowPolicy,
                 capacity_note: str, budget_key: object) -> None:
        self._model = model
        self.budget_key = budget_key  # what this session reserved of the model's kv_budget
        self._backend = backend
        self.policy = policy
        self._decoder = Decoder(backend, model.tokenizer, model.engine.n_vocab, policy, capacity_note,
                                tuner=getattr(model.engine, "tuner", None))
        self.last_result: Result | None = None
        self._closed = False
        self._live: weakref.WeakSet[Generation] = weakref.WeakSet()  # generations started here
        self._spares: weakref.WeakKeyDictionary[Generation, Session] = weakref.WeakKeyDictionary()

    def _conversation(self) -> Session:
        return self

    # -- facts ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self._model.tokenizer

    @property
    def cache(self) -> KVCache:
        """This session's KV cache: capacity, precision, bytes held, abilities."""
        return self._backend.cache

    @property
    def n_ctx(self) -> int:
        """The KV cache's capacity in tokens."""
        return self._backend.n_ctx

    @property
    def tokens(self) -> list[int]:
        """The ids the KV cache holds now, in position order."""
        return self._decoder.state

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def logprobs(self, text: str | Sequence[int], chunk: int = 64) -> np.ndarray:
        """Log-probability of each token of ``text`` after the first, under this session's policy.

        ``exp(-mean)`` of the result is the perplexity. Under ``kv_overflow="sliding"`` a text
        longer than the cache is scored through the sliding window (what a long conversation
        sees); the other policies refuse it. The session's cache holds the text afterwards.
        """
        self._check_open()
        return self._decoder.logprobs(self._prompt_ids(text), chunk)

    # -- lifecycle -----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the next call evaluates its whole prompt)."""
        self._check_open()
        self._decoder.reset()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this session's KV cache and tokens to ``path`` (atomically); see ``model.restore``."""
        from edgellm.kvcache.statefile import write_state

        self._check_open()
        if not self.cache.can(KVAbility.SNAPSHOT):
            raise InvalidInputError(f"backend {self._model.engine.backend!r} cannot snapshot its KV cache")
        with self._decoder.lock:
            if self._backend.n_past != len(self._decoder._state):
                raise InvalidInputError("this session's cache is being rebuilt; save it after the generation")
            ids, payload = list(self._decoder._state), self._backend.save_state()
        return write_state(Path(path), self._model.state_header(self, ids), payload)

    def close(self) -> None:
        """Free the KV cache and give its bytes back to the budget; calling it twice is harmless."""
        with self._decoder.lock:
            if self._closed:
                return
            self._closed = True
            self._backend.close()
        self._model._forget(self)

    def __enter__(self) -> Session:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (f"Session(n_ctx={self.n_ctx}, tokens={self._backend.n_past}, "
                f"kv_overflow={self.policy.kind.value!r}{state})")

    # -- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ModelClosedError("this session is closed; open another with model.session()")
        self._model._check_open()

    def _params(self, temperature: float, top_k: int, top_p: float, min_p: float,
                repeat_penalty: float, seed: int | None) -> SamplingParams:
        return SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty,
                              seed=self._model._seed(seed))

    def _prompt_ids(self, prompt: str | Sequence[int], parse_special: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(check_text(prompt, "the prompt"), add_special=True,
                                         parse_special=bool(parse_special))
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise InvalidInputError(
                f"prompt must be a str or a sequence of int token ids, not {type(prompt).__name__}"
            )
        return check_ids(prompt, self._model.engine.n_vocab, "prompt")

    def _chat_ids(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                  max_tokens: int) -> tuple[list[int], str]:
        template = self.tokenizer.chat_template or DEFAULT_CHATML
        msgs = validate_messages(messages)
        ids = self._encode_chat(msgs, template, tools)
        if self.policy.kind is Overflow.TRUNCATE:
            ids, msgs = self._truncate_turns(msgs, ids, template, tools, max_tokens)
        return ids, template

    def _encode_chat(self, messages: list[dict[str, Any]], template: str,
                     tools: Sequence[dict[str, Any]] | None) -> list[int]:
        return encode_chat(self.tokenizer, template, messages, tools=tools)

    def _truncate_turns(self, msgs: list[dict[str, Any]], ids: list[int], template: str,
                        tools: Sequence[dict[str, Any]] | None, max_tokens: int
                        ) -> tuple[list[int], list[dict[str, Any]]]:
        """Drop the oldest whole turns (a user message and the replies after it) until it fits."""
        reserve = max(1, min(max_tokens, self.n_ctx // 2))
        while len(ids) + reserve > self.n_ctx:
            turns = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if len(turns) < 2:
                raise ContextOverflowError(
                    f"the system prompt and the last turn need {len(ids)} tokens, plus {reserve} for the "
                    f"reply, but the session's KV cache holds {self.n_ctx} tokens; shorten them or "
                    "raise n_ctx or kv_budget"
                )
            first, nxt = turns[0], turns[1]
            msgs = msgs[:first] + msgs[nxt:]
            ids = self._encode_chat(msgs, template, tools)
        return ids, msgs

    def _start(self, ids: list[int], params: SamplingParams, max_tokens: int,
               stop: str | Sequence[str] | None, t0: float, eos_ids: frozenset[int] | None = None,
               ) -> Generation:
        """A generation on this session, or on a spare one when this is the model's busy default.

        Two generations on one session take turns in its cache: each turn re-reads the other's
        tokens in one batch, whose logits differ (slightly, on int4) from step-by-step decoding.
        So a call on the model while its default session has a generation running (another
        stream, another thread) gets a session of its own, closed when the generation ends.
        """
        self._check_open()
        stops = () if stop is None else stop
        with self._model._lock:
            spare = self._model._spare_for(self) if self._busy() else None
            runner = spare or self
            gen = runner._decoder.run(ids, params, max_tokens, stops, eos_ids=eos_ids, started_at=t0)
            self._live.add(gen)
        if spare is not None:
            self._spares[gen] = spare
            weakref.finalize(gen, spare.close)  # a stream dropped unread frees its session too
        return gen

    def _busy(self) -> bool:
        return any(g.result is None for g in self._live)

    def _finish(self, gen: Generation) -> Result:
        try:
            gen.text()
        finally:
            self._release(gen)
        assert gen.result is not None
        self.last_result = gen.result
        return gen.result

    def _follow(self, gen: Generation) -> Iterator[str]:
        try:
            yield from gen
        finally:
            gen.close()
            self._release(gen)
            if gen.result is not None:
                self.last_result = gen.result

    def _release(self, gen: Generation) -> None:
        spare = self._spares.pop(gen, None)
        if spare is not None:
            spare.close()
