"""The OpenVINO backend on stateful IRs exported by optimum-intel from the tiny models.

Every tiny architecture is exported with optimum-intel (``OVModelForCausalLM``,
``export=True``), its tokenizer files copied beside the IR, and run on OpenVINO's CPU
device: logits are compared with PyTorch's, step-by-step decoding with the full-sequence
logits (the KV state is right), and generation goes through ``edgellm.load`` and the
shared loop. Tolerances (max |logit difference|, logits have a std of about 2.5):

- precision f32, KV cache f32: 1e-4 against PyTorch (measured <= 7e-6 on every arch);
- KV cache f16 (the default): 2e-2 step-by-step against full-sequence (measured <= 5.3e-3).

Gemma 2 is the exception: optimum-intel 1.27 traces with SDPA attention, which drops
Gemma 2's attention-logit soft-capping (50.0), so the IR differs from transformers' eager
reference by ~1.2e-2. That is an export limitation, marked as a strict xfail; the runtime
itself is checked against transformers run with SDPA (the graph that was exported).

Only OpenVINO's CPU device exists on the test machines: GPU and NPU selection and their
compile properties are tested as pure functions over faked device lists, never run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm import errors
from edgellm.runtimes.base import BackendSession, Engine, OneSession, RuntimeOptions, get_backend
from tests.fixtures import TEST_THREADS, require, session_checks, tiny_models, top_modules_after

require("openvino", "optimum.intel")

from edgellm.runtimes import openvino as ovrt  # noqa: E402 (after the require check)

PROMPT_IDS = [0, 5, 77, 300, 12, 9, 450, 33, 21, 700, 3, 64]
F32_TOL = 1e-4
F16_KV_TOL = 2e-2
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                    "special_tokens_map.json")
# Architectures whose optimum-intel export is known to differ from transformers' eager
# reference, with the reason (see the module docstring).
_EXPORT_DRIFT = {"gemma2": "optimum-intel exports SDPA attention, dropping attn_logit_softcapping"}


def _export(hf_dir: Path, out: Path) -> Path:
    """Export ``hf_dir`` to a stateful IR in ``out`` with a manifest; return the folder."""
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(hf_dir, export=True, compile=False)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, out / name)
    manifest = {"format": "openvino", "files": {"model": "openvino_model.xml"}}
    (out / "edgellm.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def ov_export(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
              ) -> Callable[[str], Path]:
    """Factory: ``ov_export(arch) -> folder`` with the IR, tokenizer, config and manifest."""
    built: dict[str, Path] = {}

    def factory(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp(f"ov-{arch}")
            try:
                built[arch] = _export(tiny_model(arch), out)
            except Exception as exc:  # an export failure is a finding, never a skip
                pytest.fail(f"optimum-intel could not export {arch}: {type(exc).__name__}: {exc}")
        return built[arch]

    return factory


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov-cache")


def _open(folder: Path, cache_dir: Path, kv_precision: str | None = None, **extra: object) -> OneSession:
    extra = {"precision": "f32", "cache_dir": str(cache_dir), **extra}
    options = RuntimeOptions(threads=TEST_THREADS, kv_precision=kv_precision, extra=extra)
    return OneSession(ovrt.open(folder / "openvino_model.xml", options))


def _sdpa_reference(hf_dir: Path, ids: list[int]) -> np.ndarray:
    """transformers' logits with SDPA attention: the graph optimum-intel exports."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# --- parity, per architecture ------------------------------------------------------------


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_all_logits_match_pytorch(arch: str, ov_export, tiny_model, cache_dir: Path) -> None:
    rt = _open(ov_export(arch), cache_dir, kv_precision="f32")
    try:
        got = rt.forward(PROMPT_IDS, all_logits=True)
        assert got.dtype == np.float32 and got.shape == (len(PROMPT_IDS), rt.n_vocab)
        if arch in _EXPORT_DRIFT:
            ref = _sdpa_reference(tiny_model(arch), PROMPT_IDS)
        else:
            ref = tiny_models.reference_logits(tiny_model(arch), PROMPT_IDS)
        assert float(np.abs(got - ref).max()) <= F32_TOL
    finally:
        rt.close()


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_prefill_computes_logits_for_the_last_position_only(arch: str, ov_export, cache_dir: Path) -> None:
    """The Slice before the output MatMul (ov_logits) is found on every architecture."""
    rt = _open(ov_export(arch), cache_dir, kv_precision="f32")
    try:
        assert rt.engine.sliced_logits
        rt.forward(PROMPT_IDS)
        request = rt.session._request
        assert tuple(request.get_tensor("logits").shape) == (1, 1, rt.n_vocab)
        rt.reset()
        rt.forward(PROMPT_IDS, all_logits=True)
        assert tuple(request.get_tensor("logits").shape) == (1, len(PROMPT_IDS), rt.n_vocab)
    finally:
        rt.close()


