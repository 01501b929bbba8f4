"""The server's sessions: opened once, handed to one request at a time, queued when busy.

Every slot is a :class:`~edgellm.session.Session` with its own KV cache, opened at start
against the model's ``kv_budget`` (as llama.cpp's server allocates its slots), so the
server's memory is fixed before the first request. A request takes the idle session whose
cache its prompt continues (a multi-turn client that resends its history finds its earlier
turns there and is not prefilled again), else one sharing most of the prompt, else the
least recently used one. When none is idle the request waits in a bounded FIFO queue; past it,
:class:`~edgellm.serve.protocol.APIError` 503 with ``Retry-After``.

The pool lives on the event loop's thread: ``acquire`` is a coroutine; worker threads give
sessions back through ``loop.call_soon_threadsafe(pool.release, session)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from edgellm.errors import InvalidInputError, KVBudgetError
from edgellm.kvcache import format_bytes
from edgellm.runtimes.loop import common_prefix
from edgellm.serve.protocol import APIError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from edgellm.model import Model
    from edgellm.session import Session

logger = logging.getLogger(__name__)

__all__ = ["SessionPool", "session_size"]

#: Smallest session the server opens: below it a chat template alone may not fit.
MIN_SESSION_TOKENS = 64


def session_size(model: Model, parallel: int, n_ctx: int | None) -> int:
    """Tokens per session: ``n_ctx``, else the model's, shared ``parallel`` ways under a budget."""
    if n_ctx is not None:
        return n_ctx
    budget = model.budget.total_bytes
    if budget is None:
        return model.n_ctx
    bpt = model.engine.kv_bytes_per_token()
    size = min(model.n_ctx, budget // (parallel * bpt))
    if size < MIN_SESSION_TOKENS:
        raise InvalidInputError(
            f"kv_budget {format_bytes(budget)} holds {size} tokens per session for {parallel} sessions "
            f"({bpt} B/token); lower --parallel or raise --kv-budget (at least "
            f"{format_bytes(parallel * MIN_SESSION_TOKENS * bpt)})"
        )
    return size


#: A session whose cache is not wholly a prefix of the prompt is reused only when the shared
#: prefix covers more than this share of the prompt (llama.cpp's server's
#: ``slot_prompt_similarity`` rule): every prompt starts with the same template header,
#: and taking a session for that alone would throw away another conversation's cache.
SIMILARITY = 0.5


def _score(held: Sequence[int], ids: Sequence[int]) -> tuple[int, int]:
    """(2, n) when the cache is all a prefix of the prompt, (1, n) when it shares most of it, else (0, 0)."""
    n = common_prefix(held, ids)
    if n and n == len(held):
        return 2, n  # the prompt continues this conversation: nothing is thrown away
    if ids and n / len(ids) > SIMILARITY:
        return 1, n
    return 0, 0


class SessionPool:
    """``slots`` sessions of ``n_ctx`` tokens; at most ``max_queue`` requests wait for one."""

    def __init__(self, model: Model, parallel: int, n_ctx: int, max_queue: int,
                 retry_after_s: int = 1) -> None:
        self.model, self.n_ctx, self.max_queue, self.retry_after_s = model, n_ctx, max_queue, retry_after_s
        self._idle: list[Session] = []  # least recently used first
        self._busy: set[Session] = set()
        self._waiters: deque[tuple[list[int], asyncio.Future[Session]]] = deque()
        self._open(parallel)

    def _open(self, parallel: int) -> None:
        for i in range(parallel):
            try:
                self._idle.append(self.model.session(self.n_ctx))
            except KVBudgetError as exc:
                if i == 0:
                    raise
                logger.warning("kv_budget holds %d of %d sessions of %d tokens: %s",
                               i, parallel, self.n_ctx, exc)
                return

    # -- counts (for /metrics) -----------------------------------------------------------

    @property
    def slots(self) -> int:
        """Sessions the pool holds (one closed in use is not given back)."""
        return len(self._idle) + len(self._busy)

    @property
    def running(self) -> int:
        """Requests holding a session now."""
        return len(self._busy)

    @property
    def waiting(self) -> int:
        """Requests in the queue."""
        return sum(1 for _, fut in self._waiters if not fut.done())

    def any_session(self) -> Session:
        """A session to render and tokenize with (all have the same size and policy)."""
        return self._idle[0] if self._idle else next(iter(self._busy))

    # -- handing out ---------------------------------------------------------------------

    async def acquire(self, ids: Sequence[int]) -> Session:
        """The best idle session for ``ids``; waits in the queue, or raises 503 when it is full."""
        if self._idle:
            return self._take(ids)
        if self.waiting >= self.max_queue:
            raise APIError(503, f"all {self.slots} sessions are busy and {self.max_queue} requests are "
                           "waiting; retry later", type="server_error", code="server_busy",
                           headers={"Retry-After": str(self.retry_after_s)})
        fut: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._waiters.append((list(ids), fut))
        try:
            return await fut
        except asyncio.CancelledError:
            # The client left while queued; a session handed over at that moment goes back.
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            raise

    def release(self, session: Session) -> None:
        """Give ``session`` back: to the first request waiting, else to the idle list."""
        self._busy.discard(session)
        if session.closed:
            logger.error("a server session was closed while in use; %d slots left", self.slots)
        else:
            self._idle.append(session)
        while self._waiters and self._idle:
            ids, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._take(ids))

    def _take(self, ids: Sequence[int]) -> Session:
        """The idle session that best continues ``ids`` (see :func:`_score`), else the LRU one."""
        best, best_score = 0, (0, 0)
        for i, s in enumerate(self._idle):
            score = _score(s.tokens, ids)
            if score > best_score:
                best, best_score = i, score
        session = self._idle.pop(best)
        self._busy.add(session)
        return session

    def interrupt(self) -> None:
        """Close the sessions in use: their generations end with an error at the next token."""
        for s in list(self._busy):
            s.close()

    def close(self) -> None:
        """Close every session (the model stays open)."""
        for fut in (f for _, f in self._waiters if not f.done()):
            fut.cancel()
        for s in [*self._idle, *self._busy]:
            s.close()
        self._idle.clear()
        self._busy.clear()
