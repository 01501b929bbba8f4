"""The ONNX Runtime backend on decoders exported by optimum from the tiny models.

Every tiny architecture is exported once per session (``tests.fixtures.onnx_export``:
optimum's ONNX exporter, task "text-generation-with-past", the model loaded with eager
attention) and run on ONNX Runtime's CPU provider: logits are compared with PyTorch's,
step-by-step decoding with the full-sequence logits (the I/O-bound KV cache is right), and
generation goes through ``edgellm.load`` and the shared loop. Tolerances (max |logit
difference|; the tiny models' logits have a std of about 2.5):

- float32 export: 1e-4 against PyTorch (measured <= 7.2e-6 on every arch);
- float16 weights, activations and KV: 5e-2 against PyTorch (measured 1.2e-2).

optimum's ``main_export`` itself loads the model with SDPA attention, which drops Gemma 2's
attention-logit soft-capping: that drift is pinned by a strict xfail, so it is noticed when
optimum fixes it. Only the CPU execution provider exists on the test machines: GPU and NPU
provider selection is tested as a pure function over faked provider lists, never run.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm import errors
from edgellm.runtimes.base import (
    BackendSession,
    Engine,
    OneSession,
    RuntimeOptions,
    get_backend,
    select_backend,
)
from tests.fixtures import TEST_THREADS, require, session_checks, tiny_models, top_modules_after

require("onnxruntime", "onnx", "optimum.exporters.onnx")

from edgellm.runtimes import onnxruntime as ortrt  # noqa: E402 (after the require check)
from tests.fixtures import onnx_export  # noqa: E402

PROMPT_IDS = [0, 5, 77, 300, 12, 9, 450, 33, 21, 700, 3, 64]
F32_TOL = 1e-4
F16_TOL = 5e-2
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", "DmlExecutionProvider", "ROCMExecutionProvider",
                 "CoreMLExecutionProvider")


@pytest.fixture(scope="session")
def onnx_dir(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str], Path]:
    """Factory: ``onnx_dir(arch) -> folder`` with model.onnx, config, tokenizer, manifest."""
    built: dict[str, Path] = {}

    def factory(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp(f"onnx-{arch}")
            try:
                built[arch] = onnx_export.export_onnx(tiny_model(arch), out)
            except Exception as exc:  # an export failure is a finding, never a skip
                pytest.fail(f"optimum could not export {arch}: {type(exc).__name__}: {exc}")
        return built[arch]

    return factory


@pytest.fixture(scope="session")
def llama_f16(onnx_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("onnx-llama-f16") / "m"
    shutil.copytree(onnx_dir("llama"), folder)
    onnx_export.to_float16(folder)
    return folder


@pytest.fixture(scope="session")
def llama_external(onnx_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("onnx-llama-ext") / "m"
    shutil.copytree(onnx_dir("llama"), folder)
    onnx_export.to_external_data(folder)
    return folder


def _open(folder: Path, **kw: object) -> OneSession:
    extra = kw.pop("extra", {})
    kw.setdefault("threads", TEST_THREADS)
    options = RuntimeOptions(extra=extra, **kw)  # type: ignore[arg-type]
    return OneSession(ortrt.open(folder / "model.onnx", options))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _step_logits(rt: OneSession, ids: list[int], first: int = 4) -> np.ndarray:
    """Last-token logits after ``ids[:first]``, then after each further single token."""
    return np.stack([rt.forward(ids[:first])] + [rt.forward([t]) for t in ids[first:]])


# --- parity, per architecture ------------------------------------------------------------


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_all_logits_match_pytorch(arch: str, onnx_dir, tiny_model) -> None:
    rt = _open(onnx_dir(arch))
    try:
        got = rt.forward(PROMPT_IDS, all_logits=True)
        assert got.dtype == np.float32 and got.shape == (len(PROMPT_IDS), rt.n_vocab)
        ref = tiny_models.reference_logits(tiny_model(arch), PROMPT_IDS)
        assert _max_diff(got, ref) <= F32_TOL
    finally:
        rt.close()


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURE_NAMES)
def test_step_decode_and_chunked_prefill_match_full_sequence(arch: str, onnx_dir) -> None:
    rt = _open(onnx_dir(arch))
    chunked = _open(onnx_dir(arch), extra={"n_batch": 5})  # 12 tokens -> runs of 5, 5, 2
    try:
        full = rt.forward(PROMPT_IDS, all_logits=True)
        rt.reset()
        assert rt.n_past == 0
        steps = _step_logits(rt, PROMPT_IDS)
        assert rt.n_past == len(PROMPT_IDS)
        assert _max_diff(steps, full[3:]) <= F32_TOL
        assert _max_diff(chunked.forward(PROMPT_IDS, all_logits=True), full) <= F32_TOL
        assert chunked.n_past == len(PROMPT_IDS)
    finally:
        rt.close()
        chunked.close()


@pytest.mark.xfail(strict=True, reason="optimum main_export traces SDPA attention, which drops "
                   "Gemma 2's attn_logit_softcapping (measured 1.2e-2)")
def test_main_export_default_attention_matches_eager_gemma2(tiny_model, tmp_path: Path) -> None:
    from optimum.exporters.onnx import main_export

    src = tiny_model("gemma2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx tracer warnings
        main_export(str(src), tmp_path, task=onnx_export.TASK, local_files_only=True,
                    do_validation=False)
    rt = _open(tmp_path)
    try:
        got = rt.forward(PROMPT_IDS, all_logits=True)
        assert _max_diff(got, tiny_models.reference_logits(src, PROMPT_IDS)) <= F32_TOL
    finally:
        rt.close()


def test_trim_relays_kept_prefix_and_reset_empties(onnx_dir) -> None:
    rt = _open(onnx_dir("qwen3"))
    try:
        full = rt.forward(PROMPT_IDS, all_logits=True)
        rt.trim(5)
        assert rt.n_past == 5
        assert _max_diff(rt.forward(PROMPT_IDS[5:], all_logits=True), full[5:]) <= F32_TOL
        rt.trim(100)  # more than held: nothing changes
        assert rt.n_past == len(PROMPT_IDS)
        rt.trim(9)  # now from the other buffer of each pair
        assert _max_diff(_step_logits(rt, PROMPT_IDS[9:], first=1), full[9:]) <= F32_TOL
        rt.trim(0)
        assert rt.n_past == 0
        rt.forward([PROMPT_IDS[0]])
        rt.reset()
        assert rt.n_past == 0
        assert _max_diff(rt.forward(PROMPT_IDS, all_logits=True), full) <= F32_TOL
    finally:
        rt.close()


def test_kv_buffers_are_fixed_and_bound_in_place(onnx_dir) -> None:
    rt = _open(onnx_dir("llama"), n_ctx=512)
    try:
        addresses = [[a.ctypes.data for a in bank] for bank in rt.session._kv]
        kv_bytes = rt.session._kv[0][0].nbytes  # one K (or V) buffer: 2 heads * 512 * 16 * 4 = 64 KiB
        assert kv_bytes == 2 * 512 * 16 * 4
        ours = {a.ctypes.data for bank in rt.session._kv for a in bank}
        rt.forward(list(range(1, 200)))
        for _ in range(3):
            rt.forward([5])
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(20):
                rt.forward([5])
                # ORT wrote present into our buffers (the bank now holding the past), logits
                # into ours: it allocated no output of its own.
                sess = rt.session
                out_ptrs = {v.data_ptr() for v in sess._binding.get_outputs()}
                assert out_ptrs == {*(a.ctypes.data for a in sess._kv[sess._bank]), sess._logits.ctypes.data}
            decode_peak = tracemalloc.get_traced_memory()[1] - base
            # The instrument sees a KV-sized numpy allocation (what a copying cache would do).
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            copy = rt.session._kv[0][0].copy()
            copy_peak = tracemalloc.get_traced_memory()[1] - base
            del copy
        finally:
            tracemalloc.stop()
        assert copy_peak >= kv_bytes
        assert decode_peak < kv_bytes / 4, f"20 decode steps allocated {decode_peak} bytes"
        assert [[a.ctypes.data for a in bank] for bank in rt.session._kv] == addresses
        assert ours == {p for bank in rt.session._kv_ptrs for p in bank}
        assert rt.n_past == 199 + 23
    finally:
        rt.close()


def test_protocol_info_and_context_limit(onnx_dir) -> None:
    rt = _open(onnx_dir("llama"), n_ctx=8, threads=2)  # not TEST_THREADS: the option must win
    try:
        assert isinstance(rt.engine, Engine) and isinstance(rt.session, BackendSession)
        info = rt.info()
        assert info["backend"] == "onnxruntime" and info["device"] == "cpu"
        assert info["providers"] == [CPU] and info["threads"] == 2
        assert info["n_ctx"] == 8 and rt.session.n_batch == 8 and info["kv_precision"] == "f32"
        assert rt.cache.capacity_bytes == 2 * 2 * 2 * (2 * 8 * 16) * 4  # banks * layers * K,V
        assert info["model_file"].endswith("model.onnx") and info["external_data"] == []
        assert info["onnxruntime_version"] == ortrt.ort.__version__
        assert rt.n_vocab == rt.spec.vocab_size
        with pytest.raises(errors.ContextOverflowError):
            rt.forward(PROMPT_IDS)
        rt.forward(PROMPT_IDS[:7])
        with pytest.raises(errors.ContextOverflowError, match="7 tokens in the cache"):
            rt.forward(PROMPT_IDS[:2])
        assert rt.n_past == 7  # a refused forward leaves the cache as it was
        with pytest.raises(ValueError):
            rt.forward([])
        with pytest.raises(errors.InvalidInputError, match=r"outside the vocabulary \[0, 768\)"):
            rt.forward([rt.n_vocab])
    finally:
        rt.close()
    with pytest.raises(errors.InvalidInputError, match="closed"):
        rt.forward([1])
    assert rt.info()["providers"] == [] and rt.cache.held_bytes() == 0


def test_float16_model_reads_kv_type_from_graph(llama_f16: Path, tiny_model) -> None:
    rt = _open(llama_f16)
    try:
        assert rt.info()["kv_precision"] == "f16" and rt.session._kv[0][0].dtype == np.float16
        full = rt.forward(PROMPT_IDS, all_logits=True)
        assert full.dtype == np.float32
        ref = tiny_models.reference_logits(tiny_model("llama"), PROMPT_IDS)
        assert 1e-4 < _max_diff(full, ref) <= F16_TOL  # really float16, and close
        rt.reset()
        assert _max_diff(_step_logits(rt, PROMPT_IDS), full[3:]) <= F16_TOL
    finally:
        rt.close()


def test_external_data_loads_and_matches(llama_external: Path, onnx_dir) -> None:
    import onnx

    model = onnx.load(str(llama_external / "model.onnx"), load_external_data=False)
    expected = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = onnx.external_data_helper.ExternalDataInfo(t)
            expected.append((t.name, info.location, info.offset, info.length))
    found = [(r.tensor, r.location, r.offset, r.length)
             for r in ortrt.external_data_files(llama_external / "model.onnx")]
    assert found == expected and len(found) == len(model.graph.initializer)
    with edgellm.load(llama_external, backend="onnxruntime", threads=TEST_THREADS) as m:
        assert m.info()["external_data"] == [onnx_export.DATA_FILE]
        got = m.session()._backend.forward(PROMPT_IDS, all_logits=True)
    single = _open(onnx_dir("llama"))
    try:
        assert _max_diff(got, single.forward(PROMPT_IDS, all_logits=True)) <= 1e-6
    finally:
        single.close()


def test_external_data_scan_reads_attribute_tensors(onnx_dir, tmp_path: Path) -> None:
    """Constant-node tensors can be external too: the scan must see them (ORT reads them)."""
    import onnx

    model = onnx.load(str(onnx_dir("llama") / "model.onnx"))
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0, convert_attribute=True)
    reread = onnx.load(str(path), load_external_data=False)
    tensors = list(reread.graph.initializer)
    tensors += [a.t for n in reread.graph.node for a in n.attribute if a.HasField("t")]
    expected = sorted(t.name for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL)
    assert len(expected) > len(reread.graph.initializer)
    assert sorted(r.tensor for r in ortrt.external_data_files(path)) == expected


def test_external_data_scan_walks_every_message_that_can_hold_a_tensor() -> None:
    """The scan's field table against onnx.proto: each field whose message type can (at any
    depth) contain a TensorProto is walked, with the right type, and nothing else is."""
    import onnx

    messages, todo = {}, [onnx.ModelProto.DESCRIPTOR]  # every message type under ModelProto
    while todo:
        desc = todo.pop()
        if desc.name not in messages:
            messages[desc.name] = desc
            todo.extend(f.message_type for f in desc.fields if f.message_type is not None)
    holds = {"TensorProto"}  # message types that can contain a TensorProto: a fixpoint
    while True:
        more = {n for n, d in messages.items()
                if any(f.message_type is not None and f.message_type.name in holds for f in d.fields)}
        if more <= holds:
            break
        holds |= more

    pending, seen = ["ModelProto"], set()
    while pending:
        name = pending.pop()
        if name in seen or name == "TensorProto":
            continue
        seen.add(name)
        desc = getattr(onnx, name).DESCRIPTOR
        expected = {f.number: f.message_type.name for f in desc.fields
                    if f.message_type is not None and f.message_type.name in holds}
        assert ortrt._SUBMESSAGES[name] == expected, name
        pending.extend(expected.values())
    assert seen == set(ortrt._SUBMESSAGES)
    tensor = onnx.TensorProto.DESCRIPTOR
    assert (tensor.fields_by_number[8].name, tensor.fields_by_number[13].name) == ("name", "external_data")
    entry = onnx.StringStringEntryProto.DESCRIPTOR
    assert (entry.fields_by_number[1].name, entry.fields_by_number[2].name) == ("key", "value")


# --- through edgellm.load and the shared loop ---------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_load_generate_is_pytorch_greedy(arch: str, onnx_dir, tiny_model) -> None:
    with edgellm.load(onnx_dir(arch), backend="onnxruntime", threads=TEST_THREADS) as model:
        assert model.info()["backend"] == "onnxruntime" and model.info()["format"] == "onnx"
        result = model.generate(PROMPT_IDS[:6], max_tokens=6, temperature=0, ignore_eos=True)
    assert result.tokens == tiny_models.reference_greedy(tiny_model(arch), PROMPT_IDS[:6], 6)


def test_load_chat_and_stream(onnx_dir) -> None:
    with edgellm.load(onnx_dir("qwen3"), backend="onnxruntime", threads=TEST_THREADS) as model:
        reply = model.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
        assert 1 <= reply.completion_tokens <= 5 and isinstance(reply.text, str)
        again = model.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
        assert again.tokens == reply.tokens and again.timings.cached_tokens > 0  # trim reused
        pieces = list(model.stream("def greet(name):", max_tokens=4, temperature=0))
        assert "".join(pieces) == model.generate("def greet(name):", max_tokens=4,
                                                 temperature=0).text


def test_runtime_imports_no_torch_transformers_optimum_or_onnx(onnx_dir) -> None:
    code = (
        "import sys, edgellm\n"
        f"m = edgellm.load({str(onnx_dir('llama'))!r}, backend='onnxruntime', threads={TEST_THREADS})\n"
        "r = m.generate('def greet', max_tokens=3, temperature=0)\n"
        "assert r.completion_tokens >= 1\n"
    )
    loaded = top_modules_after(code)
    assert "onnxruntime" in loaded  # the backend really ran
    heavy = {"torch", "transformers", "optimum", "onnx"}
    assert not loaded & heavy, loaded & heavy


def test_registry_row() -> None:
    spec = get_backend("onnxruntime")
    assert spec.module == "edgellm.runtimes.onnxruntime" and spec.formats == ("onnx",)
    assert spec.devices == ("cpu", "gpu", "npu") and spec.extra == "onnx"
    assert spec.requires == "onnxruntime" and spec.why_not("onnx", "cpu") is None
    assert select_backend("onnx", "cpu").name == "onnxruntime"


def test_session_options() -> None:
    opts = ortrt.session_options(3)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ortrt.ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ortrt.ort.GraphOptimizationLevel.ORT_ENABLE_ALL


# --- execution providers (a pure function over faked provider lists) -----------------------
# Only the CPU provider exists on the test machines; the others are faked lists, never run.


@pytest.mark.parametrize(("device", "available", "expected"), [
    ("cpu", [CPU], [CPU]),
    ("cpu", ["CUDAExecutionProvider", CPU], [CPU]),
    ("gpu", ["CUDAExecutionProvider", CPU], ["CUDAExecutionProvider", CPU]),
    ("gpu", ["DmlExecutionProvider", "ROCMExecutionProvider", CPU], ["DmlExecutionProvider", CPU]),
    ("gpu", ["CoreMLExecutionProvider", CPU], ["CoreMLExecutionProvider", CPU]),
    ("npu", ["OpenVINOExecutionProvider", "QNNExecutionProvider", CPU], ["QNNExecutionProvider", CPU]),
    ("npu", ["VitisAIExecutionProvider", CPU], ["VitisAIExecutionProvider", CPU]),
    ("auto", ["AzureExecutionProvider", CPU], [CPU]),
    ("auto", ["QNNExecutionProvider", CPU], ["QNNExecutionProvider", CPU]),
    ("auto", ["QNNExecutionProvider", "CUDAExecutionProvider", CPU], ["CUDAExecutionProvider", CPU]),
])
def test_select_providers(device: str, available: list[str], expected: list[str]) -> None:
    assert ortrt.select_providers(device, available) == expected


@pytest.mark.parametrize("forced", [["DmlExecutionProvider", CPU], f"DmlExecutionProvider, {CPU}"])
def test_forced_providers_override_the_device(forced: object) -> None:
    available = [CPU, "DmlExecutionProvider", "CUDAExecutionProvider"]
    assert ortrt.select_providers("cpu", available, forced) == ["DmlExecutionProvider", CPU]


@pytest.mark.parametrize(("device", "forced", "hint"), [
    ("gpu", None, "pip install onnxruntime-gpu"),
    ("gpu", None, "onnxruntime-directml"),
    ("npu", None, "pip install onnxruntime-qnn"),
    ("npu", None, "onnxruntime-openvino"),
    ("cpu", "CUDAExecutionProvider", "pip install onnxruntime-gpu"),
    ("cpu", ["OpenVINOExecutionProvider"], "onnxruntime-openvino"),
    ("cpu", ["NoSuchExecutionProvider"], "onnxruntime.get_available_providers()"),
])
def test_unavailable_provider_says_what_is_seen_and_how_to_get_it(device, forced, hint) -> None:
    available = ["AzureExecutionProvider", CPU]
    with pytest.raises(errors.NoCompatibleRuntimeError) as exc:
        ortrt.select_providers(device, available, forced)
    msg = str(exc.value)
    assert "\n" not in msg and f"sees: AzureExecutionProvider, {CPU}" in msg and hint in msg
    assert "onnxruntime" in exc.value.reasons


def test_unknown_device_and_empty_provider_list() -> None:
    with pytest.raises(errors.UnknownDeviceError, match="use one of: cpu, gpu, npu, auto"):
        ortrt.select_providers("tpu", [CPU])
    with pytest.raises(errors.NoCompatibleRuntimeError, match="sees: none"):
        ortrt.select_providers("auto", [])


def test_runtime_refuses_a_provider_this_onnxruntime_lacks(onnx_dir) -> None:
    available = ortrt.ort.get_available_providers()
    absent = next(p for p in ortrt.PROVIDER_INSTALL if p not in available)
    with pytest.raises(errors.NoCompatibleRuntimeError, match=f"needs {absent}.*sees: "):
        _open(onnx_dir("llama"), extra={"providers": absent})
    if not any(p in available for p in GPU_PROVIDERS):  # the test machines: CPU only
        with pytest.raises(errors.NoCompatibleRuntimeError, match="pip install onnxruntime-gpu"):
            _open(onnx_dir("llama"), device="gpu")


# --- damaged or wrong files -> one-line edgellm errors ------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst, symlinks=True)
    return dst


def _assert_one_line(exc: BaseException, name: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and name in msg, msg
    assert "[ONNXRuntimeError]" not in msg and "Traceback" not in msg, msg
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__), \
        "a native error must not be chained into the traceback"


@pytest.fixture()
def no_session(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any attempt to open an ONNX Runtime session (which must not happen)."""
    calls: list[str] = []

    def refuse(path: str, *args: object, **kw: object) -> None:
        calls.append(path)
        raise AssertionError("ONNX Runtime was asked to open the model")

    monkeypatch.setattr(ortrt.ort, "InferenceSession", refuse)
    return calls


