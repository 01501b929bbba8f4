"""The OpenAI wire format: request bodies checked into :class:`GenRequest`, replies built back.

Only what edgellm can honour is accepted. A field the runtime cannot do (``n`` > 1,
``logprobs``, ``tools``, non-zero ``presence_penalty``...) is refused with a 400 that says
so, rather than silently ignored; fields that change nothing (``user``, ``store``,
``metadata``...) are ignored, as OpenAI's own server ignores unknown ones. Sampling
follows edgellm's defaults (llama.cpp's): ``temperature`` 0.8, ``top_k`` 40, ``top_p``
0.95, ``min_p`` 0.05; ``top_k``, ``min_p``, ``repeat_penalty`` and ``cache_prompt`` are
accepted as llama.cpp's server accepts them.

``cache_prompt`` (default true) lets a request start from a session's KV cache that already
holds the start of its prompt. As llama.cpp's server documents for the same option, the
logits are then not guaranteed bit-for-bit equal to a fresh prefill: the cached positions
were computed in batches of another size (a decode step's single token, another prompt),
and int4/int8 kernels round differently per batch size, so a greedy answer can differ at a
near-tie. ``cache_prompt: false`` evaluates the whole prompt afresh: exactly what the
request gets alone on a new session.

Special tokens: chat message contents are always text (a ``<|im_end|>`` typed by a user
cannot end its turn or forge a system turn). A ``/v1/completions`` prompt is the calling
app's own raw prompt and is parsed for special tokens, as llama.cpp's server does, so an app
can send a prompt it templated itself.

Errors are :class:`APIError` and leave as OpenAI's error body:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["APIError", "GenRequest", "chat_chunk", "chat_response", "completion_chunk",
           "completion_response", "error_body", "parse_request", "usage"]

Kind = Literal["chat", "completion"]

#: OpenAI finish_reason for each edgellm Result.finish_reason.
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
#: Most stop strings a request may give (OpenAI allows 4; llama.cpp any number).
MAX_STOPS = 16
#: Roles a chat message may have; "developer" is OpenAI's newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}


class APIError(Exception):
    """An HTTP error with OpenAI's error body; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's API sends with this error."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI's API writes it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 about one request field."""
    return APIError(400, message, param=param, code=code)


@dataclass
class GenRequest:
    """One checked completion request (chat or plain)."""

    kind: Kind
    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)
    cache_prompt: bool = True
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex[:24]
        self.created = self.created or int(time.time())


# -- field checks -------------------------------------------------------------------------

def _number(body: dict[str, Any], name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise bad(name, f"{name} must be a number in {left}{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(name, f"{name} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r:.40}")
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", f"stop must be a non-empty string or a list of them, got {stop!r:.60}")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed")
    return tuple(stops)


#: Fields edgellm cannot honour: name -> (is this value harmless?, why it is refused).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v in (None, 1), "only n=1 is supported; send the request n times"),
    "best_of": (lambda v: v in (None, 1), "best_of is not supported"),
    "logprobs": (lambda v: v in (None, False, 0), "logprobs are not supported by this server"),
    "top_logprobs": (lambda v: v in (None, 0), "top_logprobs are not supported by this server"),
    "echo": (lambda v: v in (None, False), "echo is not supported"),
    "suffix": (lambda v: v in (None, ""), "suffix (insertion) is not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "presence_penalty": (lambda v: v in (None, 0, 0.0),
                         "presence_penalty is not supported; use repeat_penalty (llama.cpp's)"),
    "frequency_penalty": (lambda v: v in (None, 0, 0.0),
                          "frequency_penalty is not supported; use repeat_penalty (llama.cpp's)"),
    "tools": (lambda v: not v, "tool calls are not supported by this server yet"),
    "functions": (lambda v: not v, "function calls are not supported by this server"),
    "response_format": (lambda v: v in (None, {"type": "text"}),
                        "only response_format {\"type\": \"text\"} is supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, (harmless, why) in UNSUPPORTED.items():
        if name in body and not harmless(body[name]):
            raise bad(name, f"{why} (got {name}={body[name]!r:.60})", code="unsupported_parameter")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    found = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, lo_open=True),
        "top_k": _integer(body, "top_k", 0, 1 << 31),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repeat_penalty": _number(body, "repeat_penalty", 0.0, 10.0, lo_open=True),
        # A negative seed is folded into 64 bits (two's complement), so every int is one seed.
        "seed": None if seed is None else seed % 2**64,
    }
    return {k: v for k, v in found.items() if v is not None}


