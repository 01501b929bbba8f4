"""Chat templates: render a model's Jinja2 template in a sandbox.

The environment mirrors Hugging Face transformers' chat templating (``trim_blocks``,
``lstrip_blocks``, the ``raise_exception`` and ``strftime_now`` globals, a ``tojson``
filter that keeps non-ASCII text) so that templates shipped with models render the same
text here, without transformers. Templates come from model files, so they run in
Jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`: a template cannot reach
Python internals or mutate the messages it is given.

A template is also held to a render budget (:data:`RENDER_SECONDS`, :data:`RENDER_MAX_CHARS`):
a deadline checked on every call and every 64 items of every ``for`` loop (the parsed
template's loops get a filter on their iterable; templates have no other way to loop, and
recursion is bounded by Python's stack), the output counted as it is generated, and the
operators that can build a huge value in one step (``*``, ``**``, ``+``, ``~``) checked
before they run, calls and filters checked on their integer arguments, format widths and
results. Jinja2's sandbox already caps ``range()`` at 100,000 items; neither
transformers nor llama-cpp-python limit time or size, so a template with nested loops
rendered forever there too. Every failure is one :class:`~edgellm.errors.InvalidInputError`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

from edgellm.errors import InvalidInputError, one_line

if TYPE_CHECKING:
    import jinja2

    from edgellm.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHATML", "check_text", "encode_chat", "render_chat", "validate_messages"]

#: ChatML, used when a model ships no template (the format of SmolLM2, Qwen and others).
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


#: Longest a chat template may render, in seconds (real templates take about a millisecond).
RENDER_SECONDS = 2.0
#: Most characters a rendered chat may have: 4 Mi characters is ~1M tokens, beyond any
#: context an edge model has.
RENDER_MAX_CHARS = 4 * 2**20
#: Largest integer a template's ``**`` may build, in bits.
_MAX_POW_BITS = 4096
_LOOP_CHECK_EVERY = 64  # loop items between two looks at the clock
_CLOCK = threading.local()  # .deadline, .seconds: the render running on this thread


class _OverBudget(Exception):
    """Raised inside a render that went past its budget (turned into InvalidInputError)."""


def _raise_exception(message: str) -> NoReturn:
    text = " ".join(str(message).split())  # a template's message may span lines
    raise InvalidInputError(f"the chat template refused the messages: {text}")


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


def _sized(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


@lru_cache(maxsize=1)
def _budget_sandbox() -> type:
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetCodeGenerator(CodeGenerator):
        """Jinja2's code generator with ``~`` (Concat) routed through the environment."""

        def visit_Concat(self, node: Any, frame: Any) -> None:  # noqa: N802 (Jinja2's visitor name)
            self.write("environment.budget_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BudgetSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, with every step that can build a big value checked.

        Operators are checked before they run; calls (methods, globals) and filters refuse an
        integer argument past the budget (``center(10**9)``) and a result past it (doubling
        a string in a loop stops at the first step over).
        """

        code_generator_class = BudgetCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):  # every loop's items pass the clock
                loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
            return tree

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
            _check_clock()
            method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
            if getattr(method, "__name__", None) in ("format", "format_map"):
                _check_format(getattr(method, "__self__", None))
            return _checked_call(lambda: super(BudgetSandbox, self).call(context, obj, *args, **kwargs),
                                 args, kwargs)

        def budget_concat(self, parts: Sequence[Any]) -> str:
            strs = [str(p) for p in parts]
            _check_size("'~'", sum(map(len, strs)))
            return "".join(strs)

    return BudgetSandbox


#: A field width or precision in a format string ("%2000000000s", "{:>2000000000}"), 8+ digits.
_FORMAT_WIDTH = re.compile(r"%[-#0 +*.\d(]*?(\d{8,})|\{[^{}]*:[^{}]*?(\d{8,})")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str):
        wide = _FORMAT_WIDTH.search(fmt)
        if wide is not None:
            _check_size("a format width", int(wide[1] or wide[2]))


def _checked_call(run: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > RENDER_MAX_CHARS:
            raise _OverBudget(f"an argument of {value} is past the size budget")
    result = run()
    size = _sized(result)
    if size is not None:
        _check_size("a call", size)
    return result


def _budgeted_filter(fn: Any) -> Any:
    @functools.wraps(fn)  # keeps jinja_pass_arg (pass_context / pass_environment filters)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _checked_call(lambda: fn(*args, **kwargs), args, kwargs)
    return wrapper


def _format_filter(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_format(value)
        return fn(value, *args, **kwargs)
    return wrapper


def _check_size(what: str, total: int) -> None:
    if total > RENDER_MAX_CHARS:
        raise _OverBudget(f"{what} would build a value of {total} items")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "%":
        _check_format(left)
        return
    if operator == "**":
        if isinstance(left, (int, float)) and isinstance(right, int) and abs(left) > 1 and right > 0:
            bits = right * math.log2(abs(left))
            if bits > _MAX_POW_BITS:
                raise _OverBudget(f"{left!r:.20} ** {right!r:.20} would be a {bits:.3g}-bit number")
        return
    _check_size(f"'{operator}'", _result_size(operator, left, right))


def _result_size(operator: str, left: Any, right: Any) -> int:
    """Items in ``left <operator> right`` for "*" and "+", without building it."""
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            size = _sized(seq)
            if size is not None and isinstance(count, int):
                return size * count
        return 0
    return (_sized(left) or 0) + (_sized(right) or 0)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    import jinja2
    from jinja2.ext import loopcontrols

    env = _budget_sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _budgeted_filter(fn) for name, fn in env.filters.items()}
    env.filters["format"] = _budgeted_filter(_format_filter(env.filters["format"]))
    env.filters[_LOOP_FILTER] = _budget_loop
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidInputError(
            f"the chat template does not compile (line {exc.lineno}: {exc.message}); "
            "fix the template or pass another one"
        ) from None
    except RecursionError:
        raise InvalidInputError("the chat template is nested too deeply to compile; "
                                "fix the template or pass another one") from None


_LOOP_FILTER = "_edgellm_budget_loop"


def _check_clock() -> None:
    deadline = getattr(_CLOCK, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _OverBudget(f"it ran longer than {_CLOCK.seconds:g} s")


def _budget_loop(items: Any) -> Any:
    """A template loop's items, looking at the clock every few (the code generator adds it)."""
    _check_clock()
    for k, item in enumerate(items):
        if k % _LOOP_CHECK_EVERY == _LOOP_CHECK_EVERY - 1:
            _check_clock()
        yield item


def _render_budgeted(compiled: jinja2.Template, seconds: float, max_chars: int, **context: Any) -> str:
    """``compiled.render(**context)`` within ``seconds`` and ``max_chars`` (else _OverBudget)."""
    pieces: list[str] = []
    size = 0
    previous = getattr(_CLOCK, "deadline", None), getattr(_CLOCK, "seconds", None)
    _CLOCK.deadline, _CLOCK.seconds = time.monotonic() + seconds, seconds
    try:
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > max_chars:
                raise _OverBudget(f"its output passed {max_chars} characters")
            pieces.append(piece)
    finally:
        _CLOCK.deadline, _CLOCK.seconds = previous
    return "".join(pieces)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, what: str) -> str:
    """``text`` itself, or InvalidInputError naming the first lone surrogate and its position.

    A lone surrogate (e.g. from ``bytes.decode("utf-8", "surrogateescape")`` or a broken
    JSON ``\\ud800`` escape) is not a Unicode character: no tokenizer can encode it.
    """
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise InvalidInputError(
            f"{what} has a lone surrogate U+{ord(bad[0]):04X} at character {bad.start()}, which is not "
            "valid Unicode; decode the source bytes with errors='replace' or remove the character"
        )
    return text


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
        for text in _strings(msg):
            check_text(text, f"messages[{i}]")
    return list(messages)


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
    max_seconds: float = RENDER_SECONDS,
    max_chars: int = RENDER_MAX_CHARS,
    **extra: Any,
) -> str:
    """Render ``messages`` with a model's chat ``template`` into one prompt string.

    ``bos_token``/``eos_token`` are exposed to the template as strings ("" for None),
    ``tools`` as given; ``extra`` adds further template variables. Bad messages, templates
    that fail to compile or render, sandbox violations and renders past the budget
    (``max_seconds``, ``max_chars``) raise :class:`~edgellm.errors.InvalidInputError` with a
    one-line message.
    """
    import jinja2
    from jinja2.sandbox import SecurityError

    msgs = validate_messages(messages)
    compiled = _compile(template)
    try:
        return _render_budgeted(
            compiled, max_seconds, max_chars,
            messages=msgs,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **extra,
        )
    except InvalidInputError:
        raise  # raise_exception() from the template: already one line and specific
    except _OverBudget as exc:
        raise InvalidInputError(
            f"the chat template was stopped: {exc} (the budget is {max_seconds:g} s and "
            f"{max_chars} characters); use a trusted template"
        ) from None
    except SecurityError as exc:
        raise InvalidInputError(
            f"the chat template tried an unsafe operation and was stopped ({one_line(exc)}); "
            "use a trusted template"
        ) from None
    except (MemoryError, RecursionError, OverflowError) as exc:
        raise InvalidInputError(
            f"the chat template ran out of {_RESOURCE[type(exc)]} ({type(exc).__name__}); "
            "use a trusted template"
        ) from None
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError,
            ArithmeticError) as exc:
        # e.g. a template concatenating None content; still the caller's template/messages
        raise InvalidInputError(f"the chat template failed to render: {one_line(exc)}") from None