def test_missing_model_file_or_wrong_suffix(onnx_dir, tmp_path: Path) -> None:
    folder = _copy(onnx_dir("llama"), tmp_path)
    with pytest.raises(errors.ModelNotFoundError, match="does not exist"):
        ortrt.open(folder / "nope.onnx", RuntimeOptions())
    (folder / "model.onnx").unlink()
    with pytest.raises(errors.ModelNotFoundError) as exc:
        ortrt.open(folder / "model.onnx", RuntimeOptions())
    _assert_one_line(exc.value, "model.onnx")
    with pytest.raises(errors.InvalidModelError, match=r"\.onnx file"):
        ortrt.open(folder / "config.json", RuntimeOptions())


def test_missing_external_data(llama_external: Path, tmp_path: Path, no_session) -> None:
    folder = _copy(llama_external, tmp_path)
    (folder / onnx_export.DATA_FILE).unlink()
    with pytest.raises(errors.InvalidModelError, match="is missing; copy it beside model.onnx") as exc:
        _open(folder)
    _assert_one_line(exc.value, onnx_export.DATA_FILE)
    assert no_session == []


def test_truncated_external_data(llama_external: Path, tmp_path: Path, no_session) -> None:
    folder = _copy(llama_external, tmp_path)
    data = folder / onnx_export.DATA_FILE
    data.write_bytes(data.read_bytes()[: data.stat().st_size - 100])
    with pytest.raises(errors.InvalidModelError, match="truncated") as exc:
        _open(folder)
    _assert_one_line(exc.value, onnx_export.DATA_FILE)
    assert no_session == []


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused_before_ort(
        where: str, llama_external: Path, tmp_path: Path, no_session) -> None:
    folder = _copy(llama_external, tmp_path / "inside")
    outside = tmp_path / "outside.data"
    shutil.move(folder / onnx_export.DATA_FILE, outside)  # the bytes are there, readable
    if where == "parent":
        onnx_export.set_external_location(folder, "../outside.data")
    elif where == "absolute":
        onnx_export.set_external_location(folder, str(outside))
    else:
        os.symlink(outside, folder / onnx_export.DATA_FILE)
    with pytest.raises(errors.InvalidModelError, match="outside the model folder") as exc:
        _open(folder)
    _assert_one_line(exc.value, "model.onnx")
    assert no_session == []