@pytest.mark.parametrize("arch", sorted(_EXPORT_DRIFT))
@pytest.mark.xfail(strict=True, reason="optimum-intel export drift (see module docstring)")
def test_export_matches_eager_reference(arch: str, ov_export, tiny_model, cache_dir: Path) -> None:
    rt = _open(ov_export(arch), cache_dir, kv_precision="f32")
    try:
        got = rt.forward(PROMPT_IDS, all_logits=True)
        ref = tiny_models.reference_logits(tiny_model(arch), PROMPT_IDS)
        assert float(np.abs(got - ref).max()) <= F32_TOL
    finally:
        rt.close()


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
@pytest.mark.parametrize(("kv", "tol"), [("f32", F32_TOL), ("f16", F16_KV_TOL)])
def test_step_decode_matches_full_sequence(arch: str, kv: str, tol: float, ov_export,
                                           cache_dir: Path) -> None:
    rt = _open(ov_export(arch), cache_dir, kv_precision=kv)
    try:
        full = rt.forward(PROMPT_IDS, all_logits=True)
        rt.reset()
        assert rt.n_past == 0
        last = rt.forward(PROMPT_IDS[:4])
        assert last.shape == (rt.n_vocab,)
        steps = [last] + [rt.forward([t]) for t in PROMPT_IDS[4:]]
        assert rt.n_past == len(PROMPT_IDS)
        assert float(np.abs(np.stack(steps) - full[3:]).max()) <= tol
    finally:
        rt.close()


def test_trim_refeeds_kept_prefix(ov_export, cache_dir: Path) -> None:
    rt = _open(ov_export("qwen3"), cache_dir, kv_precision="f32")
    try:
        full = rt.forward(PROMPT_IDS, all_logits=True)
        rt.trim(5)
        assert rt.n_past == 5
        again = rt.forward(PROMPT_IDS[5:], all_logits=True)
        assert float(np.abs(again - full[5:]).max()) <= F32_TOL
        rt.trim(100)  # more than held: nothing changes
        assert rt.n_past == len(PROMPT_IDS)
        rt.trim(0)
        assert rt.n_past == 0
    finally:
        rt.close()


def test_protocol_info_and_context_limit(ov_export, cache_dir: Path) -> None:
    rt = OneSession(ovrt.open(ov_export("llama") / "openvino_model.xml",
                              RuntimeOptions(n_ctx=8, extra={"cache_dir": str(cache_dir)})))
    try:
        assert isinstance(rt.engine, Engine) and isinstance(rt.session, BackendSession)
        info = rt.info()
        assert info["backend"] == "openvino" and info["device"] == "cpu"
        assert info["ov_device"] == "CPU" and info["execution_devices"] == ["CPU"]
        assert info["n_ctx"] == 8 and info["threads"] >= 1
        assert info["kv_precision"] == "f16"  # the default
        assert info["inference_precision"] == "device default"
        assert info["cache_dir"] == str(cache_dir)
        assert rt.n_vocab == rt.spec.vocab_size
        with pytest.raises(errors.ContextOverflowError):
            rt.forward(PROMPT_IDS)
        with pytest.raises(ValueError):
            rt.forward([])
    finally:
        rt.close()


