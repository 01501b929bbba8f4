"""The shared decode loop, driven through Model over the fake runtime."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from edgellm.errors import ContextOverflowError, InvalidInputError
from edgellm.model import Model
from edgellm.runtimes.base import BackendSession, Engine, RuntimeOptions, open_engine
from edgellm.runtimes.fake import DEFAULT_SCRIPT, FakeEngine
from edgellm.text.tokenizer import Tokenizer

GREEDY = {"temperature": 0.0}
BOS = 256


class Probe:
    """The fake engine's counters and the model's default session, as one object for asserts."""

    def __init__(self, model: Model) -> None:
        self.model, self.engine = model, model.engine

    @property
    def session(self):  # type: ignore[no-untyped-def]
        return self.model._conversation()._backend

    def __getattr__(self, name: str) -> object:
        if name in ("evaluated_tokens", "forward_calls", "last_forward"):
            return getattr(self.engine, name)
        return getattr(self.session, name)  # state, n_past, n_ctx, forward, reset


def make(script: str | None = None, **kw: object) -> tuple[Model, Probe]:
    model = Model(FakeEngine(script, **kw))  # type: ignore[arg-type]
    return model, Probe(model)


def test_fake_implements_the_protocols() -> None:
    engine = FakeEngine()
    assert isinstance(engine, Engine)
    assert isinstance(engine.open_session(8), BackendSession)
    assert isinstance(engine.tokenizer, Tokenizer)


def test_generate_reproduces_script() -> None:
    model, _ = make("Hello, wörld 🙂!")
    result = model.generate("Say hi", **GREEDY)
    assert result.text == "Hello, wörld 🙂!"
    assert result.finish_reason == "eos"
    assert result.tokens == list("Hello, wörld 🙂!".encode())  # EOS not included
    assert result.completion_tokens == len(result.tokens)
    assert result.prompt_tokens == 1 + len("Say hi")  # BOS + bytes


def test_sampling_with_seed_follows_the_peaked_model() -> None:
    model, _ = make("abc")
    assert model.generate("x", temperature=0.9, seed=1).text == "abc"


def test_stream_pieces_join_to_result_text() -> None:
    model, _ = make(DEFAULT_SCRIPT)
    pieces = list(model.stream("Hi", **GREEDY))
    assert len(pieces) > 5 and "".join(pieces) == DEFAULT_SCRIPT
    assert not any("\ufffd" in p for p in pieces)
    assert model.last_result is not None and model.last_result.text == DEFAULT_SCRIPT


@pytest.mark.parametrize(("script", "stop", "expected"), [
    ("Hello, world! The end.", ["world!"], "Hello, "),
    ("abcabd tail", ["abd"], "abc"),  # a false start "ab" is released, then the real match
    ("one two three", ["three", "two"], "one "),  # earliest match wins
    ("Café 🙂 fin", ["🙂"], "Café "),  # stop string of a multi-byte character
    ("line one\n\nline two", "\n\n", "line one"),  # a single str works too
])
def test_stop_strings_across_tokens(script: str, stop: list[str] | str, expected: str) -> None:
    model, _ = make(script)
    pieces = list(model.stream("q", stop=stop, **GREEDY))
    result = model.last_result
    assert result is not None
    assert "".join(pieces) == expected == result.text
    assert result.finish_reason == "stop"
    stops = [stop] if isinstance(stop, str) else stop
    assert not any(s in "".join(pieces) for s in stops)


def test_stop_prefix_is_held_back_then_released_at_eos() -> None:
    model, _ = make("Hello wor")
    seen: list[str] = []
    for piece in model.stream("q", stop=["world"], **GREEDY):
        seen.append(piece)
        if len(seen) == 6:  # "Hello " emitted; "w" ... must not be shown yet
            assert "".join(seen) == "Hello "
    assert "".join(seen) == "Hello wor"
    assert model.last_result is not None and model.last_result.finish_reason == "eos"


def test_max_tokens_gives_length() -> None:
    model, _ = make("abcdefgh")
    result = model.generate("q", max_tokens=3, **GREEDY)
    assert (result.text, result.finish_reason, result.completion_tokens) == ("abc", "length", 3)


def test_eos_gives_eos() -> None:
    model, _ = make("ab")
    result = model.generate("q", max_tokens=10, **GREEDY)
    assert (result.text, result.finish_reason, result.completion_tokens) == ("ab", "eos", 2)


def test_prefix_reuse_evaluates_only_new_tokens() -> None:
    model, rt = make("The reply.")
    first = model.generate("Once upon a time", **GREEDY)
    assert first.timings.cached_tokens == 0
    evaluated = rt.evaluated_tokens
    second = model.generate("Once upon a time, there", **GREEDY)
    # decode evaluates one token per completion token (the last one's forward yields EOS)
    assert rt.evaluated_tokens - evaluated - second.completion_tokens == len(", there")
    assert second.timings.cached_tokens == first.prompt_tokens
    assert second.text == "The reply."


def test_same_prompt_twice_evaluates_one_token() -> None:
    model, rt = make("xy")
    model.generate("same prompt", **GREEDY)
    before = rt.forward_calls
    result = model.generate("same prompt", **GREEDY)
    assert result.timings.cached_tokens == result.prompt_tokens - 1  # last token re-run for logits
    assert rt.forward_calls - before == 1 + result.completion_tokens  # 1-token prefill + n decode steps
    assert rt.evaluated_tokens == result.prompt_tokens + 2 * result.completion_tokens + 1


def test_state_changed_behind_the_model_is_detected() -> None:
    model, rt = make("ok")
    model.generate("prompt", **GREEDY)
    rt.reset()
    rt.forward([1, 2, 3])  # someone else used the runtime
    result = model.generate("prompt", **GREEDY)
    assert result.text == "ok" and result.timings.cached_tokens == 0


def test_prompt_that_fills_the_context_raises() -> None:
    model, _ = make("abc", n_ctx=16)
    with pytest.raises(ContextOverflowError) as info:
        model.generate("x" * 15, max_tokens=5)  # BOS + 15 = 16 tokens
    message = str(info.value)
    assert "16 tokens" in message and "holds 16 tokens" in message and "n_ctx" in message
    assert "kv_overflow" in message


def test_generation_stops_when_the_context_is_full() -> None:
    model, rt = make("abcdefghijklmnop", n_ctx=16)
    result = model.generate("x" * 9, max_tokens=100, **GREEDY)  # 10 prompt tokens, room for 6
    assert (result.text, result.finish_reason) == ("abcdef", "length")
    assert rt.n_past <= rt.n_ctx


def test_chat_uses_default_chatml_with_one_bos() -> None:
    model, rt = make("Hi!")
    result = model.chat([{"role": "user", "content": "Hello"}], **GREEDY)
    assert result.text == "Hi!"
    prompt = rt.state[: result.prompt_tokens]
    expected = model.tokenize("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == expected and prompt.count(BOS) == 1


def test_chat_template_that_writes_bos_gets_no_second_one() -> None:
    template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                "[assistant] ")
    model, rt = make("Sure.", chat_template=template)
    result = model.chat([{"role": "user", "content": "Go"}], **GREEDY)
    prompt = rt.state[: result.prompt_tokens]
    assert prompt[0] == BOS and prompt.count(BOS) == 1
    assert model.tokenizer.decode(prompt) == "<s>[user] Go\n[assistant] "


def test_chat_ends_at_the_end_of_turn_token() -> None:
    model, _ = make("Done.<|im_end|>more text")
    reply = model.chat([{"role": "user", "content": "q"}], **GREEDY)
    assert (reply.text, reply.finish_reason) == ("Done.", "eos")
    plain = model.generate("q", **GREEDY)  # generate() knows only the tokenizer's EOS
    assert plain.text == "Done.more text"  # the control token itself is never shown


def test_chat_stream_and_bad_messages() -> None:
    model, _ = make("Yo")
    assert "".join(model.chat([{"role": "user", "content": "q"}], stream=True, **GREEDY)) == "Yo"
    with pytest.raises(InvalidInputError, match=r"messages\[1\]"):
        model.chat([{"role": "user", "content": "q"}, {"role": "user"}])


def test_timings_are_consistent() -> None:
    model, _ = make(DEFAULT_SCRIPT)
    result = model.generate("Tell me something", **GREEDY)
    t = result.timings
    assert t.prompt_tokens == result.prompt_tokens and t.completion_tokens == result.completion_tokens
    assert all(v > 0 for v in (t.ttft_ms, t.prefill_ms, t.decode_ms, t.total_ms, t.prefill_tps, t.decode_tps))
    assert t.prefill_ms <= t.ttft_ms <= t.total_ms
    assert t.decode_ms <= t.total_ms
    assert abs(t.ttft_ms + t.decode_ms - t.total_ms) < 1e-6 * max(1.0, t.total_ms)
    # decode_tps counts forward passes after the first token: n - 1, plus the EOS step
    assert t.decode_tps == pytest.approx(result.completion_tokens / (t.decode_ms / 1e3))
    d = result.to_dict()
    assert json.loads(json.dumps(d))["timings"]["completion_tokens"] == result.completion_tokens


def test_closing_a_stream_early_keeps_a_result() -> None:
    model, _ = make("abcdef")
    stream = model.stream("q", **GREEDY)
    got = [next(stream), next(stream)]
    stream.close()  # type: ignore[attr-defined]
    assert model.last_result is not None
    assert model.last_result.text == "".join(got) == "ab"


def test_interleaved_streams_stay_correct() -> None:
    model, _ = make("interleaved")
    a, b = model.stream("first prompt", **GREEDY), model.stream("second", **GREEDY)
    out_a: list[str] = []
    out_b: list[str] = []
    for _ in range(20):
        out_a.extend(next(a, ""))
        out_b.extend(next(b, ""))
    assert "".join(out_a) == "".join(out_b) == "interleaved"


def test_threads_share_one_model() -> None:
    model, _ = make("threads are fine")
    results: list[str] = []
    def work(prompt: str) -> None:
        for _ in range(5):
            results.append(model.generate(prompt, **GREEDY).text)
    threads = [threading.Thread(target=work, args=(f"prompt {i}",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == ["threads are fine"] * 20


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"max_tokens": 0}, "max_tokens must be an int >= 1"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"top_p": 0.0}, "top_p=0.0"),
])
def test_bad_arguments(kwargs: dict[str, object], needle: str) -> None:
    model, _ = make()
    with pytest.raises(InvalidInputError, match=needle):
        model.generate("q", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=needle):
        model.stream("q", **kwargs)  # type: ignore[arg-type]  # checked before the first piece


def test_bad_prompt_ids() -> None:
    model, _ = make()
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        model.generate([1, 99999])
    with pytest.raises(InvalidInputError, match="empty"):
        model.generate([])
    assert model.generate([72, 105], **GREEDY).text == DEFAULT_SCRIPT  # token ids used as given


def test_close_and_context_manager() -> None:
    with Model(FakeEngine("x")) as model:
        assert "backend='fake'" in repr(model)
        assert model.info()["backend"] == "fake"
    assert "closed" in repr(model)
    with pytest.raises(InvalidInputError, match="closed"):
        model.generate("q")
    model.close()  # twice is harmless


def test_tokenize_detokenize() -> None:
    model, _ = make()
    ids = model.tokenize("é<|im_end|>")
    assert ids == [BOS, 0xC3, 0xA9, 259]
    assert model.tokenize("a", add_special=False) == [97]
    assert model.detokenize(ids) == "<s>é<|im_end|>"
    assert model.detokenize(ids, skip_special=True) == "é"


def test_info_includes_manifest_basics() -> None:
    model = Model(FakeEngine(), manifest={"name": "tiny", "format": "fake", "other": 1})
    info = model.info()
    assert (info["name"], info["format"], info["n_ctx"]) == ("tiny", "fake", 2048)
    assert "other" not in info


def test_registry_opens_the_fake(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"script": "from file"}))
    engine = open_engine(path, "fake", RuntimeOptions(n_ctx=64), backend="fake")
    assert engine.default_ctx == 64
    assert Model(engine).generate("q", **GREEDY).text == "from file"
    other = open_engine(tmp_path / "none", "fake", RuntimeOptions(extra={"script": "extra"}), backend="fake")
    assert Model(other).generate("q", **GREEDY).text == "extra"


def test_stop_string_spelling_a_special_token() -> None:
    model, _ = make("Answer.<|im_end|>junk")
    result = model.generate("q", stop=["<|im_end|>"], **GREEDY)  # the token makes no text
    assert (result.text, result.finish_reason) == ("Answer.", "stop")


def test_model_seed_makes_a_session_reproducible() -> None:
    from edgellm.model import Model
    from edgellm.runtimes.fake import FakeEngine

    def session(seed: int) -> list[str]:
        model = Model(FakeEngine(), seed=seed)
        return [model.generate("hi", max_tokens=8, temperature=5.0, top_k=0, top_p=1.0, min_p=0.0).text
                for _ in range(3)]

    first, again, other = session(7), session(7), session(8)
    assert first == again
    assert first != other
    assert len(set(first)) > 1  # calls within a session draw different seeds


def test_ignore_eos_decodes_past_the_end_of_the_script() -> None:
    from edgellm.model import Model
    from edgellm.runtimes.fake import FakeEngine

    model = Model(FakeEngine(script="ab"))
    stopped = model.generate("x", max_tokens=10, temperature=0)
    assert stopped.finish_reason == "eos" and stopped.completion_tokens == 2
    forced = model.generate("x", max_tokens=10, temperature=0, ignore_eos=True)
    assert forced.finish_reason == "length" and forced.completion_tokens == 10


def test_thread_count_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    monkeypatch.setattr("edgellm.runtimes.threads.max_threads", lambda: 8)
    monkeypatch.setenv("EDGELLM_THREADS", "3")
    assert RuntimeOptions().thread_count() == 3
    assert RuntimeOptions(threads=5).thread_count() == 5  # the caller's choice wins
    monkeypatch.setenv("EDGELLM_THREADS", "")
    auto = RuntimeOptions().thread_choice()  # unset: the cores idle now (tests/test_threads.py)
    assert auto.auto and 1 <= auto.count <= psutil.cpu_count(logical=False)
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("EDGELLM_THREADS", bad)
        with pytest.raises(InvalidInputError, match=f"EDGELLM_THREADS='{bad}' is not a thread count"):
            RuntimeOptions().thread_count()
