"""Sessions, the KV budget, overflow policies and saved sessions, on the fake backend.

The same checks run on the real backends in tests/test_sessions_backends.py; here every
branch of the shared loop is reached quickly, with the fake engine's counters showing what
was (and was not) computed.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import edgellm
from edgellm import errors
from edgellm.kvcache import KVAbility, Overflow, OverflowPolicy, parse_bytes
from edgellm.model import Model
from edgellm.runtimes.fake import FakeEngine
from tests.fixtures import fake_artifact

GREEDY = {"temperature": 0.0}
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
BPT = FakeEngine().kv_bytes_per_token()  # f32: 2 x 2 layers x 2 heads x 16 x 4 = 512 B


def model(script: str = ALPHABET, **kw: object) -> Model:
    abilities = kw.pop("abilities", frozenset(KVAbility))
    return Model(FakeEngine(script, abilities=abilities), **kw)  # type: ignore[arg-type]


# -- sizes and budgets ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("96MiB", 96 * 2**20), ("1.5GB", 1_500_000_000), ("512k", 512 * 1024), ("2 GiB", 2 * 2**30),
    ("1000", 1000), (4096, 4096), (" 64 mb ", 64_000_000), (".5KiB", 512),
])
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "12 parsecs", "-5MiB", "0", 0, -1, True, None, "1e3MiB",
                                 2**61])
def test_parse_bytes_refuses(bad: object) -> None:
    with pytest.raises(errors.InvalidInputError, match="kv_budget"):
        parse_bytes(bad)


def test_budget_sizes_sessions_and_refuses_what_does_not_fit() -> None:
    m = model(n_ctx=64, kv_budget=3 * 64 * BPT)
    sessions = [m.session() for _ in range(3)]
    assert [s.n_ctx for s in sessions] == [64, 64, 64]
    assert m.budget.free_bytes == 0
    with pytest.raises(errors.KVBudgetError) as info:
        m.session()
    msg = str(info.value)
    assert "32.0 KiB" in msg and "0 B" in msg and "3 session(s) open" in msg and "\n" not in msg
    sessions[0].close()
    sessions[0].close()  # twice is harmless
    again = m.session(n_ctx=32)  # half a slot fits now
    assert again.cache.capacity_bytes == 32 * BPT and m.budget.free_bytes == 32 * BPT
    with pytest.raises(errors.KVBudgetError):
        m.session(n_ctx=64)


def test_budget_without_n_ctx_gives_one_session_all_of_it() -> None:
    m = model(kv_budget=100 * BPT + 7)
    assert m.n_ctx == 100
    assert m.generate("x", **GREEDY).text == ALPHABET
    with pytest.raises(errors.KVBudgetError):
        m.session(n_ctx=2)
    with pytest.raises(errors.InvalidInputError, match="holds 1 token"):
        model(kv_budget=BPT + 1)
    with pytest.raises(errors.InvalidInputError, match="lower n_ctx to 10"):
        model(n_ctx=64, kv_budget=10 * BPT)


def test_load_options_are_checked_against_the_backend_schema(tmp_path: Path) -> None:
    folder = fake_artifact(tmp_path / "fake", "ok")
    with pytest.raises(errors.InvalidInputError) as info:
        edgellm.load(folder, backend="fake", device="cpu", scrpit="x")
    msg = str(info.value)
    assert "unknown option 'scrpit'" in msg and "did you mean 'script'" in msg
    assert "kv_precision" in msg and "chat_template" in msg  # the valid ones are listed
    with pytest.raises(errors.InvalidInputError, match="'q4_0' is not supported by backend 'fake'"):
        edgellm.load(folder, backend="fake", device="cpu", kv_precision="q4_0")
    with pytest.raises(errors.InvalidInputError, match="kv_overflow 'slide' is not a policy"):
        edgellm.load(folder, backend="fake", device="cpu", kv_overflow="slide")
    with edgellm.load(folder, backend="fake", device="cpu", kv_precision="fp16", kv_budget="64KiB") as m:
        info_ = m.info()
        assert (info_["kv_precision"], info_["kv_bytes_per_token"]) == ("f16", 256)
        assert m.n_ctx == 256 and m.generate("q", **GREEDY).text == "ok"


def test_memory_reports_what_sessions_hold() -> None:
    m = model(n_ctx=128)
    assert m.memory()["kv"] == 0 and m.memory()["sessions"] == 0  # the default session is lazy
    r = m.generate("hello", **GREEDY)
    mem = m.memory()
    assert mem["kv"] == (r.prompt_tokens + r.completion_tokens) * BPT  # EOS's step evaluated the last token
    assert mem["kv_reserved"] == 128 * BPT and mem["sessions"] == 1
    assert mem["rss"] > 0 and mem["other"] == mem["rss"] - mem["kv"]
    assert set(mem) >= {"weights", "compute", "kv", "rss", "other"}


# -- sessions are separate conversations ----------------------------------------------


def test_sessions_keep_their_own_history() -> None:
    m = model("The reply.")
    a, b = m.session(), m.session()
    first = a.generate("first conversation", **GREEDY)
    b.generate("second one", **GREEDY)
    evaluated = m.engine.evaluated_tokens
    again = a.generate("first conversation, continued", **GREEDY)
    assert again.timings.cached_tokens == first.prompt_tokens
    # only the new words and the decode steps were computed: b did not evict a
    assert m.engine.evaluated_tokens - evaluated == len(", continued") + again.completion_tokens


def test_four_threads_on_one_model_give_what_each_gives_alone() -> None:
    prompts = [f"prompt number {i} " * (i + 1) for i in range(4)]
    alone = [model().generate(p, max_tokens=60, ignore_eos=True, **GREEDY).tokens for p in prompts]
    m = model()
    results: dict[int, tuple[list[int], list[int]]] = {}
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        with m.session() as s:
            barrier.wait()
            ids = [m.tokenize(piece, add_special=False)[0] for piece in
                   s.stream(prompts[i], max_tokens=60, **GREEDY) if piece]
            result = s.last_result
            assert result is not None and len(ids) <= 60
            results[i] = (result.tokens, s.tokens[: result.prompt_tokens])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        tokens, held_prompt = results[i]
        assert tokens == alone[i][: len(tokens)] and len(tokens) == 26
        assert held_prompt == m.tokenize(prompts[i])  # each cache held its own prompt


def test_interleaved_sessions_on_one_engine_stay_separate() -> None:
    m = model("0123456789")
    a, b = m.session(), m.session()
    sa, sb = a.stream("aaaa", **GREEDY), b.stream("bbbbbbbb", **GREEDY)
    out_a, out_b = [], []
    for pa, pb in zip(sa, sb, strict=False):
        out_a.append(pa)
        out_b.append(pb)
    out_a += list(sa)
    out_b += list(sb)
    assert "".join(out_a) == "".join(out_b) == "0123456789"
    calls = m.engine.forward_calls
    a.generate("aaaa", **GREEDY)  # a's cache still holds its conversation: one-token prefill
    assert a.last_result.timings.cached_tokens == 4  # BOS + 4 - 1 re-run for logits
    assert m.engine.forward_calls - calls == 1 + a.last_result.completion_tokens


# -- overflow policies -------------------------------------------------------------------


def test_error_policy_refuses_before_any_compute() -> None:
    m = model(n_ctx=16, kv_budget=16 * BPT)
    with pytest.raises(errors.ContextOverflowError) as info:
        m.generate("x" * 20)
    msg = str(info.value)
    assert "21 tokens" in msg and "holds 16 tokens" in msg and "kv_budget 8.0 KiB" in msg
    assert m.engine.forward_calls == 0


@pytest.mark.parametrize("abilities", [frozenset(KVAbility), frozenset({KVAbility.TRIM})],
                         ids=["shift", "re-prefill"])
def test_sliding_goes_on_past_the_cache_and_keeps_the_sinks(abilities: frozenset) -> None:
    m = model("0123456789", n_ctx=32, kv_overflow="sliding", kv_sinks=4, abilities=abilities)
    peak = 0
    session = m.session()
    original = session._backend.forward

    def watched(tokens, all_logits=False):  # type: ignore[no-untyped-def]
        nonlocal peak
        out = original(tokens, all_logits)
        peak = max(peak, session._backend.n_past)
        return out

    session._backend.forward = watched  # type: ignore[method-assign]
    result = session.generate("pq", max_tokens=200, ignore_eos=True, **GREEDY)
    assert result.completion_tokens == 200 and result.finish_reason == "length"
    assert peak <= 32 and result.timings.evicted_tokens > 0
    assert session.tokens[:4] == m.tokenize("pq")[:3] + [ord("0")]  # BOS, p, q, then the first reply byte
    # the fake predicts from the last 10 tokens, which eviction keeps: same as an unbounded cache
    unbounded = model("0123456789", n_ctx=4096).generate("pq", max_tokens=200, ignore_eos=True,
                                                         **GREEDY)
    assert result.tokens == unbounded.tokens


def test_sliding_gives_the_same_tokens_with_shift_or_re_prefill() -> None:
    texts = []
    for abilities in (frozenset(KVAbility), frozenset({KVAbility.TRIM})):
        m = model("The quick brown fox.", n_ctx=24, kv_overflow="sliding", kv_sinks=2,
                  abilities=abilities)
        texts.append(m.generate("hello there", max_tokens=120, ignore_eos=True, **GREEDY).tokens)
        evals = m.engine.evaluated_tokens
        texts.append(evals)
    assert texts[0] == texts[2]
    assert texts[1] < texts[3]  # shifting computed fewer tokens than re-prefilling


def test_sliding_fits_a_prompt_longer_than_the_cache() -> None:
    m = model("ok", n_ctx=32, kv_overflow="sliding", kv_sinks=4)
    long = "".join(chr(65 + i % 26) for i in range(100))
    result = m.generate(long, max_tokens=8, **GREEDY)
    assert result.text == "ok" and result.prompt_tokens == 101
    ids = m.tokenize(long)
    kept = m._default.tokens[:24]  # 4 sinks + the newest 20, leaving room for min(8, 28 // 2) tokens
    assert kept == ids[:4] + ids[-20:] and result.timings.dropped_prompt_tokens == 101 - 24


def test_truncate_keeps_the_system_prompt_through_forty_turns() -> None:
    m = model("Sure, noted.", n_ctx=200, kv_overflow="truncate")
    messages = [{"role": "system", "content": "You are terse."}]
    for turn in range(40):
        messages.append({"role": "user", "content": f"Remember the number {turn}."})
        result = m.chat(messages, max_tokens=20, **GREEDY)
        assert result.text == "Sure, noted."
        messages.append({"role": "assistant", "content": result.text})
        held = m.detokenize(m._default.tokens)
        assert held.startswith("<s><|im_start|>system\nYou are terse.<|im_end|>")
        assert f"Remember the number {turn}." in held
    assert "Remember the number 0." not in held  # the oldest turns were dropped
    with pytest.raises(errors.ContextOverflowError, match="system prompt and the last turn"):
        m.chat([{"role": "system", "content": "x" * 150}, {"role": "user", "content": "y" * 60}])


def test_policy_parse_and_capacity_checks() -> None:
    assert OverflowPolicy.parse("SLIDING", 0) == OverflowPolicy(Overflow.SLIDING, 0)
    with pytest.raises(errors.InvalidInputError, match="kv_sinks must be an integer >= 0"):
        OverflowPolicy.parse("sliding", -1)
    with pytest.raises(errors.InvalidInputError, match="kv_sinks 30 leaves no room in a cache of 16"):
        model(n_ctx=16, kv_overflow="sliding", kv_sinks=30).session()


# -- save and restore ------------------------------------------------------------------


def test_save_restore_continues_identically(tmp_path: Path) -> None:
    m = model("A long and careful answer.")
    s = m.session()
    s.generate("system prompt that is long", max_tokens=5, **GREEDY)
    path = s.save(tmp_path / "s.kv")
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    held = s.tokens
    expected = s.generate("system prompt that is long and more", **GREEDY).tokens
    fresh = model("A long and careful answer.")
    restored = fresh.restore(path)
    assert restored.tokens == held
    evaluated = fresh.engine.evaluated_tokens
    got = restored.generate("system prompt that is long and more", **GREEDY)
    assert got.tokens == expected
    shared = len(fresh.tokenize("system prompt that is long"))  # the restored prompt, reused as is
    assert got.timings.cached_tokens == shared
    assert fresh.engine.evaluated_tokens - evaluated == got.prompt_tokens - shared + got.completion_tokens


def test_restore_refuses_other_models_and_damaged_files(tmp_path: Path) -> None:
    m = model("abc")
    s = m.session()
    s.generate("hello", **GREEDY)
    path = s.save(tmp_path / "s.kv")
    with pytest.raises(errors.SessionStateError, match="model weights"):
        model("another script").restore(path)
    with pytest.raises(errors.SessionStateError, match="KV precision"):
        Model(FakeEngine("abc", kv_precision="f16")).restore(path)
    data = path.read_bytes()
    for name, blob in {"flipped": data[:-3] + bytes([data[-3] ^ 1]) + data[-2:],
                       "cut": data[: len(data) - 5], "header": data[:30], "foreign": b"GGUF" + data}.items():
        bad = tmp_path / f"{name}.kv"
        bad.write_bytes(blob)
        with pytest.raises(errors.SessionStateError) as info:
            m.restore(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(errors.SessionStateError, match="does not exist"):
        m.restore(tmp_path / "missing.kv")
    with pytest.raises(errors.InvalidInputError, match="folder .* does not exist"):
        s.save(tmp_path / "no" / "such" / "dir.kv")
    assert m.budget.reserved_bytes == 2048 * BPT  # refused restores gave their reservation back


def test_closed_session_and_model_refuse_calls() -> None:
    m = model()
    s = m.session()
    s.close()
    with pytest.raises(errors.InvalidInputError, match="session is closed"):
        s.generate("x")
    m.close()
    with pytest.raises(errors.InvalidInputError, match="model is closed"):
        m.session()
    assert "closed" in repr(s) and "closed" in repr(m)


@pytest.mark.parametrize("abilities", [frozenset(KVAbility), frozenset({KVAbility.TRIM})],
                         ids=["shift", "re-prefill"])
def test_logprobs_through_a_sliding_window(abilities: frozenset) -> None:
    import numpy as np

    script = ALPHABET[:10]
    text = "x" + script * 20
    sliding = model(script, n_ctx=40, kv_overflow="sliding", abilities=abilities).session()
    got = sliding.logprobs(text, chunk=8)
    whole = model(script, n_ctx=400).session().logprobs(text, chunk=8)
    # the fake predicts from the last 10 tokens, which every eviction keeps
    assert len(got) == len(text) and np.allclose(got, whole)
    assert len(sliding.tokens) <= 40 and sliding.tokens[:4] == sliding.tokenizer.encode(text)[:4]
    assert got[-1] > np.log(0.5)  # the script's next byte is the likely one
    with pytest.raises(errors.ContextOverflowError, match="kv_overflow='sliding'"):
        model(n_ctx=40).session().logprobs(text)


def test_cli_kv_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgellm.cli.main import main

    folder = fake_artifact(tmp_path / "fake", "0123456789")
    args = ["run", folder, "hello", "--backend", "fake", "--device", "cpu", "--temperature", "0"]
    assert main([*args, "--kv-budget", "16KiB", "--kv-overflow", "sliding", "--kv-sinks", "2",
                 "--max-tokens", "60", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "0123456789" and out["finish_reason"] == "eos"
    assert main([*args, "--kv-budget", "2KiB"]) == 2  # 4 tokens of KV: the prompt does not fit
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 4 tokens" in err[0] and "kv_budget 2.0 KiB" in err[0]
    assert main([*args, "--kv-budget", "a lot"]) == 2
    assert "kv_budget 'a lot' is not a size" in capsys.readouterr().err