# --- through edgellm.load and the shared loop ---------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_load_generate_is_greedy_argmax(arch: str, ov_export, cache_dir: Path) -> None:
    folder = ov_export(arch)
    with edgellm.load(folder, backend="openvino", threads=TEST_THREADS, precision="f32",
                      kv_precision="f32", cache_dir=str(cache_dir)) as model:
        assert model.info()["backend"] == "openvino"
        result = model.generate(PROMPT_IDS[:6], max_tokens=6, temperature=0, ignore_eos=True)
        assert len(result.tokens) == 6
    rt = _open(folder, cache_dir, kv_precision="f32")
    try:
        ids, expected = list(PROMPT_IDS[:6]), []
        for _ in range(6):
            nxt = int(np.argmax(rt.forward(ids, all_logits=True)[-1]))
            rt.reset()
            ids.append(nxt)
            expected.append(nxt)
        assert result.tokens == expected
    finally:
        rt.close()


def test_load_chat_and_stream(ov_export, cache_dir: Path) -> None:
    with edgellm.load(ov_export("qwen3"), backend="openvino", cache_dir=str(cache_dir)) as model:
        reply = model.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
        assert 1 <= reply.completion_tokens <= 5 and isinstance(reply.text, str)
        again = model.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
        assert again.tokens == reply.tokens  # prefix reuse (trim) keeps greedy output
        pieces = list(model.stream("def greet(name):", max_tokens=4, temperature=0))
        assert "".join(pieces) == model.generate("def greet(name):", max_tokens=4,
                                                 temperature=0).text


def test_runtime_imports_no_torch_transformers_or_optimum(ov_export, cache_dir: Path) -> None:
    code = (
        "import sys, edgellm\n"
        f"m = edgellm.load({str(ov_export('llama'))!r}, backend='openvino', "
        f"cache_dir={str(cache_dir)!r})\n"
        "r = m.generate('def greet', max_tokens=3, temperature=0)\n"
        "assert r.completion_tokens >= 1\n"
    )
    loaded = top_modules_after(code)
    assert "openvino" in loaded  # the backend really ran
    heavy = {"torch", "transformers", "optimum", "nncf"}
    assert not loaded & heavy, loaded & heavy


def test_registry_row() -> None:
    spec = get_backend("openvino")
    assert spec.formats == ("openvino",) and spec.devices == ("cpu", "gpu", "npu")
    assert spec.requires == "openvino" and spec.why_not("openvino", "cpu") is None


# --- device selection and properties (pure functions, faked device lists) -----------------
# Only CPU exists on the test machines; GPU and NPU cannot run here, so their selection and
# properties are checked against faked `available_devices` lists only.


@pytest.mark.parametrize(("device", "available", "expected"), [
    ("cpu", ["CPU"], "CPU"),
    ("gpu", ["CPU", "GPU"], "GPU"),
    ("gpu", ["CPU", "GPU.0", "GPU.1"], "GPU"),
    ("npu", ["CPU", "NPU"], "NPU"),
    ("auto", ["CPU"], "AUTO"),
])
def test_select_device(device: str, available: list[str], expected: str) -> None:
    assert ovrt.select_device(device, available) == expected


@pytest.mark.parametrize(("device", "available"), [
    ("gpu", ["CPU"]), ("npu", ["CPU", "GPU.0"]), ("cpu", ["GPU"]), ("auto", []),
])
def test_select_device_refuses_unseen(device: str, available: list[str]) -> None:
    with pytest.raises(errors.NoCompatibleRuntimeError) as exc:
        ovrt.select_device(device, available)
    msg = str(exc.value)
    assert "\n" not in msg and (", ".join(available) or "none") in msg
    assert "openvino" in exc.value.reasons