def _max_tokens(body: dict[str, Any]) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _integer(body, name, 1, 1 << 31)


# -- messages and prompts -----------------------------------------------------------------

def _content(i: int, msg: dict[str, Any]) -> str | None:
    content = msg.get("content")
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not is_text or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}].content",
                          f"messages[{i}].content has a {kind!r} part; only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content",
              f"messages[{i}].content must be a string or a list of text parts, not {type(content).__name__}")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object, not {type(msg).__name__}")
        role = ROLES.get(msg.get("role")) if isinstance(msg.get("role"), str) else None
        if role is None:
            raise bad(f"messages[{i}].role", f"messages[{i}].role {msg.get('role')!r:.40} is not one of "
                      f"{', '.join(ROLES)}")
        content = _content(i, msg)
        if content is None:
            if role != "assistant":
                raise bad(f"messages[{i}].content", f"messages[{i}] ({role}) has no content")
            content = ""
        out.append({"role": role, "content": content})
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt
    ):
        return list(prompt)
    raise bad("prompt", "prompt must be a string, a list of token ids, or a list holding one of "
              "these (batches of several prompts are not supported)")


def parse_request(kind: Kind, raw: bytes) -> GenRequest:
    """Check a request body; :class:`APIError` (400) names the first bad field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: one of the ids /v1/models lists")
    _refuse_unsupported(body)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "stream_options must be an object")
    return GenRequest(
        kind=kind, model=model,
        messages=_messages(body) if kind == "chat" else None,
        prompt=_prompt(body) if kind == "completion" else None,
        max_tokens=_max_tokens(body), stream=_flag(body, "stream"),
        include_usage=bool(options.get("include_usage")), stop=_stops(body), sampling=_sampling(body),
        cache_prompt=_flag(body, "cache_prompt") if "cache_prompt" in body else True,
    )


# -- replies ------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens reused from a session's KV cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _head(req: GenRequest, obj: str, fingerprint: str) -> dict[str, Any]:
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model,
            "system_fingerprint": fingerprint}


def chat_response(req: GenRequest, text: str, finish: str, use: dict[str, Any], fp: str) -> dict[str, Any]:
    """A whole ``chat.completion``."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": FINISH[finish]}
    return {**_head(req, "chat.completion", fp), "choices": [choice], "usage": use}


def completion_response(req: GenRequest, text: str, finish: str, use: dict[str, Any],
                        fp: str) -> dict[str, Any]:
    """A whole ``text_completion``."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH[finish]}
    return {**_head(req, "text_completion", fp), "choices": [choice], "usage": use}


def chat_chunk(req: GenRequest, fp: str, *, role: bool = False, text: str | None = None,
               finish: str | None = None, use: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``: the role, a piece of text, the finish, or the usage."""
    chunk = _head(req, "chat.completion.chunk", fp)
    if use is not None:
        return {**chunk, "choices": [], "usage": use}
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if text is not None:
        delta["content"] = text
    choice = {"index": 0, "delta": delta, "logprobs": None,
              "finish_reason": None if finish is None else FINISH[finish]}
    return {**chunk, "choices": [choice]}


def completion_chunk(req: GenRequest, fp: str, *, text: str = "", finish: str | None = None,
                     use: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed ``text_completion`` piece, its finish, or the usage."""
    chunk = _head(req, "text_completion", fp)
    if use is not None:
        return {**chunk, "choices": [], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": None,
              "finish_reason": None if finish is None else FINISH[finish]}
    return {**chunk, "choices": [choice]}
