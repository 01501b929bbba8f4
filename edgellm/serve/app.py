"""The OpenAI-compatible HTTP app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

:class:`Server` puts a loaded :class:`~edgellm.model.Model` behind Starlette. Each request
takes a session from the :class:`~edgellm.serve.pool.SessionPool` (prefix-aware, bounded
queue, 503 past it) and generates on a worker thread, so the event loop never blocks on a
forward pass; text pieces cross back to the loop through an ``asyncio.Queue``. When the
client disconnects, the worker stops at its next piece and the session goes back to the
pool. ``/health`` and ``/metrics`` (Prometheus text) report on it.

Only the request's own session ever writes its stream, so one request's tokens cannot
appear in another's; under greedy decoding an answer is the one the request gets alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgellm.errors import ContextOverflowError, EdgeLLMError, InvalidInputError, MissingDependencyError
from edgellm.kvcache import Overflow
from edgellm.runtimes.loop import check_ids
from edgellm.serve.guard import Guard, GuardConfig
from edgellm.serve.metrics import Metrics
from edgellm.serve.pool import SessionPool, session_size
from edgellm.serve.protocol import (
    APIError,
    GenRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    parse_request,
    usage,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from edgellm.model import Model
    from edgellm.runtimes.loop import Result
    from edgellm.session import Session

logger = logging.getLogger(__name__)

__all__ = ["Server", "ServerConfig", "create_app", "require_stack"]


def require_stack() -> None:
    """Raise MissingDependencyError unless Starlette and uvicorn are installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"the server needs Starlette and uvicorn ({exc.name} is missing); "
            'pip install "edgellm[serve]"'
        ) from None