def test_unknown_device_through_runtime_uses_faked_list(ov_export, cache_dir: Path) -> None:
    class FakeCore:
        available_devices = ["CPU"]

    with pytest.raises(errors.NoCompatibleRuntimeError, match=r"'npu' \(NPU\).*sees: CPU"):
        ovrt.OpenVINOEngine(ov_export("llama") / "openvino_model.xml",
                            RuntimeOptions(device="npu"), core=FakeCore())
    with pytest.raises(errors.InvalidInputError, match="unknown device"):
        ovrt.select_device("tpu", ["CPU"])


@pytest.mark.parametrize(("ov_device", "extra", "expected"), [
    ("CPU", {}, {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "3",
                 "KV_CACHE_PRECISION": "f16", "CACHE_DIR": "/c"}),
    ("CPU", {"precision": "f32", "kv_precision": "u8"},
     {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "3", "KV_CACHE_PRECISION": "u8",
      "INFERENCE_PRECISION_HINT": "f32", "CACHE_DIR": "/c"}),
    ("GPU", {"precision": "f16"}, {"PERFORMANCE_HINT": "LATENCY", "KV_CACHE_PRECISION": "f16",
                                   "INFERENCE_PRECISION_HINT": "f16", "CACHE_DIR": "/c"}),
    ("NPU", {"precision": "f32"}, {"PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": "/c"}),
    ("AUTO", {}, {"PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": "/c"}),
])
def test_build_properties(ov_device: str, extra: dict, expected: dict) -> None:
    kv = extra.pop("kv_precision", None)
    assert ovrt.build_properties(ov_device, 3, extra, Path("/c"), kv_precision=kv) == expected


@pytest.mark.parametrize("extra", [{"kv_precision": "q4"}, {"precision": "int8"}])
def test_build_properties_refuses_unknown_values(extra: dict) -> None:
    kv = extra.pop("kv_precision", None)
    with pytest.raises(errors.InvalidInputError, match="use one of"):
        ovrt.build_properties("CPU", 2, extra, None, kv_precision=kv)


def test_default_cache_dir() -> None:
    assert ovrt.default_cache_dir({"EDGELLM_CACHE": "/x"}) == Path("/x/ov-cache")
    assert ovrt.default_cache_dir({}) == Path("~/.cache/edgellm/ov-cache").expanduser()


# --- damaged files -> one-line edgellm errors ---------------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def _assert_one_line(exc: BaseException, name: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and name in msg, msg


def test_missing_bin(ov_export, tmp_path: Path, cache_dir: Path) -> None:
    folder = _copy(ov_export("llama"), tmp_path)
    (folder / "openvino_model.bin").unlink()
    with pytest.raises(errors.InvalidModelError) as exc:
        _open(folder, cache_dir)
    _assert_one_line(exc.value, "openvino_model.bin")


def test_truncated_bin(ov_export, tmp_path: Path, cache_dir: Path) -> None:
    folder = _copy(ov_export("llama"), tmp_path)
    weights = folder / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(errors.InvalidModelError) as exc:
        _open(folder, cache_dir)
    _assert_one_line(exc.value, "openvino_model.xml")


def test_bin_from_another_export(ov_export, tmp_path: Path, cache_dir: Path) -> None:
    folder = _copy(ov_export("llama"), tmp_path)
    shutil.copy(ov_export("gemma3") / "openvino_model.bin", folder / "openvino_model.bin")
    with pytest.raises(errors.EdgeLLMError) as exc:
        _open(folder, cache_dir)
    assert isinstance(exc.value, (errors.InvalidModelError, errors.BackendError))
    _assert_one_line(exc.value, "openvino_model.xml")


def test_not_an_xml_or_missing(ov_export, tmp_path: Path, cache_dir: Path) -> None:
    folder = _copy(ov_export("llama"), tmp_path)
    with pytest.raises(errors.ModelNotFoundError):
        ovrt.open(folder / "nope.xml", RuntimeOptions())
    with pytest.raises(errors.InvalidModelError, match=r"\.xml file"):
        ovrt.open(folder / "config.json", RuntimeOptions())
    (folder / "openvino_model.xml").write_text("<net><broken", encoding="utf-8")
    with pytest.raises(errors.InvalidModelError) as exc:
        _open(folder, cache_dir)
    _assert_one_line(exc.value, "openvino_model.xml")


