"""The llama.cpp backend through the public API, on the packaged SmolLM2 GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm import errors
from edgellm.runtimes.base import BackendSession, Engine, RuntimeOptions, open_runtime
from tests.fixtures import TEST_THREADS, session_checks


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path):
    with edgellm.load(smollm2_gguf, n_ctx=512, threads=TEST_THREADS) as m:
        yield m


def test_runtime_protocol_and_info(smollm2_gguf: Path) -> None:
    rt = open_runtime(smollm2_gguf, "gguf", RuntimeOptions(n_ctx=128))
    try:
        assert isinstance(rt.engine, Engine) and isinstance(rt.session, BackendSession)
        assert rt.n_vocab == 49152 and rt.spec.n_layers == 30 and rt.spec.n_kv_heads == 3
        assert rt.spec.tied_embeddings  # SmolLM2's GGUF has no output.weight
        info = rt.info()
        assert info["backend"] == "llamacpp" and info["n_ctx"] == 128 and info["device"] == "cpu"
        ids = rt.tokenizer.encode("Hello there", add_special=False)
        last = rt.forward(ids).copy()
        every = (rt.reset(), rt.forward(ids, all_logits=True))[1]
        assert every.shape == (len(ids), 49152)
        np.testing.assert_allclose(every[-1], last, atol=1e-3)
        rt.trim(1)
        assert rt.n_past == 1
    finally:
        rt.close()


def test_greedy_is_deterministic_and_reuses_the_prompt_prefix(model) -> None:
    first = model.generate("The capital of France is", max_tokens=12, temperature=0)
    second = model.generate("The capital of France is", max_tokens=12, temperature=0)
    assert first.text == second.text and first.completion_tokens == 12
    assert second.timings.cached_tokens > 0  # the KV state of the prompt was kept


def test_chat_template_and_stop(model) -> None:
    result = model.chat([{"role": "user", "content": "What is the capital of France?"}],
                        max_tokens=48, temperature=0, repeat_penalty=1.1)
    assert "Paris" in result.text
    assert "<|im_end|>" not in result.text and "<|im_start|>" not in result.text
    cut = model.generate("1, 2, 3, 4, 5,", max_tokens=40, temperature=0, stop=[" 8"])
    assert " 8" not in cut.text and cut.finish_reason == "stop"


def test_stream_pieces_join_to_the_result(model) -> None:
    pieces = list(model.stream("Emoji are fun: ", max_tokens=24, temperature=0))
    assert "".join(pieces) == model.last_result.text
    assert all("\ufffd" not in p for p in pieces)


def test_devices(smollm2_gguf: Path) -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        with edgellm.load(smollm2_gguf, device="gpu", n_ctx=64) as m:
            assert m.info()["device"] == "gpu"
    else:
        with pytest.raises(errors.NoCompatibleRuntimeError, match="no GPU offload"):
            edgellm.load(smollm2_gguf, device="gpu", n_ctx=64)
    with pytest.raises(errors.NoCompatibleRuntimeError, match="llamacpp: drives cpu, gpu, not npu"):
        edgellm.load(smollm2_gguf, device="npu")
    with pytest.raises(errors.UnknownDeviceError, match="'tpu'.*cpu, gpu, npu, auto"):
        edgellm.load(smollm2_gguf, device="tpu")
    with pytest.raises(errors.UnknownBackendError, match="'vllm'.*llamacpp"):
        edgellm.load(smollm2_gguf, backend="vllm")
    with pytest.raises(errors.InvalidInputError, match="n_ctx"):
        edgellm.load(smollm2_gguf, n_ctx=0)


def test_context_overflow_is_one_clear_error(smollm2_gguf: Path) -> None:
    with edgellm.load(smollm2_gguf, n_ctx=32) as m:
        with pytest.raises(errors.ContextOverflowError, match="holds 32 tokens"):
            m.generate("word " * 100, max_tokens=4)
        r = m.generate("Hi", max_tokens=1000, temperature=0, ignore_eos=True)
        assert r.finish_reason == "length" and r.prompt_tokens + r.completion_tokens <= 32


def test_verify_cli_records_parity(smollm2_gguf: Path, smollm2_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "q8"
    edgellm.convert(smollm2_gguf, out, quant="Q8_0")
    manifest = json.loads((out / "edgellm.json").read_text())
    assert manifest["parity"]["status"] == "skipped"  # a GGUF source has no reference
    proc = subprocess.run([sys.executable, "-m", "edgellm", "verify", str(out), "--reference",
                           str(smollm2_hf), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert 0.8 <= report["top1_agreement"] <= 1.0 and report["mean_kl"] >= 0
    manifest = json.loads((out / "edgellm.json").read_text())
    assert manifest["parity"]["top1_agreement"] == report["top1_agreement"]


# -- sessions and the KV cache (the checks every backend runs) ---------------------------


def _llama_loader(gguf: Path):  # type: ignore[no-untyped-def]
    def load(**kw: object):  # type: ignore[no-untyped-def]
        return edgellm.load(gguf, device="cpu", threads=TEST_THREADS, **kw)
    return load


def test_sessions_from_threads_match_alone(smollm2_gguf: Path) -> None:
    session_checks.check_threads_match_alone(_llama_loader(smollm2_gguf))


def test_sliding_shifts_the_cache(smollm2_gguf: Path) -> None:
    assert session_checks.check_sliding(_llama_loader(smollm2_gguf))["shift"]  # llama.cpp shifts K


def test_save_restore(smollm2_gguf: Path, tmp_path: Path) -> None:
    session_checks.check_save_restore(_llama_loader(smollm2_gguf), tmp_path)


def test_trim_equals_recompute(smollm2_gguf: Path) -> None:
    session_checks.check_trim_equals_recompute(_llama_loader(smollm2_gguf))


def test_interleaved_streams_and_threads_on_the_model_equal_serial(smollm2_gguf: Path) -> None:
    session_checks.check_default_interleaving_matches_serial(_llama_loader(smollm2_gguf))


def test_chat_markers_typed_by_a_user_stay_text(smollm2_gguf: Path) -> None:
    session_checks.check_chat_markers_stay_text(_llama_loader(smollm2_gguf))


def test_sessions_share_one_context_per_size(smollm2_gguf: Path) -> None:
    bpt = 23040  # SmolLM2: 2 x 30 layers x 3 KV heads x 64 x f16
    with edgellm.load(smollm2_gguf, device="cpu", n_ctx=256, kv_budget=4 * 256 * bpt) as m:
        sessions = [m.session() for _ in range(4)]
        pools = m.engine.info()["pools"]
        assert [(p["streams"], p["cells"], p["free"]) for p in pools] == [(4, 256, 0)]
        assert pools[0]["buffers"]["kv"] == 4 * 256 * bpt  # llama.cpp's own report
        with pytest.raises(errors.KVBudgetError):
            m.session()
        mem = m.memory()
        assert mem["weights"] > 80 * 2**20 and mem["compute"] > 0 and mem["kv_reserved"] == 4 * 256 * bpt
        for s in sessions:
            s.close()
        assert m.engine.info()["pools"] == []  # the context is freed with its last session
    with pytest.raises(errors.InvalidInputError, match="kv_precision 'u8' is not supported"):
        edgellm.load(smollm2_gguf, device="cpu", kv_precision="u8")
    with pytest.raises(errors.InvalidInputError, match="did you mean 'kv_precision'"):
        edgellm.load(smollm2_gguf, device="cpu", kv_type="q8_0")
    with edgellm.load(smollm2_gguf, device="cpu", n_ctx=64, kv_precision="q4_0") as m:
        assert m.generate("Hello", max_tokens=4, temperature=0).completion_tokens == 4
        assert m.info()["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 18 // 32


def test_restore_in_a_fresh_process_continues_identically(smollm2_gguf: Path, tmp_path: Path) -> None:
    system = [{"role": "system", "content": "You are a geography tutor. Answer in one sentence."}]
    question = [*system, {"role": "user", "content": "What is the capital of Italy?"}]
    with edgellm.load(smollm2_gguf, device="cpu", n_ctx=256, threads=TEST_THREADS) as m:
        s = m.session()
        s.chat(system + [{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0)
        s.save(tmp_path / "tutor.kv")
        expected = s.chat(question, max_tokens=16, temperature=0).tokens
    code = (
        "import json, sys, edgellm\n"
        f"m = edgellm.load({str(smollm2_gguf)!r}, device='cpu', n_ctx=256, threads=1)\n"
        f"s = m.restore({str(tmp_path / 'tutor.kv')!r})\n"
        f"r = s.chat({question!r}, max_tokens=16, temperature=0)\n"
        "print(json.dumps({'tokens': r.tokens, 'cached': r.timings.cached_tokens}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tokens"] == expected and got["cached"] > 10  # the system prompt was not prefilled again


def test_a_closed_model_and_its_sessions_refuse_calls(smollm2_gguf: Path) -> None:
    m = edgellm.load(smollm2_gguf, device="cpu", n_ctx=64)
    s = m.session()
    m.close()
    for call in (lambda: m.tokenize("hi"), lambda: m.detokenize([1, 2]), lambda: m.generate("hi"),
                 lambda: s.generate("hi"), lambda: list(s.stream("hi")), lambda: m.session(),
                 lambda: m.chat([{"role": "user", "content": "hi"}]), lambda: m.stream("hi"),
                 lambda: m.tokenizer.encode("hi"), lambda: m.tokenizer.special_tokens()):
        with pytest.raises(errors.ModelClosedError, match="closed"):
            call()


def test_token_ids_outside_the_vocabulary_are_refused_not_fatal(smollm2_gguf: Path) -> None:
    # llama.cpp's token table throws std::out_of_range through its C API: the process aborted.
    with edgellm.load(smollm2_gguf, device="cpu", threads=TEST_THREADS, n_ctx=64) as m:
        for bad in (-1, m.tokenizer.vocab_size):
            with pytest.raises(errors.InvalidInputError, match=f"token id {bad} is outside the vocabulary"):
                m.detokenize([bad])
            with pytest.raises(errors.InvalidInputError, match="outside the vocabulary"):
                m.tokenizer.is_special(bad)


def test_close_during_a_stream_ends_it_with_model_closed(smollm2_gguf: Path) -> None:
    m = edgellm.load(smollm2_gguf, device="cpu", threads=TEST_THREADS, n_ctx=64)
    stream = m.stream("Once upon a time", max_tokens=32, temperature=0.0)
    next(stream)
    m.close()
    with pytest.raises(errors.ModelClosedError):
        list(stream)