@dataclass(frozen=True)
class ServerConfig:
    """How :class:`Server` runs: the bind, the sessions, the limits.

    ``parallel`` sessions of ``n_ctx`` tokens are opened at start (fewer if ``kv_budget``
    holds fewer; without ``n_ctx`` a budget is shared ``parallel`` ways); ``max_queue``
    requests may wait for one. ``api_key`` is required for a non-loopback ``host``.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    model_id: str = "edgellm"
    parallel: int = 4
    n_ctx: int | None = None
    max_queue: int = 8
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    created: int = field(default_factory=lambda: int(time.time()))


class _Job:
    """One generation on a worker thread: its queue of events, its stop flag, its outcome."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel = threading.Event()

    def push(self, kind: str, value: Any) -> None:
        """From the worker thread: hand an event to the loop."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


class Server:
    """A model behind the OpenAI API; ``app`` is the ASGI application."""

    def __init__(self, model: Model, config: ServerConfig | None = None) -> None:
        require_stack()
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.model, self.config = model, config or ServerConfig()
        cfg = self.config
        n_ctx = session_size(model, cfg.parallel, cfg.n_ctx)
        self.pool = SessionPool(model, cfg.parallel, n_ctx, cfg.max_queue, cfg.retry_after_s)
        self._workers = ThreadPoolExecutor(max_workers=self.pool.slots, thread_name_prefix="edgellm-serve")
        self.fingerprint = f"edgellm-{_version()}-{model.engine.backend}"
        self.metrics = Metrics({
            "requests_running": ("Requests generating now.", lambda: self.pool.running),
            "requests_waiting": ("Requests queued for a session.", lambda: self.pool.waiting),
            "sessions": ("Sessions (slots) open.", lambda: self.pool.slots),
            "kv_cache_bytes": ("KV cache bytes the sessions hold now.", self._kv_bytes),
            "kv_budget_bytes": ("The model's KV budget (-1: none).",
                                lambda: -1 if model.budget.total_bytes is None else model.budget.total_bytes),
        })
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.one_model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.complete, methods=["POST"]),
        ]
        guard = GuardConfig.for_bind(cfg.host, cfg.api_key, cfg.cors_origins, cfg.allowed_hosts,
                                     cfg.max_body_bytes)
        self.starlette = Starlette(routes=routes, exception_handlers={404: self._not_found,
                                                                      405: self._not_allowed})
        self.app = Guard(self.starlette, guard)
        logger.info("serving %s: %d sessions of %d tokens, queue %d", cfg.model_id, self.pool.slots,
                    n_ctx, cfg.max_queue)

    def close(self) -> None:
        """Stop the workers and close the sessions (the model stays open)."""
        self.pool.interrupt()  # running generations stop at their next token
        self._workers.shutdown(wait=True, cancel_futures=True)
        self.pool.close()

    # -- small endpoints -----------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """``{"status": "ok"}`` with the sessions' state; never needs the API key."""
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "sessions": self.pool.slots, "running": self.pool.running,
                             "waiting": self.pool.waiting})

    async def prometheus(self, request: Request) -> Response:
        """Counters, histograms and gauges in Prometheus' text format."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import PlainTextResponse

        # Asking a backend for the bytes its caches hold can wait for a running forward pass:
        # never on the event loop.
        gauges = await run_in_threadpool(self.metrics.read_gauges)
        return PlainTextResponse(self.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_id, "object": "model", "created": self.config.created,
                "owned_by": "edgellm", "meta": {k: v for k, v in self.model.info().items()
                                                if isinstance(v, (str, int, float, bool))}}

    async def models(self, request: Request) -> Response:
        """The one model this server runs."""
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        """The model's card, or 404."""
        from starlette.responses import JSONResponse

        if request.path_params["model_id"] != self.config.model_id:
            return _error(self._unknown_model(request.path_params["model_id"]))
        return JSONResponse(self._model_card())

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(APIError(404, f"no endpoint {request.url.path!r}; this server has "
                               "/v1/chat/completions, /v1/completions, /v1/models, /health and /metrics",
                               code="unknown_url"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                               code="method_not_allowed"))

    # -- completions ---------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        return await self._endpoint(request, "chat")

    async def complete(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        return await self._endpoint(request, "completion")

    async def _endpoint(self, request: Request, kind: str) -> Response:
        endpoint = request.url.path
        try:
            req = parse_request(kind, await request.body())  # type: ignore[arg-type]
            if req.model != self.config.model_id:
                raise self._unknown_model(req.model)
            ids = await self._prompt_ids(req)
            session = await self.pool.acquire(ids if req.cache_prompt else [])
        except APIError as exc:
            self.metrics.request(endpoint, exc.status)
            return _error(exc)
        job = _Job(asyncio.get_running_loop())
        self._workers.submit(self._work, session, req, ids, job)
        watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
        self.metrics.request(endpoint, 200)
        if req.stream:
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._events(req, job, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await self._whole(req, job)
        finally:
            job.cancel.set()
            watcher.cancel()

    def _unknown_model(self, name: str) -> APIError:
        return APIError(404, f"the model {name!r} does not exist here; this server runs "
                        f"{self.config.model_id!r} (see /v1/models)", param="model", code="model_not_found")

    async def _prompt_ids(self, req: GenRequest) -> list[int]:
        """The request's prompt as token ids (rendered and tokenized off the event loop), checked
        against a session's size."""
        from starlette.concurrency import run_in_threadpool

        probe = self.pool.any_session()
        ids = await run_in_threadpool(self._tokens, req, probe)
        self._fit_max_tokens(req, len(ids))
        return ids

    def _tokens(self, req: GenRequest, probe: Session) -> list[int]:
        pool = self.pool
        try:
            if req.kind == "chat":
                ids = probe.chat_tokens(req.messages or [], max_tokens=req.max_tokens or pool.n_ctx // 2)
            elif isinstance(req.prompt, str):
                ids = self.model.tokenize(req.prompt)
            else:
                ids = check_ids(req.prompt or [], self.model.engine.n_vocab, "prompt")
        except (ContextOverflowError, InvalidInputError) as exc:
            raise APIError(400, str(exc), param="messages" if req.kind == "chat" else "prompt",
                           code="context_length_exceeded" if isinstance(exc, ContextOverflowError)
                           else None) from None
        return ids

    def _fit_max_tokens(self, req: GenRequest, n_prompt: int) -> None:
        """Cap ``max_tokens`` by the room the prompt leaves; 400 when it can never fit."""
        n_ctx, what = self.pool.n_ctx, "messages" if req.kind == "chat" else "prompt"
        room = n_ctx - n_prompt
        if req.max_tokens is not None and req.max_tokens > n_ctx:
            raise APIError(400, f"max_tokens {req.max_tokens} is more than a session's whole context of "
                           f"{n_ctx} tokens; ask for at most {max(room, 0)}", param="max_tokens",
                           code="context_length_exceeded")
        if self.model.policy.kind is Overflow.SLIDING:
            req.max_tokens = req.max_tokens or n_ctx
        elif room < 1:
            raise APIError(400, f"the prompt has {n_prompt} tokens, which fills a session's context of "
                           f"{n_ctx} tokens; shorten it", param=what, code="context_length_exceeded")
        else:  # capped by the room the prompt leaves, as llama.cpp's server does (finish_reason "length")
            req.max_tokens = min(req.max_tokens or room, room)

    # -- the worker thread ---------------------------------------------------------------

    def _work(self, session: Session, req: GenRequest, ids: list[int], job: _Job) -> None:
        result: Result | None = None
        try:
            kwargs = {**req.sampling, "max_tokens": req.max_tokens, "stop": list(req.stop) or None}
            if not req.cache_prompt:
                session.reset()
            if req.kind == "chat":
                pieces = session.chat(req.messages or [], stream=True, **kwargs)
            else:  # the ids tokenized for the length check, not the text again
                pieces = session.stream(ids, **kwargs)
            try:
                for piece in pieces:
                    if job.cancel.is_set():
                        break
                    job.push("text", piece)
            finally:
                pieces.close()  # type: ignore[attr-defined]
            result = session.last_result
            job.push("done", result)
        except Exception as exc:  # every error goes to the client, none kills the server
            if not isinstance(exc, EdgeLLMError):
                logger.exception("generation failed")
            job.push("error", exc)
        finally:
            job.loop.call_soon_threadsafe(self._finished, session, result, job.cancel.is_set())

    def _finished(self, session: Session, result: Result | None, cancelled: bool) -> None:
        self.pool.release(session)
        if result is not None:
            t = result.timings
            tpot = t.decode_ms / 1e3 / (t.completion_tokens - 1) if t.completion_tokens > 1 else None
            self.metrics.generation(t.prompt_tokens, t.completion_tokens, t.cached_tokens,
                                    t.ttft_ms / 1e3, tpot, cancelled)

    # -- replies -------------------------------------------------------------------------

    async def _whole(self, req: GenRequest, job: _Job) -> Response:
        from starlette.responses import JSONResponse

        texts = []
        while True:
            kind, value = await job.queue.get()
            if kind == "text":
                texts.append(value)
            elif kind == "error":
                return _error(_api_error(value))
            else:
                res: Result = value
                use = usage(res.prompt_tokens, res.completion_tokens, res.timings.cached_tokens)
                build = chat_response if req.kind == "chat" else completion_response
                return JSONResponse(build(req, "".join(texts), res.finish_reason, use, self.fingerprint))

    async def _events(self, req: GenRequest, job: _Job, watcher: asyncio.Task[None]) -> AsyncIterator[bytes]:
        chunk: Callable[..., dict[str, Any]] = chat_chunk if req.kind == "chat" else completion_chunk
        fp = self.fingerprint
        try:
            if req.kind == "chat":
                yield _sse(chat_chunk(req, fp, role=True))
            while True:
                kind, value = await job.queue.get()
                if kind == "text":
                    yield _sse(chunk(req, fp, text=value))
                    continue
                if kind == "error":
                    yield _sse(_api_error(value).body())
                else:
                    res: Result = value
                    yield _sse(chunk(req, fp, finish=res.finish_reason))
                    if req.include_usage:
                        use = usage(res.prompt_tokens, res.completion_tokens, res.timings.cached_tokens)
                        yield _sse(chunk(req, fp, use=use))
                yield b"data: [DONE]\n\n"
                return
        finally:
            job.cancel.set()  # the client left (or the stream ended): stop at the next token
            watcher.cancel()

    def _kv_bytes(self) -> int:
        return sum(s.cache.held_bytes() for s in self.model.sessions)


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidInputError):
        return APIError(400, str(exc))
    return APIError(500, f"generation failed: {exc}", type="server_error")


def _error(exc: APIError) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _version() -> str:
    from edgellm import __version__

    return __version__


def create_app(model: Model, config: ServerConfig | None = None) -> Server:
    """A :class:`Server` for ``model``; serve ``server.app`` with any ASGI server."""
    return Server(model, config)

