"""A backend registered through the ``edgellm.backends`` entry point is planned like a built-in.

The plugin here reads GGUF on the CPU; its whole row (what it reads and drives, its memory
model, its device probe, its ``open``) is one :class:`BackendSpec`. With a host budget too
small for llama.cpp's predicted peak, ``load(device="auto")`` must choose the plugin, and
``edgellm devices detect`` must list it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import pytest

import edgellm
from edgellm.devices import planner
from edgellm.devices.memory import BackendModel, MiB
from edgellm.errors import NoCompatibleRuntimeError
from edgellm.runtimes import base
from edgellm.runtimes.fake import FakeEngine
from tests.fixtures.tiny_gguf import build_tiny_gguf

#: A runtime that holds only its weight file: no libraries, buffers or tokenizer tables.
LEAN = BackendModel("leanrt", 0, 0, 0, 1, ("f16",), False,
                    lambda spec, quant, file_bytes: file_bytes, lambda spec, n_ctx, quant: 0)


def open(path: Path, options: base.RuntimeOptions) -> FakeEngine:  # noqa: A001 - the plugin's open()
    """The plugin module's entry point: any file, a scripted engine."""
    return FakeEngine("lean reply", kv_precision=options.kv_precision or "f16")


class _EntryPoint:
    name = "leanrt"

    def __init__(self, spec: base.BackendSpec) -> None:
        self.spec = spec

    def load(self) -> base.BackendSpec:
        return self.spec


@pytest.fixture()
def plugin(monkeypatch: pytest.MonkeyPatch) -> base.BackendSpec:
    """The plugin, registered through a (faked) entry point; the registry is restored afterwards."""
    spec = base.BackendSpec(name="leanrt", module="tests.test_plugin_backend", formats=("gguf",),
                            devices=("cpu",), requires=None, extra="leanrt", memory=LEAN,
                            probe=lambda: ("cpu", "gpu"))  # a GPU it does not drive is ignored
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [_EntryPoint(spec)] if group == "edgellm.backends" else [])
    return spec


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return build_tiny_gguf(tmp_path / "tiny.gguf")


def _budget(monkeypatch: pytest.MonkeyPatch, budget_bytes: int) -> None:
    monkeypatch.setattr(planner, "host_budget", lambda total, available: budget_bytes)


def test_detect_and_host_profile_list_the_plugin_after_the_built_ins(plugin: Any) -> None:
    from edgellm.devices import detect

    pairs = planner.host_profile(["gguf"]).backends
    assert pairs[-1] == ("leanrt", "cpu") and ("leanrt", "gpu") not in pairs
    assert ("leanrt", "cpu") in detect().backends
    assert ("leanrt", "cpu") not in planner.host_profile(["openvino"]).backends


def test_load_auto_chooses_the_plugin_when_only_it_fits(plugin: Any, tiny: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _budget(monkeypatch, 40 * MiB)  # above the bare process (31.5 MiB), below llama.cpp's need
    chosen = planner.plan(tiny, planner.host_profile(["gguf"])).choice
    assert chosen is not None and chosen.backend == "leanrt"
    rejected = [c for c in planner.plan(tiny, planner.host_profile(["gguf"])).candidates
                if c.backend == "llamacpp"]
    assert rejected and all(c.status != "chosen" for c in rejected)
    with edgellm.load(tiny) as model:
        assert isinstance(model.engine, FakeEngine)  # the plugin's open() ran
        assert model.generate("hi", max_tokens=64, temperature=0).text == "lean reply"


def test_the_built_in_is_preferred_when_both_fit(plugin: Any, tiny: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _budget(monkeypatch, 4096 * MiB)
    chosen = planner.plan(tiny, planner.host_profile(["gguf"])).choice
    assert chosen is not None and chosen.backend == "llamacpp"


def test_a_plugin_without_a_memory_model_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                                   tiny: Path) -> None:
    spec = base.BackendSpec(name="leanrt", module="tests.test_plugin_backend", formats=("gguf",),
                            devices=("cpu",), requires=None, extra="leanrt")
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [_EntryPoint(spec)] if group == "edgellm.backends" else [])
    _budget(monkeypatch, 40 * MiB)
    with pytest.raises(NoCompatibleRuntimeError) as caught:
        planner.plan(tiny, planner.host_profile(["gguf"]))
    lean = [c for c in caught.value.plan.candidates if c.backend == "leanrt"]
    assert [c.status for c in lean] == ["rejected"]
    assert "no memory model for backend 'leanrt'" in lean[0].reason
