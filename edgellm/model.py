"""The public model object returned by :func:`edgellm.load`.

A :class:`Model` holds one :class:`~edgellm.runtimes.base.Engine` (the weights, loaded
once) and the :class:`~edgellm.session.Session` objects open on it, each with its own KV
cache reserved against the model's ``kv_budget``. ``model.generate`` / ``stream`` / ``chat``
run on a default session opened at first use; ``model.session()`` opens more. The shared
decode loop (:mod:`edgellm.runtimes.loop`) runs every session, so behaviour is identical on
llama.cpp, OpenVINO, ONNX Runtime and the fake backend.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgellm.errors import InvalidInputError, KVBudgetError, ModelClosedError, SessionStateError
from edgellm.kvcache import KVBudget, OverflowPolicy, format_bytes, parse_bytes
from edgellm.kvcache.policy import DEFAULT_SINKS
from edgellm.runtimes.loop import Result, check_ids
from edgellm.runtimes.sampling import check_seed
from edgellm.session import Conversation, Session
from edgellm.text.chat import DEFAULT_CHATML, check_text, render_chat

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from edgellm.runtimes.base import Engine
    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["Model"]

#: End-of-turn markers of common chat formats. When the chat template uses one and the
#: tokenizer has it as a special token, chat() also stops on it, even if the model's
#: generation config does not list it as EOS (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class Model(Conversation):
    """A loaded language model: generate, stream and chat, on as many sessions as fit.

    ``manifest`` is the artifact manifest (``edgellm.json``) when the model came from one.
    ``n_ctx`` is the size of a session's KV cache in tokens; ``kv_budget`` (bytes, or a size
    such as ``"96MiB"``) caps the KV bytes of every session together, and without ``n_ctx``
    a session gets the whole budget. ``kv_overflow`` and ``kv_sinks`` choose what happens
    when a cache is full (:class:`~edgellm.kvcache.OverflowPolicy`). Calls from several
    threads are safe. After a ``stream()`` or ``chat(stream=True)`` on the default session is
    exhausted or closed, its :class:`Result` is in ``last_result``.
    """

    def __init__(self, engine: Engine, manifest: dict[str, Any] | None = None, seed: int | None = None,
                 *, n_ctx: int | None = None, kv_budget: int | str | None = None,
                 kv_overflow: str = "error", kv_sinks: int = DEFAULT_SINKS) -> None:
        self.engine = engine
        check_seed(seed)
        # Calls without their own seed draw one from this stream: load(seed=N) makes a
        # model's samples reproducible, as llama.cpp's context seed does.
        self._seeds = np.random.default_rng(seed)
        self.manifest: dict[str, Any] = dict(manifest or {})
        self.policy = OverflowPolicy.parse(kv_overflow, kv_sinks)
        self.budget = KVBudget(None if kv_budget is None else parse_bytes(kv_budget))
        self.n_ctx = self._session_ctx(n_ctx)
        self._sessions: list[Session] = []
        self._default: Session | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._end_of_turn: dict[str, frozenset[int]] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        """The engine's tokenizer."""
        return self.engine.tokenizer

    @property
    def last_result(self) -> Result | None:
        """The default session's last finished generation."""
        return self._default.last_result if self._default is not None else None

    # -- sessions -----------------------------------------------------------------------

    def session(self, n_ctx: int | None = None, kv_overflow: str | None = None,
                kv_sinks: int | None = None) -> Session:
        """Open another conversation on the same weights, with its own KV cache.

        ``n_ctx`` defaults to the model's; the overflow policy to the model's. The cache is
        reserved against ``kv_budget``: when it does not fit, :class:`~edgellm.errors.KVBudgetError`
        says how much is free.
        """
        self._check_open()
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2):
            raise InvalidInputError(f"n_ctx must be an integer >= 2, got {n_ctx!r}")
        policy = OverflowPolicy.parse(kv_overflow or self.policy.kind,
                                      self.policy.sinks if kv_sinks is None else kv_sinks)
        size = n_ctx or self.n_ctx
        policy.check_capacity(size)
        bpt = self._check_ctx(size)
        with self._lock:
            key = object()  # this session's entry in the budget
            self.budget.reserve(key, size * bpt, f"a session of {size} tokens")
            try:
                backend = self.engine.open_session(size)
                session = Session(self, backend, policy, self._capacity_note(size, bpt), key)
            except BaseException:
                self.budget.release(key)
                raise
            self._sessions.append(session)
        return session

    @property
    def sessions(self) -> list[Session]:
        """The sessions open now (the default one included once used)."""
        with self._lock:
            return list(self._sessions)

    def restore(self, path: str | os.PathLike[str], n_ctx: int | None = None) -> Session:
        """A new session holding the KV cache saved by ``session.save(path)``.

        The file must come from this model's weights, backend and KV precision; a damaged
        file or another model's is refused with :class:`~edgellm.errors.SessionStateError`.
        The next call on the session reuses the restored tokens as a prefix.
        """
        from edgellm.kvcache.statefile import check_header, read_state

        self._check_open()
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"restore() takes a file path, not {type(path).__name__}")
        p = Path(path)
        header, payload = read_state(p)
        check_header(p, header, self._identity())
        tokens = header["tokens"]
        session = self.session(n_ctx or max(self.n_ctx, int(header.get("n_ctx") or 0)) or None)
        if len(tokens) > session.n_ctx:
            session.close()
            raise SessionStateError(f"{p} holds {len(tokens)} tokens, more than a session of "
                                    f"{session.n_ctx}; restore it with n_ctx >= {len(tokens)}")
        try:
            with session._decoder.lock:
                session._backend.load_state(payload, len(tokens))
            session._decoder.adopt(tokens)
        except BaseException:
            session.close()
            raise
        return session

    def state_header(self, session: Session, ids: list[int]) -> dict[str, Any]:
        """What a saved session records besides the cache bytes (see ``Session.save``)."""
        return {**self._identity(), "n_ctx": session.n_ctx, "tokens": ids,
                "model": self.manifest.get("name")}

    def _identity(self) -> dict[str, Any]:
        return {"fingerprint": self.engine.fingerprint(), "backend": self.engine.backend,
                "kv_precision": self.engine.kv_precision}

    # -- memory -------------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        """Bytes held now, by part, under the planner's keys.

        ``weights`` and ``compute`` come from the engine (measured where the backend
        reports them, None where it does not), ``kv`` is what every open session's cache
        holds (asked from the backend), ``kv_reserved`` what the sessions reserved of
        ``kv_budget``, ``rss`` this process's resident memory and ``other`` the rest of it
        (runtime, tokenizer, Python).
        """
        from edgellm.profiling.memory import current_rss_bytes

        self._check_open()
        parts: dict[str, Any] = dict(self.engine.memory())
        with self._lock:
            caches = [s.cache for s in self._sessions]
        parts["kv"] = sum(c.held_bytes() for c in caches)
        parts["kv_reserved"] = self.budget.reserved_bytes
        parts["kv_budget"] = self.budget.total_bytes
        parts["sessions"] = len(caches)
        parts["rss"] = current_rss_bytes()
        known = sum(v for k, v in parts.items() if k in ("weights", "compute", "kv") and v)
        parts["other"] = parts["rss"] - known
        return parts

    # -- text ---------------------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text :meth:`chat` would send, for inspection and debugging."""
        self._check_open()
        tok = self.tokenizer
        return render_chat(
            tok.chat_template or DEFAULT_CHATML, messages, bos_token=tok.bos_token,
            eos_token=tok.eos_token, add_generation_prompt=add_generation_prompt, tools=tools,
        )

    # -- tokens -------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_special`` and the model uses one.

        ``parse_special`` turns text such as ``"<|im_end|>"`` into that special token (as
        ``generate`` does by default); False keeps it text.
        """
        self._check_open()  # a closed llama.cpp model has freed its vocabulary
        if not isinstance(text, str):
            raise InvalidInputError(f"tokenize() takes a str, not {type(text).__name__}")
        return self.tokenizer.encode(check_text(text, "the text"), add_special=bool(add_special),
                                     parse_special=bool(parse_special))

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of token ``ids`` (each in ``[0, tokenizer.vocab_size)``)."""
        self._check_open()
        return self.tokenizer.decode(check_ids(ids, self.tokenizer.vocab_size, "detokenize()"),
                                     skip_special=skip_special)

    # -- lifecycle ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Engine facts (backend, device, ...), the session size and policy, manifest basics."""
        self._check_open()
        info = dict(self.engine.info())
        info.setdefault("backend", self.engine.backend)
        info["n_ctx"] = self.n_ctx
        info.setdefault("n_vocab", self.engine.n_vocab)
        info["kv_precision"] = self.engine.kv_precision
        info["kv_bytes_per_token"] = self.engine.kv_bytes_per_token()
        info["kv_budget"] = self.budget.total_bytes
        info["kv_overflow"] = self.policy.kind.value
        info["kv_sinks"] = self.policy.sinks
        for key in ("name", "format", "quantization", "architecture", "source"):
            if key in self.manifest:
                info.setdefault(key, self.manifest[key])
        return info

    def reset(self) -> None:
        """Forget the default session's KV cache (the next call evaluates its whole prompt)."""
        self._check_open()
        if self._default is not None:
            self._default.reset()

    def close(self) -> None:
        """Close every session, then release the engine; calling it twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions)
        for s in sessions:
            s.close()
        self.engine.close()

    def __enter__(self) -> Model:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        name = self.manifest.get("name")
        named = f"name={name!r}, " if name else ""
        state = ", closed" if self._closed else ""
        return (
            f"Model({named}backend={self.engine.backend!r}, n_ctx={self.n_ctx}, "
            f"n_vocab={self.engine.n_vocab}, sessions={len(self._sessions)}{state})"
        )

    # -- internals ----------------------------------------------------------------------

    def _conversation(self) -> Session:
        with self._lock:
            self._check_open()
            if self._default is None or self._default.closed:
                self._default = self.session()
            return self._default

    def _spare_for(self, session: Session) -> Session | None:
        """A session for a generation that finds ``session`` busy: only for the default one.

        None (share it, re-reading tokens on each turn) when it is a session the caller
        opened, or when ``kv_budget`` has no room for another (logged).
        """
        if session is not self._default:
            return None
        try:
            return self.session(session.n_ctx)
        except KVBudgetError as exc:
            logger.warning("a generation overlaps another on the default session and kv_budget has no "
                           "room for a session of its own (%s); they take turns in one cache, so greedy "
                           "tokens may differ slightly from serial runs: raise kv_budget or open "
                           "sessions with model.session()", exc)
            return None

    def _forget(self, session: Session) -> None:
        with self._lock:
            self.budget.release(session.budget_key)
            if session in self._sessions:
                self._sessions.remove(session)
            if self._default is session:
                self._default = None

    def _session_ctx(self, n_ctx: int | None) -> int:
        """Tokens per session: ``n_ctx``, else what ``kv_budget`` holds, else the engine's default."""
        eng, total = self.engine, self.budget.total_bytes
        bpt = eng.kv_bytes_per_token()
        if n_ctx is not None:
            self._check_ctx(n_ctx)
            if total is not None and n_ctx * bpt > total:
                raise InvalidInputError(
                    f"n_ctx {n_ctx} needs {format_bytes(n_ctx * bpt)} of KV cache at {eng.kv_precision} "
                    f"({bpt} B/token) but kv_budget is {format_bytes(total)}; lower n_ctx to "
                    f"{total // bpt} or raise kv_budget"
                )
            return n_ctx
        if total is None:
            return eng.default_ctx
        tokens = total // bpt
        if tokens < 2:
            raise InvalidInputError(
                f"kv_budget {format_bytes(total)} holds {tokens} token(s) of KV cache at "
                f"{eng.kv_precision} ({bpt} B/token); give at least {format_bytes(2 * bpt)}"
            )
        return min(tokens, eng.max_ctx)

    def _check_ctx(self, size: int) -> int:
        """Refuse a session of ``size`` tokens beyond the model's positions or this host's memory.

        Every device path comes here before a cache is allocated (an explicit ``device="cpu"``
        is not planned, and ``n_ctx=10**6`` allocated until the out-of-memory killer acted).
        The memory plan is the planner's host budget: available memory minus a margin
        (:func:`edgellm.devices.detect.host_budget`). Returns the KV bytes per token.
        """
        import psutil

        from edgellm.devices.detect import host_budget

        eng = self.engine
        if size > eng.max_ctx:
            raise InvalidInputError(
                f"n_ctx {size} is beyond the {eng.max_ctx} positions this model was trained for "
                f"({eng.backend}); use n_ctx <= {eng.max_ctx}"
            )
        bpt = eng.kv_bytes_per_token()
        mem = psutil.virtual_memory()
        room = host_budget(int(mem.total), int(mem.available))
        if size * bpt > room:
            raise KVBudgetError(
                f"a session of {size} tokens needs {format_bytes(size * bpt)} of KV cache at "
                f"{eng.kv_precision} ({bpt} B/token) but this host has {format_bytes(room)} free for it "
                f"(available memory minus a margin); use n_ctx <= {max(2, room // bpt)} or set kv_budget"
            )
        return bpt

    def _capacity_note(self, size: int, bpt: int) -> str:
        total = self.budget.total_bytes
        budget = f", kv_budget {format_bytes(total)}" if total is not None else ""
        return f"{format_bytes(size * bpt)} at {self.engine.kv_precision}{budget}"

    def _seed(self, seed: int | None) -> int:
        return int(self._seeds.integers(2**63)) if seed is None else seed

    def _check_open(self) -> None:
        if self._closed:
            raise ModelClosedError("this model is closed; load it again with edgellm.load()")

    def _end_of_turn_ids(self, template: str) -> frozenset[int]:
        cached = self._end_of_turn.get(template)
        if cached is None:
            found = set()
            for marker in END_OF_TURN_TOKENS:
                if marker in template:
                    ids = self.tokenizer.encode(marker, add_special=False)
                    if len(ids) == 1 and self.tokenizer.is_special(ids[0]):
                        found.add(ids[0])
            cached = self._end_of_turn[template] = frozenset(found)
        return cached