@pytest.mark.parametrize("where", ["parent", "symlink"])
def test_onnxruntime_itself_refuses_escaping_data(where: str, llama_external: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With edgellm's own check switched off, ONNX Runtime (1.32 measured) refuses too, and
    its error arrives translated: edgellm's check is defence in depth for older versions."""
    folder = _copy(llama_external, tmp_path / "inside")
    outside = tmp_path / "outside.data"
    shutil.move(folder / onnx_export.DATA_FILE, outside)
    if where == "parent":
        onnx_export.set_external_location(folder, "../outside.data")
    else:
        os.symlink(outside, folder / onnx_export.DATA_FILE)
    monkeypatch.setattr(ortrt, "external_data_files", lambda path: [])
    with pytest.raises(errors.EdgeLLMError, match="escapes model directory") as exc:
        _open(folder)
    _assert_one_line(exc.value, "model.onnx")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_model_file(damage: str, onnx_dir, tmp_path: Path, no_session) -> None:
    folder = _copy(onnx_dir("llama"), tmp_path)
    model = folder / "model.onnx"
    body = model.read_bytes()
    model.write_bytes({"truncated": body[: len(body) // 2], "garbage": b"not an onnx model\n" * 50,
                       "empty": b""}[damage])
    with pytest.raises(errors.InvalidModelError, match="corrupt or truncated|empty") as exc:
        _open(folder)
    _assert_one_line(exc.value, "model.onnx")
    assert no_session == []


def test_invalid_graph_error_from_ort_is_translated(onnx_dir, tmp_path: Path) -> None:
    """A well-formed protobuf ONNX Runtime rejects: its error arrives as one edgellm line."""
    import onnx
    from onnx import TensorProto, helper

    folder = _copy(onnx_dir("llama"), tmp_path)
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["input_ids"], ["logits"])], "g", [x], [y])
    onnx.save_model(helper.make_model(graph), str(folder / "model.onnx"))
    with pytest.raises((errors.InvalidModelError, errors.BackendError)) as exc:
        _open(folder)
    _assert_one_line(exc.value, "model.onnx")
    assert "NoSuchOp" in str(exc.value)


