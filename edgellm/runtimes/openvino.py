"""The OpenVINO backend: a *stateful* OpenVINO IR as exported by optimum-intel.

The IR (``openvino_model.xml`` + ``.bin``) takes ``input_ids``, ``attention_mask``,
``position_ids`` and ``beam_idx`` and returns ``logits``; the KV cache lives in the
model's variable states, so each inference appends to it. The folder beside the IR holds
``config.json`` (read into a :class:`~edgellm.spec.ModelSpec`) and the tokenizer files
(read by :class:`~edgellm.text.tokenizer.HFTokenizer`): at run time this module imports
only openvino, numpy and edgellm, never optimum, transformers or torch.

OpenVINO states cannot be cut at an arbitrary position, so :meth:`OpenVINORuntime.trim`
resets the state and re-feeds the kept token ids (recorded as they go in). Device choice
and compile properties are small pure functions over tables (:func:`select_device`,
:func:`build_properties`) so they can be tested against a faked device list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.artifact import MANIFEST_NAME, read_manifest
from edgellm.errors import (
    BackendError,
    ContextOverflowError,
    InvalidInputError,
    InvalidModelError,
    MissingDependencyError,
    ModelClosedError,
    ModelNotFoundError,
    NoCompatibleRuntimeError,
    SessionStateError,
)
from edgellm.kvcache import KV_PRECISIONS, KVAbility, KVCache
from edgellm.kvcache.arrays import pack_arrays, release_freed_memory, unpack_arrays
from edgellm.kvcache.rope import shift_frequencies, shift_positions
from edgellm.runtimes.base import RuntimeOptions, file_fingerprint
from edgellm.runtimes.native_log import captured_stderr
from edgellm.runtimes.ov_logits import LOGITS_FROM, slice_before_lm_head
from edgellm.spec import ModelSpec
from edgellm.text.tokenizer import HFTokenizer

try:
    import openvino as ov
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("openvino", "openvino", "the OpenVINO backend") from exc

logger = logging.getLogger(__name__)

__all__ = [
    "OV_DEVICES",
    "KV_CACHE_PRECISIONS",
    "NPU_DEFAULT_SHAPES",
    "OpenVINOEngine",
    "OpenVINOSession",
    "build_properties",
    "default_cache_dir",
    "model_fingerprint",
    "npu_shapes",
    "open",
    "select_device",
]

#: edgellm device name -> OpenVINO device name. AUTO is OpenVINO's virtual device.
OV_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "auto": "AUTO"}

#: kv_precision -> value of the KV_CACHE_PRECISION property
#: (``ov.properties.hint.kv_cache_precision()`` is the key "KV_CACHE_PRECISION" in 2026.x).
KV_CACHE_PRECISIONS = {"u8": "u8", "f16": "f16", "f32": "f32"}

#: options.extra["precision"] -> INFERENCE_PRECISION_HINT; None leaves the device default
#: (bf16 on CPUs with AMX/avx512_bf16, f16 on GPU, f32 elsewhere).
INFERENCE_PRECISIONS: dict[str | None, str | None] = {None: None, "f32": "f32", "f16": "f16",
                                                      "bf16": "bf16"}

#: Which compile properties each OpenVINO device accepts. A property a device does not
#: know makes compile_model fail, so each key is only sent where it is supported:
#: INFERENCE_NUM_THREADS is a CPU property; the NPU compiler chooses its own precisions;
#: AUTO forwards only hints it understands.
_DEVICE_KEYS: dict[str, frozenset[str]] = {
    "CPU": frozenset({"PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "KV_CACHE_PRECISION",
                      "INFERENCE_PRECISION_HINT", "CACHE_DIR", "ENABLE_CPU_PINNING"}),
    "GPU": frozenset({"PERFORMANCE_HINT", "KV_CACHE_PRECISION", "INFERENCE_PRECISION_HINT",
                      "CACHE_DIR"}),
    "NPU": frozenset({"PERFORMANCE_HINT", "CACHE_DIR", "NPU_USE_NPUW", "NPUW_LLM",
                      "NPUW_LLM_BATCH_DIM", "NPUW_LLM_SEQ_LEN_DIM", "NPUW_LLM_MAX_PROMPT_LEN",
                      "NPUW_LLM_MIN_RESPONSE_LEN"}),
    "AUTO": frozenset({"PERFORMANCE_HINT", "CACHE_DIR"}),
}

#: NPU static shapes when neither the load options nor the manifest give them: OpenVINO
#: GenAI's defaults for its NPU pipeline. The NPU plugin (NPUW LLM) rounds both up to 64.
NPU_DEFAULT_SHAPES = {"max_prompt_len": 1024, "min_response_len": 128}
NPU_ALIGN = 64


def npu_shapes(extra: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, int]:
    """The NPU's static prompt/response lengths: load options, else manifest, else defaults.

    Both are rounded up to a multiple of 64 as the NPU plugin does, so the limits edgellm
    enforces are the ones the compiled model has.
    """
    recorded = manifest.get("npu") or {}
    shapes = {}
    for key, default in NPU_DEFAULT_SHAPES.items():
        value = extra.get(key, recorded.get(key, default))
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{key} must be a positive integer, got {value!r}")
        shapes[key] = -(-value // NPU_ALIGN) * NPU_ALIGN
    return shapes


#: Inputs of a stateful causal-LM IR exported by optimum-intel (position_ids is optional:
#: some architectures compute positions inside the graph).
_REQUIRED_INPUTS = ("input_ids", "attention_mask", "beam_idx")


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``${EDGELLM_CACHE:-~/.cache/edgellm}/ov-cache``: where compiled blobs are cached."""
    env = os.environ if environ is None else environ
    root = env.get("EDGELLM_CACHE") or str(Path("~/.cache/edgellm").expanduser())
    return Path(root).expanduser() / "ov-cache"


