"""A deterministic in-process runtime for tests of everything above the backends.

Like httpx's ``MockTransport``: no model files, no native library. The tokenizer is
byte-level (ids 0-255 are bytes, then a few special tokens) and the "model" replies with
a script: given the ids so far, the logits make the next byte of the script the argmax,
then EOS. Special token texts in the script (``"<|im_end|>"``) are emitted as those tokens.
Greedy decoding therefore reproduces the script exactly, multi-byte UTF-8
included ("é" is two tokens, "🙂" four), which exercises streaming and stop strings.

With ``echo=True`` the reply is instead the last user message of a ChatML prompt (the
bytes between the last ``<|im_start|>user\n`` and its ``<|im_end|>``), so concurrent
requests have different answers and a mixed-up stream shows. ``step_seconds`` makes every
forward pass sleep (releasing the GIL, like a native runtime), to simulate a slow device.

Where the reply stands is read from the state itself: the longest suffix of the state
that is a prefix of the script (never the whole state, so a prompt never counts as
reply). Tests can check prefix reuse with ``forward_calls`` and ``evaluated_tokens``. Each
session's cache has every :class:`~edgellm.kvcache.KVAbility` (or those the test asks
for), so the overflow policies run here exactly as on the real backends.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgellm._jsonfile import read_json_object
from edgellm.errors import BackendError, InvalidInputError, ModelClosedError
from edgellm.kvcache import KV_PRECISIONS, KVAbility, KVCache
from edgellm.spec import ModelSpec

if TYPE_CHECKING:
    from edgellm.runtimes.base import RuntimeOptions
    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SCRIPT", "FakeEngine", "FakeSession", "FakeTokenizer", "open"]

DEFAULT_SCRIPT = "Hello from the fake runtime! Café 🙂"

#: Special tokens after the 256 byte tokens, in id order.
SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")


class FakeTokenizer:
    """Byte-level :class:`~edgellm.text.tokenizer.Tokenizer`: one token per UTF-8 byte.

    Ids 0-255 are bytes; 256 ``<s>`` (BOS), 257 ``</s>`` (EOS), 258 ``<|im_start|>``,
    259 ``<|im_end|>``.
    """

    def __init__(self, *, chat_template: str | None = None, add_bos: bool = True) -> None:
        self.specials = {text: 256 + i for i, text in enumerate(SPECIALS)}
        self._special_text = {i: t for t, i in self.specials.items()}
        self.vocab_size = 256 + len(SPECIALS)
        self.bos_token: str | None = "<s>"
        self.eos_token: str | None = "</s>"
        self.bos_id: int | None = self.specials["<s>"]
        self.eos_ids: frozenset[int] = frozenset({self.specials["</s>"]})
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Bytes of ``text`` (special token texts become their ids when ``parse_special``)."""
        ids = [self.bos_id] if add_special and self.add_bos and self.bos_id is not None else []
        parts = self._split.split(text) if parse_special else [text]
        for part in parts:
            if parse_special and part in self.specials:
                ids.append(self.specials[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 is replaced."""
        data = b"".join(
            b"" if skip_special and self.is_special(i) else self.token_bytes(i) for i in ids
        )
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, id: int) -> bytes:
        """One byte for ids < 256, the token text for specials, b"" beyond the vocabulary."""
        if 0 <= id < 256:
            return bytes((id,))
        return self._special_text.get(id, "").encode("utf-8")

    def is_special(self, id: int) -> bool:
        """True for the four special tokens."""
        return id in self._special_text

    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the four special tokens."""
        return dict(self.specials)


class FakeEngine:
    """An :class:`~edgellm.runtimes.base.Engine` whose greedy output is ``script`` then EOS.

    ``n_vocab`` may exceed the tokenizer's 260 ids (like a padded embedding table), e.g.
    49152 to measure the loop's overhead at a realistic vocabulary size. Non-target
    logits are fixed pseudo-random values in [-1, 1]; the scripted token gets 20, so
    sampling with min_p > 0 reproduces the script too. ``abilities`` narrows what its
    sessions' caches can do (drop ``KVAbility.SHIFT`` to exercise re-prefill). Counters
    (``forward_calls``, ``evaluated_tokens``, ``last_forward``, ``forward_seconds``) add up
    every session's forward passes.
    """

    backend = "fake"

    def __init__(
        self,
        script: str | None = None,
        n_ctx: int = 2048,
        *,
        n_vocab: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = True,
        kv_precision: str = "f32",
        abilities: frozenset[KVAbility] = frozenset(KVAbility),
        echo: bool = False,
        step_seconds: float = 0.0,
        resident_bytes_per_token: int = 0,
    ) -> None:
        self.tokenizer: Tokenizer = FakeTokenizer(chat_template=chat_template, add_bos=add_bos)
        self.script = DEFAULT_SCRIPT if script is None else script
        self.default_ctx = int(n_ctx)
        self.max_ctx = max(self.default_ctx, 1 << 20)
        self.n_vocab = max(int(n_vocab or 0), self.tokenizer.vocab_size)
        # A plausible tiny shape, so code that sizes KV caches from the spec can run on it.
        self.spec = ModelSpec(
            architecture="fake", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=self.n_vocab, max_positions=self.max_ctx,
        )
        self.kv_precision = kv_precision
        self.abilities = frozenset(abilities)
        self.echo = bool(echo)
        self.step_seconds = float(step_seconds)
        # Real memory held per token evaluated since the last reset (trim keeps it), so memory
        # watchers see a KV cache grow (0: none).
        self.resident_bytes_per_token = int(resident_bytes_per_token)
        # Special token texts in the script (e.g. "<|im_end|>") become their ids.
        self.reply = [
            *self.tokenizer.encode(self.script, add_special=False), self.tokenizer.specials["</s>"]
        ]
        self._base = np.random.default_rng(0).uniform(-1, 1, self.n_vocab).astype(np.float32)
        self.closed = False
        self.sessions: list[FakeSession] = []
        self.forward_calls = 0
        self.evaluated_tokens = 0
        self.last_forward: list[int] = []
        self.forward_seconds = 0.0  # time spent inside forward(), to separate loop overhead

    def kv_bytes_per_token(self) -> int:
        """What a real model of :attr:`spec` would store per token at :attr:`kv_precision`."""
        return self.spec.kv_bytes_per_token(KV_PRECISIONS[self.kv_precision])

    def open_session(self, n_ctx: int) -> FakeSession:
        """A new conversation with an empty cache of ``n_ctx`` tokens."""
        if self.closed:
            raise ModelClosedError("fake engine is closed; open it again")
        session = FakeSession(self, int(n_ctx))
        self.sessions.append(session)
        return session

    def logits_for(self, state: list[int]) -> np.ndarray:
        """Logits after ``state``: the next script token gets 20."""
        logits = self._base.copy()
        logits[self._next_target(state)] = 20.0
        return logits

    def _reply_for(self, state: list[int]) -> list[int]:
        if not self.echo:
            return self.reply
        sp = self.tokenizer.specials
        user = [sp["<|im_start|>"], *b"user\n"]
        for i in range(len(state) - len(user), -1, -1):
            if state[i:i + len(user)] == user:
                body = state[i + len(user):]
                end = body.index(sp["<|im_end|>"]) if sp["<|im_end|>"] in body else len(body)
                return [*body[:end], sp["</s>"]]
        return self.reply

    def _next_target(self, state: list[int]) -> int:
        reply = self._reply_for(state)
        for n in range(min(len(state) - 1, len(reply) - 1), 0, -1):
            if state[-n:] == reply[:n]:
                return reply[n]
        return reply[0]

    def memory(self) -> dict[str, int | None]:
        """No weights, no compute buffers."""
        return {"weights": 0, "compute": 0}

    def fingerprint(self) -> str:
        """Names the script and vocabulary: a session saved on another script is refused."""
        import hashlib

        return hashlib.sha256(f"fake|{self.script}|{self.n_vocab}".encode()).hexdigest()[:32]

    def info(self) -> dict[str, Any]:
        """Backend facts for ``Model.info()``."""
        return {"backend": self.backend, "n_ctx": self.default_ctx, "n_vocab": self.n_vocab,
                "device": "cpu", "kv_precision": self.kv_precision}

    def close(self) -> None:
        """Mark closed; later forwards raise BackendError."""
        self.closed = True


class FakeSession:
    """One conversation of a :class:`FakeEngine`: the ids in its "cache" are the state."""

    def __init__(self, engine: FakeEngine, n_ctx: int) -> None:
        self.engine = engine
        self.n_ctx = n_ctx
        self._state: list[int] = []
        self._resident: list[np.ndarray] = []
        self._closed = False
        bpt = engine.kv_bytes_per_token()
        self.cache = KVCache(n_ctx, bpt, engine.kv_precision, engine.abilities,
                             lambda: len(self._state) * bpt, lambda: len(self._state))

    @property
    def n_past(self) -> int:
        """Number of positions in the cache."""
        return len(self._state)

    @property
    def state(self) -> list[int]:
        """A copy of the ids in the cache (for tests)."""
        return list(self._state)

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the state; logits of the last (or every) position."""
        t0 = time.perf_counter()
        eng = self.engine
        if self._closed or eng.closed:
            raise ModelClosedError("fake session is closed; open another one")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InvalidInputError("forward() needs at least one token")
        if len(self._state) + len(tokens) > self.n_ctx:
            raise BackendError(
                f"fake session cache full: {len(self._state)} + {len(tokens)} > n_ctx {self.n_ctx}"
            )
        bad = [t for t in tokens if not 0 <= t < eng.n_vocab]
        if bad:
            raise BackendError(f"token id {bad[0]} outside the vocabulary [0, {eng.n_vocab})")
        if eng.step_seconds:
            time.sleep(eng.step_seconds)
        start = len(self._state)
        self._state.extend(tokens)
        if eng.resident_bytes_per_token:  # touched pages: resident, as a real cache's are
            self._resident.append(np.ones(len(tokens) * eng.resident_bytes_per_token, dtype=np.uint8))
        eng.forward_calls += 1
        eng.evaluated_tokens += len(tokens)
        eng.last_forward = tokens
        if all_logits:
            out = np.stack([eng.logits_for(self._state[: start + i + 1]) for i in range(len(tokens))])
        else:
            out = eng.logits_for(self._state)
        eng.forward_seconds += time.perf_counter() - t0
        return out

    def trim(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions."""
        if not 0 <= n_keep <= len(self._state):
            raise InvalidInputError(f"trim({n_keep}) outside the state [0, {len(self._state)}]")
        del self._state[n_keep:]

    def shift(self, start: int, n_discard: int) -> None:
        """Drop positions ``[start, start + n_discard)``; later ones move down."""
        if KVAbility.SHIFT not in self.cache.abilities:
            raise BackendError("this fake session was made without the shift ability")
        del self._state[start:start + n_discard]

    def save_state(self) -> bytes:
        """The ids, as little-endian int32."""
        return np.asarray(self._state, dtype="<i4").tobytes()

    def load_state(self, data: bytes, n_tokens: int) -> None:
        """Put back what :meth:`save_state` gave."""
        ids = np.frombuffer(data, dtype="<i4")
        if len(ids) != n_tokens or n_tokens > self.n_ctx:
            raise BackendError(f"fake state holds {len(ids)} ids, expected {n_tokens} (<= {self.n_ctx})")
        self._state = [int(i) for i in ids]

    def reset(self) -> None:
        """Empty the state."""
        self._state.clear()
        self._resident.clear()

    def close(self) -> None:
        """Later forwards raise BackendError."""
        self._closed = True


def open(path: str | Path, options: RuntimeOptions) -> FakeEngine:
    """Registry entry point: ``path`` may be a JSON file ``{"script": ..., "n_ctx": ...}``
    (also ``"resident_bytes_per_token"``: real memory held per cached token).

    Any other path is ignored. ``options.extra`` may also carry ``script``; ``options.n_ctx``
    wins over the file's ``n_ctx``.
    """
    config: dict[str, Any] = {}
    p = Path(path)
    if p.is_file():
        config = read_json_object(p, 'a fake model file holds {"script": "..."}')
    config.update({k: v for k, v in options.extra.items()
                   if k in ("script", "chat_template", "n_vocab", "echo", "step_seconds")})
    return FakeEngine(
        config.get("script"),
        n_ctx=options.n_ctx or int(config.get("n_ctx", 2048)),
        n_vocab=config.get("n_vocab"),
        chat_template=config.get("chat_template"),
        kv_precision=options.kv_precision or "f32",
        echo=str(config.get("echo", False)).lower() in ("true", "1", "yes"),
        step_seconds=float(config.get("step_seconds", 0.0)),
        resident_bytes_per_token=int(config.get("resident_bytes_per_token", 0)),
    )