def test_graph_without_kv_inputs(tiny_model, tmp_path: Path) -> None:
    folder = onnx_export.export_onnx(tiny_model("llama"), tmp_path / "nokv", task="text-generation")
    with pytest.raises(errors.InvalidModelError, match="text-generation-with-past") as exc:
        _open(folder)
    _assert_one_line(exc.value, "model.onnx")
    assert "no past_key_values inputs" in str(exc.value)


def test_graph_with_an_input_edgellm_does_not_feed(onnx_dir, tmp_path: Path) -> None:
    import onnx

    folder = _copy(onnx_dir("llama"), tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    for value in model.graph.input:
        if value.name == "position_ids":
            value.name = "cache_position"
    for node in model.graph.node:
        node.input[:] = ["cache_position" if i == "position_ids" else i for i in node.input]
    onnx.save_model(model, str(folder / "model.onnx"))
    with pytest.raises(errors.InvalidModelError, match="graph input 'cache_position' is not one") as exc:
        _open(folder)
    _assert_one_line(exc.value, "model.onnx")


@pytest.mark.parametrize("n_batch", [0, -3, "x", 1.5, True])
def test_bad_n_batch(n_batch: object, onnx_dir) -> None:
    with pytest.raises(errors.InvalidInputError, match="n_batch must be a positive integer"):
        _open(onnx_dir("llama"), extra={"n_batch": n_batch})


def test_every_onnxruntime_exception_is_mapped(tmp_path: Path) -> None:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    classes = [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 10
    for cls in classes:
        assert cls.__name__ in ortrt._ORT_ERRORS, f"{cls.__name__} is not translated"
        err = ortrt.translate_error(cls("[ONNXRuntimeError] : 1 : FAIL : line one\nline two"),
                                    tmp_path / "model.onnx", "to run the model")
        assert isinstance(err, (errors.InvalidModelError, errors.BackendError))
        assert str(err).startswith(f"{tmp_path / 'model.onnx'}: ONNX Runtime failed to run the model "
                                   "(line one line two); ")


# --- sessions and the KV cache (the checks every backend runs) ----------------------------


def _ort_loader(folder: Path):  # type: ignore[no-untyped-def]
    def load(**kw: object):  # type: ignore[no-untyped-def]
        return edgellm.load(folder, backend="onnxruntime", device="cpu", threads=TEST_THREADS, **kw)
    return load


def test_sessions_from_threads_match_alone(onnx_dir) -> None:
    session_checks.check_threads_match_alone(_ort_loader(onnx_dir("llama")))


def test_sliding_shifts(onnx_dir) -> None:
    assert session_checks.check_sliding(_ort_loader(onnx_dir("llama")))["shift"]  # keys re-rotated


def test_save_restore(onnx_dir, tmp_path: Path) -> None:
    session_checks.check_save_restore(_ort_loader(onnx_dir("llama")), tmp_path)


def test_trim_equals_recompute(onnx_dir) -> None:
    session_checks.check_trim_equals_recompute(_ort_loader(onnx_dir("llama")))


def test_kv_precision_must_match_the_graph(onnx_dir, llama_f16: Path) -> None:
    with pytest.raises(errors.InvalidInputError, match="KV cache is f32.*kv_precision 'f16'"):
        edgellm.load(onnx_dir("llama"), backend="onnxruntime", device="cpu", kv_precision="fp16")
    with edgellm.load(llama_f16, backend="onnxruntime", device="cpu", kv_precision="f16", n_ctx=32) as m:
        assert m.info()["kv_bytes_per_token"] == 2 * 2 * 2 * 2 * 16 * 2  # banks, K/V, layers, heads, dim, f16


def test_sliding_shift_matches_llamacpp(onnx_dir, tiny_model, tmp_path: Path) -> None:
    session_checks.check_shift_matches_llamacpp(_ort_loader(onnx_dir("llama")), tiny_model("llama"), tmp_path)


def test_huge_pages_option(onnx_dir) -> None:
    """Default on (the weights ONNX Runtime copied are collapsed, or the reason it could not be
    done is given); off on request; anything but a bool refused with the value and the fix."""
    folder = onnx_dir("llama")
    rt = _open(folder)
    try:
        from edgellm.runtimes import hugepages

        report = rt.info()["huge_pages"]
        unsupported = hugepages._unsupported()
        assert report["status"] == (f"skipped: {unsupported}" if unsupported else "collapsed")
        assert set(report) == {"status", "collapsed_mib", "ranges", "ms"}
    finally:
        rt.close()
    rt = _open(folder, extra={"huge_pages": False})
    try:
        assert rt.info()["huge_pages"] == {"status": "off (huge_pages=False)"}
    finally:
        rt.close()
    with pytest.raises(errors.InvalidInputError) as exc:
        _open(folder, extra={"huge_pages": "no"})
    _assert_one_line(exc.value, "model.onnx")
    assert "got 'no'" in str(exc.value) and "huge_pages=False" in str(exc.value)