def select_device(device: str, available: Sequence[str]) -> str:
    """The OpenVINO device for edgellm ``device``, checked against ``available``.

    ``available`` is ``Core().available_devices`` (e.g. ``["CPU", "GPU.0", "GPU.1"]``):
    "GPU" matches any ``GPU.n``. "auto" needs at least one device. A device OpenVINO does
    not see raises :class:`NoCompatibleRuntimeError` listing the devices it does see.
    """
    if device not in OV_DEVICES:
        raise InvalidInputError(f"unknown device {device!r}; use one of: {', '.join(OV_DEVICES)}")
    ov_device = OV_DEVICES[device]
    seen = ", ".join(available) or "none"
    if ov_device == "AUTO":
        if available:
            return ov_device
    elif any(d == ov_device or d.startswith(ov_device + ".") for d in available):
        return ov_device
    raise NoCompatibleRuntimeError(
        f"device {device!r} ({ov_device}) is not available to OpenVINO, which sees: {seen}; "
        f"pick one of those, or install the {ov_device} driver",
        {"openvino": f"{ov_device} not in available devices ({seen})"},
    )


def build_properties(ov_device: str, threads: int, extra: Mapping[str, Any],
                     cache_dir: Path | None, npu: Mapping[str, int] | None = None,
                     kv_precision: str | None = None, shared: bool = False) -> dict[str, str]:
    """Compile properties for ``ov_device``: the wanted ones, filtered by what it accepts.

    PERFORMANCE_HINT is LATENCY (one stream of one request: a chat session), the thread
    count is explicit, the KV cache precision defaults to f16, INFERENCE_PRECISION_HINT
    is only set when ``extra["precision"]`` asks, and CACHE_DIR makes a second load fast.
    ``shared`` (an automatic thread count: the CPU may be busy with other work) turns CPU
    pinning off, so the plugin's threads can move to whichever core is free.
    On NPU the stateful model runs through the plugin's LLM pipeline (NPUW) with the
    static shapes ``npu`` (:func:`npu_shapes`); the KV tensors are [batch, heads, seq, dim].
    """
    kv = str(kv_precision or "f16").lower()
    if kv not in KV_CACHE_PRECISIONS:
        raise InvalidInputError(
            f"unknown kv_precision {kv!r}; use one of: {', '.join(KV_CACHE_PRECISIONS)}"
        )
    precision = extra.get("precision")
    precision = None if precision is None else str(precision).lower()
    if precision not in INFERENCE_PRECISIONS:
        names = ", ".join(k for k in INFERENCE_PRECISIONS if k)
        raise InvalidInputError(f"unknown precision {precision!r}; use one of: {names}")
    wanted: dict[str, str | None] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": str(int(threads)),
        "KV_CACHE_PRECISION": KV_CACHE_PRECISIONS[kv],
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
        "CACHE_DIR": str(cache_dir) if cache_dir is not None else None,
        "ENABLE_CPU_PINNING": "NO" if shared else None,
    }
    if npu is not None:
        wanted.update({
            "NPU_USE_NPUW": "YES", "NPUW_LLM": "YES", "NPUW_LLM_BATCH_DIM": "0",
            "NPUW_LLM_SEQ_LEN_DIM": "2",
            "NPUW_LLM_MAX_PROMPT_LEN": str(npu["max_prompt_len"]),
            "NPUW_LLM_MIN_RESPONSE_LEN": str(npu["min_response_len"]),
        })
    keys = _DEVICE_KEYS.get(ov_device.split(".")[0], _DEVICE_KEYS["AUTO"])
    return {k: v for k, v in wanted.items() if v is not None and k in keys}



