"""Chat templates: render a model's Jinja2 template in a sandbox.

The environment mirrors Hugging Face transformers' chat templating (``trim_blocks``,
``lstrip_blocks``, the ``raise_exception`` and ``strftime_now`` globals, a ``tojson``
filter that keeps non-ASCII text) so that templates shipped with models render the same
text here, without transformers. Templates come from model files, so they run in
Jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`: a template cannot reach
Python internals or mutate the messages it is given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

from edgellm.errors import InvalidInputError, one_line

if TYPE_CHECKING:
    import jinja2

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHATML", "render_chat", "validate_messages"]

#: ChatML, used when a model ships no template (the format of SmolLM2, Qwen and others).
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> NoReturn:
    raise InvalidInputError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja2's own tojson escapes HTML characters and ASCII-fies; templates expect neither.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidInputError(
            f"the chat template does not compile (line {exc.lineno}: {exc.message}); "
            "fix the template or pass another one"
        ) from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages: a list of dicts, each with a str "role" and str "content".

    ``content`` may be None in an assistant message that carries ``tool_calls``. The error
    names the index of the first bad message.
    """
    if not isinstance(messages, (list, tuple)):
        raise InvalidInputError(
            f"messages must be a list of dicts like {{'role': 'user', 'content': 'Hi'}}, "
            f"not {type(messages).__name__}"
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidInputError(
                f"messages[{i}] must be a dict with 'role' and 'content', not {type(msg).__name__}"
            )
        if not isinstance(msg.get("role"), str):
            raise InvalidInputError(
                f"messages[{i}] needs a str 'role' (e.g. 'user'), got {msg.get('role')!r}"
            )
        content = msg.get("content")
        if not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
            raise InvalidInputError(
                f"messages[{i}] needs a str 'content', got {type(content).__name__}: {content!r:.60}"
            )
    return list(messages)


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` with a model's chat ``template`` into one prompt string.

    ``bos_token``/``eos_token`` are exposed to the template as strings ("" for None),
    ``tools`` as given; ``extra`` adds further template variables. Bad messages, templates
    that fail to compile or render, and sandbox violations raise
    :class:`~edgellm.errors.InvalidInputError` with a one-line message.
    """
    import jinja2
    from jinja2.sandbox import SecurityError

    msgs = validate_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=msgs,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **extra,
        )
    except InvalidInputError:
        raise  # raise_exception() from the template: already one line and specific
    except SecurityError as exc:
        raise InvalidInputError(
            f"the chat template tried an unsafe operation and was stopped ({one_line(exc)}); "
            "use a trusted template"
        ) from None
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:
        # e.g. a template concatenating None content; still the caller's template/messages
        raise InvalidInputError(f"the chat template failed to render: {one_line(exc)}") from None