_RESOURCE: dict[type, str] = {MemoryError: "memory", RecursionError: "stack (recursion too deep)",
                              OverflowError: "number range"}


# -- special tokens stay text ---------------------------------------------------------------
#
# A chat template's own markers ("<|im_start|>", "<end_of_turn>") are control tokens; the
# same text typed in a message must stay text, or a user can forge a system turn. The
# messages are rendered with every marker inside them replaced by a placeholder (a private-use
# character absent from every message, then one per marker); in the rendered text the markers
# left are the template's. It is then cut at those markers: each becomes its token, and each
# piece between them, placeholders turned back into the markers' text, is tokenized with
# parse_special=False. That is how llama.cpp's llama_tokenize handles parse_special itself
# (llama-vocab.cpp ``tokenizer_st_partition``: split at specials, tokenize the pieces), so
# without forged markers nothing changes and the whole text is tokenized as before.

_PRIVATE_USE = range(0xE000, 0xF900)  # Unicode's Private Use Area of the BMP


def encode_chat(
    tokenizer: Tokenizer,
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of ``messages`` rendered by ``template``: only the template makes special tokens.

    Text in the messages (and tools) that spells a special token is tokenized as text.
    BOS is added as the tokenizer wants unless the rendered text already starts with it.
    """
    msgs = validate_messages(messages)
    for text in _strings(tools):
        check_text(text, "tools")
    specials = {t: i for t, i in tokenizer.special_tokens().items() if t}
    forged = sorted({t for t in specials for s in _strings([msgs, tools]) if t in s}, key=len, reverse=True)
    if not forged:
        text = _render_for(tokenizer, template, msgs, add_generation_prompt, tools)
        return tokenizer.encode(text, add_special=not _starts_with_bos(tokenizer, text))
    guard = _free_char([msgs, tools])
    holders = {t: guard + chr(_PRIVATE_USE[0] + k) for k, t in enumerate(forged)}
    defang = re.compile("|".join(map(re.escape, forged)))

    def swap(s: str) -> str:
        return defang.sub(lambda m: holders[m[0]], s)

    text = _render_for(tokenizer, template, _map_strings(msgs, swap), add_generation_prompt,
                       _map_strings(tools, swap))
    restore = {h: t for t, h in holders.items()}
    bos = tokenizer.bos_id
    ids = [bos] if bos is not None and tokenizer.add_bos and not _starts_with_bos(tokenizer, text) else []
    cut = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
    for k, piece in enumerate(cut.split(text)):
        if k % 2:
            ids.append(specials[piece])
        elif piece:
            # A template that cut a placeholder in two (truncate) leaves a lone guard: dropped.
            plain = re.sub(re.escape(guard) + ".?", lambda m: restore.get(m[0], ""), piece)
            ids.extend(tokenizer.encode(plain, add_special=False, parse_special=False))
    return ids


def _render_for(tokenizer: Tokenizer, template: str, msgs: list[dict[str, Any]],
                add_generation_prompt: bool, tools: Any) -> str:
    return render_chat(template, msgs, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                       add_generation_prompt=add_generation_prompt, tools=tools)


def _starts_with_bos(tokenizer: Tokenizer, text: str) -> bool:
    # Templates such as Llama's write BOS themselves; adding another would double it.
    bos = tokenizer.bos_token
    return bool(bos) and text.startswith(bos)  # type: ignore[arg-type]


def _strings(value: Any) -> list[str]:
    """Every str inside nested lists, tuples and dicts (keys included)."""
    out: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


def _map_strings(value: Any, fn: Any) -> Any:
    """``value`` with ``fn`` applied to every str inside it (containers copied, not changed)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_strings(v, fn) for v in value)
    return value


def _free_char(value: Any) -> str:
    """A private-use character that no str inside ``value`` contains (the placeholders' guard)."""
    used = set().union(*(set(s) for s in _strings(value)))
    for code in reversed(_PRIVATE_USE):
        if chr(code) not in used:
            return chr(code)
    raise InvalidInputError("the messages use every private-use character (U+E000-U+F8FF); "
                            "they cannot be told apart from edgellm's placeholders: remove them")