def _one_line(exc: BaseException) -> str:
    """The first meaningful line of a native error (OpenVINO messages span many lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Exception from" not in ln and not ln.startswith("Check "):
            return ln[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def model_fingerprint(xml: Path) -> str:
    """Names the compiled-model cache of one IR: sizes and mtimes of its .xml and .bin.

    OpenVINO keys a compile-from-path cache entry by the file's path, so a model re-converted
    at the same path would load the old blob; a folder per fingerprint prevents that.
    """
    import hashlib

    stats = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
             for p in (xml, xml.with_suffix(".bin"))]
    return hashlib.sha256("|".join(stats).encode()).hexdigest()[:16]


def _manifest_of(folder: Path) -> dict[str, Any]:
    """The folder's edgellm.json, or {} for an IR exported by other tools."""
    return read_manifest(folder) if (folder / MANIFEST_NAME).is_file() else {}


class OpenVINOEngine:
    """A stateful OpenVINO IR compiled once; each session is an infer request (an ``Engine``).

    The variable states of one infer request are one conversation's KV cache; every request
    made from the compiled model shares its weights, so a session costs its KV states and
    the request's own buffers.
    """

    backend = "openvino"

    def __init__(self, path: Path, options: RuntimeOptions, core: Any = None) -> None:
        self.path = Path(path)
        self._check_files(self.path)
        folder = self.path.parent
        self.spec = ModelSpec.from_hf_dir(folder)
        self.rope_omega = shift_frequencies(self.spec)  # None: sliding re-prefills
        self.kv_precision = options.kv_precision or "f16"
        # the tokenizer parses while OpenVINO compiles (both release the GIL): half a cached load
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer = pool.submit(HFTokenizer.from_dir, folder)
            self._open_compiled(options, core, folder)
            self.tokenizer = tokenizer.result()
        self.n_vocab = self._vocab_size()
        self._fingerprint: str | None = None

    def _open_compiled(self, options: RuntimeOptions, core: Any, folder: Path) -> None:
        self._core = core if core is not None else ov.Core()
        self.device = options.device
        self.ov_device = select_device(options.device, self._core.available_devices)
        self.thread_choice = options.thread_choice()
        self.threads = self.thread_choice.count
        self.npu: dict[str, int] | None = None
        self.sliced_logits = False  # set by _compile: logits only for the rows read
        if self.ov_device == "NPU":
            self.npu = npu_shapes(options.extra, _manifest_of(folder))
            self.default_ctx = self._npu_context(options)
            self.max_ctx = self.npu["max_prompt_len"] + self.npu["min_response_len"]
        else:
            self.default_ctx = options.context_for(self.spec)
            self.max_ctx = self.spec.max_positions
        cache = options.extra.get("cache_dir")
        self.cache_dir = Path(cache).expanduser() if cache else default_cache_dir()
        self.properties = build_properties(self.ov_device, self.threads, options.extra,
                                           self.cache_dir / model_fingerprint(self.path), self.npu,
                                           self.kv_precision, shared=self.thread_choice.auto)
        self._compiled = self._compile()
        probe = self._compiled.create_infer_request()
        self._inputs = {n for i in self._compiled.inputs for n in i.get_names()}
        # NPUW turns the model stateless inside the plugin: its states are not queryable
        self._check_stateful(self._inputs, self.npu is not None or bool(probe.query_state()))
        self._spare: Any = probe  # the first session takes this request

    # -- loading --------------------------------------------------------------------------

    def _npu_context(self, options: RuntimeOptions) -> int:
        """On NPU the KV cache is static: max_prompt_len + min_response_len positions."""
        assert self.npu is not None
        size = self.npu["max_prompt_len"] + self.npu["min_response_len"]
        if options.n_ctx is not None and options.n_ctx > size:
            raise InvalidInputError(
                f"{self.path}: n_ctx {options.n_ctx} > the NPU's static KV size {size} "
                f"(max_prompt_len {self.npu['max_prompt_len']} + min_response_len "
                f"{self.npu['min_response_len']}); raise max_prompt_len or min_response_len"
            )
        return options.n_ctx or size

    @staticmethod
    def _check_files(path: Path) -> None:
        if not path.is_file():
            raise ModelNotFoundError(f"OpenVINO model file {str(path)!r} does not exist")
        if path.suffix.lower() != ".xml":
            raise InvalidModelError(f"{path}: an OpenVINO IR is an .xml file (with a .bin beside it)")
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise InvalidModelError(
                f"{path}: its weights file {weights.name} is missing; copy it beside the .xml "
                "or re-convert the model"
            )

    def _compile(self) -> Any:
        """Compile the IR, with logits computed only for the positions read (:mod:`.ov_logits`).

        The NPU pipeline keeps its static shapes and compiles from the file path, so a
        cached blob loads without reading the IR; when that fails, the IR is read to tell a
        damaged file (:class:`InvalidModelError` naming it) from a device that cannot
        compile it (:class:`BackendError`).
        """
        if self.npu is not None:
            try:
                with captured_stderr(logger, f"OpenVINO compile {self.path.name}"):
                    return self._core.compile_model(str(self.path), self.ov_device, self.properties)
            except (RuntimeError, ValueError, TypeError):
                pass
        model = self._read_model()
        self.sliced_logits = self.npu is None and slice_before_lm_head(model)
        try:
            return self._core.compile_model(model, self.ov_device, self.properties)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise BackendError(
                f"{self.path}: OpenVINO could not compile the model for {self.ov_device} "
                f"({_one_line(exc)}); try another device or kv_cache_precision"
            ) from None

    def _read_model(self) -> Any:
        """Read the IR; a truncated or mismatched .bin is an InvalidModelError naming it."""
        try:
            with captured_stderr(logger, f"OpenVINO read {self.path.name}"):
                model = self._core.read_model(str(self.path), str(self.path.with_suffix(".bin")))
        except (RuntimeError, ValueError, OSError) as exc:
            raise InvalidModelError(
                f"{self.path}: OpenVINO could not read the model ({_one_line(exc)}); the .xml or "
                ".bin is corrupt, truncated or from another export: re-convert the model"
            ) from None
        self._check_stateful({n for i in model.inputs for n in i.get_names()}, bool(model.get_sinks()))
        return model

    def _check_stateful(self, names: set[str], has_state: bool) -> None:
        missing = [n for n in _REQUIRED_INPUTS if n not in names]
        if missing or not has_state:
            what = f"inputs {', '.join(missing)} missing" if missing else "no variable states"
            raise InvalidModelError(
                f"{self.path}: not a stateful causal-LM IR ({what}); export it with "
                "optimum-intel (OVModelForCausalLM, stateful=True)"
            )

    def _vocab_size(self) -> int:
        shape = self._compiled.output("logits").get_partial_shape()
        last = shape[shape.rank.get_length() - 1]
        return int(last.get_length()) if last.is_static else int(self.spec.vocab_size)

    # -- sessions ---------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer at :attr:`kv_precision`; u8 adds its scale and zero point."""
        bpt = self.spec.kv_bytes_per_token(KV_PRECISIONS[self.kv_precision])
        if self.kv_precision == "u8":  # a float32 scale and zero point per token, head and K/V
            bpt += 2 * self.spec.n_layers * self.spec.n_kv_heads * 8
        return bpt

    def open_session(self, n_ctx: int) -> OpenVINOSession:
        """A session of ``n_ctx`` tokens: a new infer request of the compiled model."""
        if self._compiled is None:
            raise ModelClosedError(f"{self.path}: this model is closed; load it again")
        if self.npu is not None and n_ctx > self.max_ctx:
            raise InvalidInputError(
                f"{self.path}: a session of {n_ctx} tokens > the NPU's static KV size {self.max_ctx}; "
                "raise max_prompt_len or min_response_len"
            )
        request, self._spare = self._spare, None
        return OpenVINOSession(self, request or self._compiled.create_infer_request(), n_ctx)

    def memory(self) -> dict[str, int | None]:
        """The .bin file's bytes (OpenVINO keeps them resident); compute is not reported by OpenVINO."""
        if self._compiled is None:
            return {"weights": 0, "compute": 0}
        return {"weights": self.path.with_suffix(".bin").stat().st_size, "compute": None}

    def fingerprint(self) -> str:
        """Names the weights: sizes and samples of the .xml and .bin."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.path, self.path.with_suffix(".bin"))
        return self._fingerprint

    def info(self) -> dict[str, Any]:
        """What runs where: backend, device, threads, context, precisions, cache."""
        try:
            executing = list(self._compiled.get_property("EXECUTION_DEVICES"))
        except RuntimeError:  # pragma: no cover - every 2024+ device answers this
            executing = [self.ov_device]
        return {
            "backend": self.backend,
            "device": self.device,
            "ov_device": self.ov_device,
            "execution_devices": executing,
            "threads": self.threads,
            "threads_reason": self.thread_choice.reason,
            "n_ctx": self.default_ctx,
            "kv_precision": self.properties.get("KV_CACHE_PRECISION", "device default"),
            "inference_precision": self.properties.get("INFERENCE_PRECISION_HINT", "device default"),
            "cache_dir": str(self.cache_dir),
            "npu_static_shapes": self.npu,
            "model_file": str(self.path),
            "openvino_version": ov.get_version(),
        }

    def close(self) -> None:
        """Release the compiled model (sessions still open fail with a clear error)."""
        self._spare = None
        self._compiled = None


class OpenVINOSession:
    """One conversation: an infer request whose variable states are its KV cache.

    Trimming cuts the state tensors along their sequence axis (``[batch, kv_heads, seq,
    head_dim]`` in optimum-intel's stateful export) and sets them back; on an NPU, whose
    states are not exposed, it resets and re-feeds the kept ids. A snapshot is the state
    tensors as numpy arrays.
    """

    def __init__(self, engine: OpenVINOEngine, request: Any, n_ctx: int) -> None:
        self._engine = engine
        self._request = request
        self.n_ctx = n_ctx
        self._ids: list[int] = []  # token ids currently in the state (an NPU trim re-feeds them)
        abilities = frozenset({KVAbility.TRIM, KVAbility.SNAPSHOT})
        if engine.npu is not None:
            abilities = frozenset({KVAbility.TRIM})
        elif engine.rope_omega is not None:
            abilities = frozenset(KVAbility)
        self.cache = KVCache(n_ctx, engine.kv_bytes_per_token(), engine.kv_precision, abilities,
                             self._held_bytes, lambda: len(self._ids))

    def _held_bytes(self) -> int:
        """The state tensors' elements, at the precision the plugin stores them in.

        OpenVINO hands states out converted to their declared type (float32, measured with a
        u8 and an f16 cache alike), so their ``nbytes`` would overstate an f16 cache twice; the
        element count comes from the states, the bytes per element from ``KV_CACHE_PRECISION``
        (u8 adds a scale and a zero point per head_dim values).
        """
        if self._request is None or self._engine.npu is not None:
            return 0
        elements = sum(int(np.prod(st.state.shape)) for st in self._request.query_state())
        kv = self._engine.kv_precision
        per = KV_PRECISIONS[kv] + (8 / self._engine.spec.head_dim if kv == "u8" else 0.0)
        return int(elements * per)

    @property
    def n_past(self) -> int:
        """Number of positions currently held in the KV state."""
        return len(self._ids)

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the state; logits of the last token (or of every token)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        if self._request is None or self._engine._compiled is None:
            raise ModelClosedError(f"{self._engine.path}: this session is closed; open another")
        past = len(self._ids)
        if past + n > self.n_ctx:
            raise ContextOverflowError(
                f"{past} tokens in the cache + {n} new > its {self.n_ctx} tokens; "
                "open the session with a larger n_ctx"
            )
        if self._engine.npu is not None:
            self._check_npu_prompt(past, n)
            if past and n > 1:  # the NPU pipeline prefills once: re-prefill the whole history
                history = [*self._ids, *map(int, tokens)]
                self.reset()
                out = self.forward(history, all_logits)
                return out[-n:] if all_logits else out
        ids = np.asarray([list(map(int, tokens))], dtype=np.int64)
        feed = {"input_ids": ids,
                "attention_mask": np.ones((1, past + n), dtype=np.int64),
                "beam_idx": np.zeros((1,), dtype=np.int32)}
        if "position_ids" in self._engine._inputs:
            feed["position_ids"] = np.arange(past, past + n, dtype=np.int64)[None, :]
        if self._engine.sliced_logits:  # every row for all_logits, else the last one only
            feed[LOGITS_FROM] = np.array([0 if all_logits else n - 1], dtype=np.int64)
        try:
            self._request.infer(feed)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise BackendError(f"{self._engine.path}: OpenVINO inference failed ({_one_line(exc)})") from None
        self._ids.extend(int(t) for t in ids[0])
        logits = self._request.get_tensor("logits").data[0]
        rows = logits if all_logits else logits[-1]
        return np.array(rows, dtype=np.float32, copy=True)

    def _check_npu_prompt(self, past: int, n: int) -> None:
        npu = self._engine.npu
        assert npu is not None
        limit = npu["max_prompt_len"]
        if n > 1 and past + n > limit:
            raise ContextOverflowError(
                f"{self._engine.path}: a prompt of {past + n} tokens exceeds the NPU's static prompt "
                f"shape of {limit} tokens; shorten the prompt, or load with "
                f"max_prompt_len={-(-(past + n) // NPU_ALIGN) * NPU_ALIGN} (or convert with "
                "--max-prompt-len) at the cost of NPU memory and compile time"
            )

    def trim(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions: cut the state tensors (NPU: reset and re-feed)."""
        n_keep = max(0, int(n_keep))
        if n_keep >= len(self._ids):
            return
        if n_keep == 0:
            self.reset()
            return
        if self._engine.npu is not None:
            kept = self._ids[:n_keep]
            self.reset()
            self.forward(kept, all_logits=False)
            return
        past = len(self._ids)
        for st in self._request.query_state():
            data = st.state.data
            axis = _seq_axis(data.shape, past)
            st.state = ov.Tensor(np.ascontiguousarray(np.take(data, range(n_keep), axis=axis)))
        del self._ids[n_keep:]
        release_freed_memory()

    def shift(self, start: int, n_discard: int) -> None:
        """Drop positions ``[start, start + n_discard)`` from every state, later keys re-rotated
        to their new positions (:mod:`edgellm.kvcache.rope`), one state tensor at a time."""
        omega = self._engine.rope_omega
        if omega is None or self._engine.npu is not None:
            raise BackendError(f"{self._engine.path}: this model's KV cache cannot be shifted; re-prefill")
        past = len(self._ids)
        for st in self._request.query_state():
            data = st.state.data
            moved = shift_positions(data, _seq_axis(data.shape, past), start, n_discard, past,
                                    ".key" in st.name, omega)
            st.state = ov.Tensor(np.ascontiguousarray(moved))
        del self._ids[start:start + n_discard]
        release_freed_memory()  # the state copies would otherwise stay in the heap

    def save_state(self) -> bytes:
        """The state tensors, each as a raw array (names, shapes and types in a small header)."""
        return pack_arrays([(st.name, st.state.data) for st in self._request.query_state()])

    def load_state(self, data: bytes, n_tokens: int) -> None:
        """Put back what :meth:`save_state` gave; the ids are the restored tokens' (set by the loop)."""
        arrays = dict(unpack_arrays(data, str(self._engine.path)))
        states = self._request.query_state()
        if {st.name for st in states} != set(arrays):
            raise SessionStateError(f"{self._engine.path}: the saved states do not match this model's")
        for st in states:
            st.state = ov.Tensor(np.ascontiguousarray(arrays[st.name]))
        self._ids = [0] * n_tokens  # positions only; the loop records which ids they are

    def reset(self) -> None:
        """Empty the KV state."""
        self._request.reset_state()
        self._ids = []

    def close(self) -> None:
        """Release the infer request and its states."""
        self._request = None


def _seq_axis(shape: Sequence[int], past: int) -> int:
    """The sequence axis of a KV state tensor: 2 in optimum-intel's layout, else the one sized ``past``."""
    if len(shape) == 4 and shape[2] == past:
        return 2
    axes = [i for i, d in enumerate(shape) if d == past]
    if not axes:
        raise BackendError(f"a KV state of shape {tuple(shape)} has no axis of {past} positions")
    return axes[-1]


def open(path: Path, options: RuntimeOptions) -> OpenVINOEngine:  # noqa: A001 - registry hook
    """Open a stateful OpenVINO IR (.xml) with OpenVINO (the registry's entry point)."""
    return OpenVINOEngine(path, options)