# --- NPU: static shapes (NPUW LLM pipeline) on a faked NPU ----------------------------------


class _FakeNpuCore:
    """An OpenVINO Core that sees an NPU: "NPU" compiles run on the CPU, properties recorded.

    Only the device list and the compile call are faked; the IR is read and run for real,
    so edgellm's NPU code path (static-shape limits, re-prefill) runs end to end.
    """

    available_devices = ["CPU", "NPU"]

    def __init__(self) -> None:
        import openvino as ov

        self._core = ov.Core()
        self.compiled: tuple[str, dict[str, str]] | None = None

    def read_model(self, *args: str):
        return self._core.read_model(*args)

    def compile_model(self, model, device: str, properties: dict[str, str]):
        self.compiled = (device, dict(properties))
        return self._core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                       "KV_CACHE_PRECISION": "f32"})


def _npu(folder: Path, cache_dir: Path, core: _FakeNpuCore, n_ctx: int | None = None,
         **extra: object) -> OneSession:
    options = RuntimeOptions(threads=2, device="npu", n_ctx=n_ctx,
                             extra={"cache_dir": str(cache_dir), **extra})
    return OneSession(ovrt.OpenVINOEngine(folder / "openvino_model.xml", options, core=core))


def test_npu_static_shapes_compile_properties(ov_export, cache_dir: Path) -> None:
    core = _FakeNpuCore()
    rt = _npu(ov_export("llama"), cache_dir, core, max_prompt_len=100, min_response_len=10)
    device, props = core.compiled
    assert device == "NPU"
    assert {k: props[k] for k in props if k.startswith("NPU")} == {
        "NPU_USE_NPUW": "YES", "NPUW_LLM": "YES", "NPUW_LLM_BATCH_DIM": "0",
        "NPUW_LLM_SEQ_LEN_DIM": "2", "NPUW_LLM_MAX_PROMPT_LEN": "128",  # rounded up to 64s
        "NPUW_LLM_MIN_RESPONSE_LEN": "64"}
    assert "INFERENCE_NUM_THREADS" not in props and "KV_CACHE_PRECISION" not in props
    assert rt.n_ctx == 192 and rt.info()["npu_static_shapes"] == {"max_prompt_len": 128,
                                                                  "min_response_len": 64}
    with pytest.raises(errors.InvalidInputError, match="n_ctx 256 > the NPU's static KV size 192"):
        _npu(ov_export("llama"), cache_dir, _FakeNpuCore(), n_ctx=256, max_prompt_len=100,
             min_response_len=10)


def test_npu_shapes_come_from_the_manifest(ov_export, tmp_path: Path, cache_dir: Path) -> None:
    folder = _copy(ov_export("llama"), tmp_path)
    manifest = json.loads((folder / "edgellm.json").read_text())
    (folder / "edgellm.json").write_text(json.dumps({**manifest, "npu": {
        "max_prompt_len": 64, "min_response_len": 64}}))
    assert _npu(folder, cache_dir, _FakeNpuCore()).n_ctx == 128
    with pytest.raises(errors.InvalidInputError, match="max_prompt_len must be a positive integer"):
        _npu(folder, cache_dir, _FakeNpuCore(), max_prompt_len=0)


def test_npu_prompt_longer_than_static_shape(ov_export, cache_dir: Path) -> None:
    rt = _npu(ov_export("llama"), cache_dir, _FakeNpuCore(), max_prompt_len=64, min_response_len=64)
    with pytest.raises(errors.ContextOverflowError) as exc:
        rt.forward(list(range(1, 66)))
    msg = str(exc.value)
    assert "\n" not in msg and "65 tokens exceeds the NPU's static prompt shape of 64" in msg
    assert "max_prompt_len=128" in msg and rt.n_past == 0
    rt.forward(list(range(1, 60)))
    with pytest.raises(errors.ContextOverflowError, match="static prompt shape"):  # history + new
        rt.forward(list(range(1, 10)))
    for _ in range(10):  # single-token decoding may go past the prompt limit, up to the KV size
        rt.forward([5])
    assert rt.n_past == 69


