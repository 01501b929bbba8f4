"""The public model object returned by :func:`edgellm.load`.

A :class:`Model` wraps one :class:`~edgellm.runtimes.base.Runtime` and runs the shared
decode loop (:mod:`edgellm.runtimes.loop`) over it, so ``generate``, ``stream`` and
``chat`` behave identically on llama.cpp, OpenVINO, ONNX Runtime and the fake backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from edgellm.errors import InvalidInputError
from edgellm.runtimes.loop import Decoder, Generation, Result
from edgellm.runtimes.sampling import SamplingParams
from edgellm.text.chat import DEFAULT_CHATML, render_chat

if TYPE_CHECKING:
    from types import TracebackType

    from edgellm.runtimes.base import Runtime
    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["Model"]

#: End-of-turn markers of common chat formats. When the chat template uses one and the
#: tokenizer has it as a special token, chat() also stops on it, even if the model's
#: generation config does not list it as EOS (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class Model:
    """A loaded language model: generate, stream and chat over one runtime.

    ``manifest`` is the artifact manifest (``edgellm.json``) when the model came from one.
    Calls from several threads are safe: runtime calls are serialised, and each
    generation re-synchronises the KV state if another one ran in between. After a
    ``stream()`` or ``chat(stream=True)`` is exhausted or closed, its :class:`Result` is
    in ``last_result``.
    """

    def __init__(self, runtime: Runtime, manifest: dict[str, Any] | None = None,
                 seed: int | None = None) -> None:
        self.runtime = runtime
        # Calls without their own seed draw one from this stream: load(seed=N) makes a
        # session's samples reproducible, as llama.cpp's context seed does.
        self._seeds = np.random.default_rng(seed)
        self.manifest: dict[str, Any] = dict(manifest or {})
        self.last_result: Result | None = None
        self._decoder = Decoder(runtime)
        self._closed = False
        self._end_of_turn: dict[str, frozenset[int]] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        """The runtime's tokenizer."""
        return self.runtime.tokenizer

    # -- generation ---------------------------------------------------------------------

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
    ) -> Result:
        """Complete ``prompt`` (text, or token ids used as they are) and return the Result.

        ``temperature <= 0`` decodes greedily. Generation ends at EOS, after ``max_tokens``
        (clamped to the room left in the context) or before the first stop string, which
        is not included in the text. ``ignore_eos`` keeps decoding past end-of-sequence
        tokens (benchmarks that need a fixed number of tokens).
        """
        t0 = time.perf_counter()
        ids = self._prompt_ids(prompt)
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=self._seed(seed))
        eos = frozenset() if ignore_eos else None
        return self._finish(self._start(ids, params, max_tokens, stop, t0, eos_ids=eos))

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
    ) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as they are decoded.

        Arguments are checked now, not at the first piece. Pieces are always whole
        characters and never contain (the start of) a matched stop string.
        """
        t0 = time.perf_counter()
        ids = self._prompt_ids(prompt)
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=self._seed(seed))
        return self._follow(self._start(ids, params, max_tokens, stop, t0))

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
        already write it. The reply also ends at the template's end-of-turn token.
        With ``stream=True`` an iterator of text pieces is returned instead of a Result.
        """
        t0 = time.perf_counter()
        ids, template = self._chat_ids(messages, tools)
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=self._seed(seed))
        eos = self.tokenizer.eos_ids | self._end_of_turn_ids(template)
        gen = self._start(ids, params, max_tokens, stop, t0, eos_ids=eos)
        return self._follow(gen) if stream else self._finish(gen)

    def render_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text :meth:`chat` would send, for inspection and debugging."""
        tok = self.tokenizer
        return render_chat(
            tok.chat_template or DEFAULT_CHATML, list(messages), bos_token=tok.bos_token,
            eos_token=tok.eos_token, add_generation_prompt=add_generation_prompt, tools=tools,
        )

    # -- tokens -------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_special`` and the model uses one."""
        if not isinstance(text, str):
            raise InvalidInputError(f"tokenize() takes a str, not {type(text).__name__}")
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of token ``ids``."""
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    # -- lifecycle ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Runtime facts (backend, context, vocabulary, ...) plus manifest basics."""
        info = dict(self.runtime.info())
        info.setdefault("backend", self.runtime.backend)
        info.setdefault("n_ctx", self.runtime.n_ctx)
        info.setdefault("n_vocab", self.runtime.n_vocab)
        for key in ("name", "format", "quantization", "architecture", "source"):
            if key in self.manifest:
                info.setdefault(key, self.manifest[key])
        return info

    def reset(self) -> None:
        """Forget the KV state (the next call evaluates its whole prompt)."""
        self._check_open()
        self._decoder.reset()

    def close(self) -> None:
        """Release the runtime; calling it twice is harmless."""
        with self._decoder.lock:
            if not self._closed:
                self._closed = True
                self.runtime.close()

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
            f"Model({named}backend={self.runtime.backend!r}, n_ctx={self.runtime.n_ctx}, "
            f"n_vocab={self.runtime.n_vocab}{state})"
        )

    # -- internals ----------------------------------------------------------------------

    def _seed(self, seed: int | None) -> int:
        return int(self._seeds.integers(2**63)) if seed is None else seed

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("this model is closed; load it again with edgellm.load()")

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special=True)
        if isinstance(prompt, (bytes, bytearray)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise InvalidInputError(
                f"prompt must be a str or a sequence of int token ids, not {type(prompt).__name__}"
            )
        return list(prompt)

    def _chat_ids(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
    ) -> tuple[list[int], str]:
        tok = self.tokenizer
        template = tok.chat_template or DEFAULT_CHATML
        text = render_chat(
            template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token,
            add_generation_prompt=True, tools=tools,
        )
        # Templates such as Llama's write BOS themselves; adding another would double it.
        bos = tok.bos_token
        has_bos = bos is not None and bos != "" and text.startswith(bos)
        return tok.encode(text, add_special=not has_bos), template

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

    def _start(
        self, ids: list[int], params: SamplingParams, max_tokens: int,
        stop: str | Sequence[str] | None, t0: float, eos_ids: frozenset[int] | None = None,
    ) -> Generation:
        self._check_open()
        stops = () if stop is None else stop
        return self._decoder.run(ids, params, max_tokens, stops, eos_ids=eos_ids, started_at=t0)

    def _finish(self, gen: Generation) -> Result:
        gen.text()
        assert gen.result is not None
        self.last_result = gen.result
        return gen.result

    def _follow(self, gen: Generation) -> Iterator[str]:
        try:
            yield from gen
        finally:
            gen.close()
            if gen.result is not None:
                self.last_result = gen.result