def test_npu_reprefills_multi_token_input_after_decoding(ov_export, cache_dir: Path) -> None:
    folder = ov_export("llama")
    npu = _npu(folder, cache_dir, _FakeNpuCore(), max_prompt_len=64, min_response_len=64)
    cpu = _open(folder, cache_dir, kv_precision="f32")
    steps = [PROMPT_IDS, [40], [41], [7, 8, 9]]  # prefill, two decode steps, a new user turn
    for chunk in steps:
        np.testing.assert_allclose(npu.forward(chunk), cpu.forward(chunk), atol=F32_TOL)
    assert npu.n_past == cpu.n_past == sum(map(len, steps))
    whole = npu.forward([11, 12], all_logits=True)
    assert whole.shape == (2, npu.n_vocab)
    np.testing.assert_allclose(whole, cpu.forward([11, 12], all_logits=True), atol=F32_TOL)


def test_compiled_cache_is_per_model_files(ov_export, tmp_path: Path, cache_dir: Path) -> None:
    folder = _copy(ov_export("llama"), tmp_path)
    xml = folder / "openvino_model.xml"
    first = ovrt.model_fingerprint(xml)
    rt = _open(folder, cache_dir)
    assert rt.properties["CACHE_DIR"] == str(cache_dir / first)
    assert any((cache_dir / first).iterdir()), "the compiled blob is cached"
    rt.close()
    weights = xml.with_suffix(".bin")  # a re-conversion at the same path: new files, new folder
    stat = weights.stat()
    import os

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert ovrt.model_fingerprint(xml) != first


# --- sessions and the KV cache (the checks every backend runs) ----------------------------


def _ov_loader(folder: Path, cache_dir: Path):  # type: ignore[no-untyped-def]
    def load(**kw: object):  # type: ignore[no-untyped-def]
        return edgellm.load(folder, backend="openvino", device="cpu", threads=TEST_THREADS, precision="f32",
                            kv_precision="f32", cache_dir=str(cache_dir), **kw)
    return load


def test_sessions_from_threads_match_alone(ov_export, cache_dir: Path) -> None:
    session_checks.check_threads_match_alone(_ov_loader(ov_export("llama"), cache_dir))


def test_sliding_shifts(ov_export, cache_dir: Path) -> None:
    assert session_checks.check_sliding(_ov_loader(ov_export("llama"), cache_dir))["shift"]  # re-rotated


def test_save_restore(ov_export, cache_dir: Path, tmp_path: Path) -> None:
    session_checks.check_save_restore(_ov_loader(ov_export("llama"), cache_dir), tmp_path)


def test_trim_cuts_the_states(ov_export, cache_dir: Path) -> None:
    session_checks.check_trim_equals_recompute(_ov_loader(ov_export("llama"), cache_dir))


def test_kv_precision_u8_and_held_bytes(ov_export, cache_dir: Path) -> None:
    with edgellm.load(ov_export("llama"), backend="openvino", device="cpu", n_ctx=64, kv_precision="u8",
                      cache_dir=str(cache_dir)) as m:
        assert m.info()["kv_precision"] == "u8"
        s = m.session()
        s.generate(PROMPT_IDS, max_tokens=3, temperature=0)
        assert s.cache.n_tokens == len(PROMPT_IDS) + 2 and s.cache.held_bytes() > 0
        s._backend.trim(4)  # cutting u8 states works too
        assert s._backend.n_past == 4


def test_sliding_shift_matches_llamacpp(ov_export, cache_dir: Path, tiny_model, tmp_path: Path) -> None:
    loader = _ov_loader(ov_export("llama"), cache_dir)
    session_checks.check_shift_matches_llamacpp(loader, tiny_model("llama"), tmp_path)
