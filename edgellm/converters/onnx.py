"""Hugging Face checkpoint (or GGUF file) -> ONNX decoder with KV inputs, quantized by ORT.

The graph comes from optimum's ONNX exporter (task ``text-generation-with-past``: inputs
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key|value``,
outputs ``logits`` and ``present.{i}.key|value``). The model is loaded with *eager*
attention first: optimum's own loader picks SDPA, whose graph drops Gemma 2's
attention-logit soft-capping. Quantization uses ONNX Runtime's own tools, one row per type
in :data:`ONNX_QUANTS`:

* fp32: the export as is;
* fp16: ``onnxruntime.transformers.float16`` — weights, activations and KV in float16;
* int4 and int8: weight-only ``MatMulNBits`` (block 32/64/128, symmetric or not, and the
  ``accuracy_level`` of the kernel: 4 quantizes activations per block to int8, the fast CPU
  path). On SmolLM2-135M int8 keeps >= 90% top-1 agreement with transformers
  (tests/test_onnx_smollm2.py; 98% in a hand run). int4 also
  quantizes the lm_head and the embedding table (``GatherBlockQuantized``), which optimum
  leaves in float when they are tied;
* int8-dynamic: ``quantize_dynamic`` (MatMulInteger with int8 activations quantized *per
  tensor* at run time). In hand runs on SmolLM2 (the manifest's parity of
  ``edgellm convert ... --quant int8-dynamic`` shows it): 66% top-1 agreement — one
  activation outlier sets the scale for the whole tensor — and 0% with per-channel
  weights, which ONNX Runtime 1.32 gets wrong for MatMul; so per-tensor it is, for
  runtimes without MatMulNBits.

Weights go to an external-data file (``model.onnx.data``) when the graph would pass
protobuf's 2 GiB limit; the result is validated with ``onnx.checker`` (by path, so external
data is checked too) before parity is measured. Output is staged and renamed like every
converter's; the manifest records the recipe.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgellm.artifact import Artifact, Format
from edgellm.converters import ProgressFn
from edgellm.converters.provenance import tool_versions
from edgellm.converters.source import copy_runtime_files
from edgellm.converters.staging import Staging
from edgellm.errors import (
    ConversionError,
    InvalidInputError,
    MissingDependencyError,
    UnknownQuantizationError,
)

logger = logging.getLogger(__name__)

__all__ = ["BLOCK_SIZES", "EXPORTERS", "ONNX_QUANTS", "OnnxRecipe", "choose_exporter", "convert_to_onnx",
           "onnx_recipe"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TASK = "text-generation-with-past"
#: protobuf cannot serialize a message over 2 GiB: larger graphs keep weights outside.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
BLOCK_SIZES = (32, 64, 128)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: quantization -> what is done (recorded in the manifest as the recipe's "method").
ONNX_QUANTS: dict[str, str] = {
    "fp32": "export as is",
    "fp16": "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types=False)",
    "int8": "onnxruntime.quantization.MatMulNBitsQuantizer (weight-only MatMulNBits, 8 bits)",
    "int4": "onnxruntime.quantization.MatMulNBitsQuantizer (weight-only MatMulNBits, 4 bits)",
    "int8-dynamic": "onnxruntime.quantization.quantize_dynamic (MatMul weights QInt8 per tensor, "
                    "int8 activations per tensor)",
}
#: weight-only quantizations -> bits of MatMulNBits.
NBITS = {"int4": 4, "int8": 8}
#: operators quantized per bit width: GatherBlockQuantized (the embedding) is 4-bit only.
_NBITS_OPS = {4: ("MatMul", "Gather"), 8: ("MatMul",)}


@dataclass(frozen=True)
class OnnxRecipe:
    """What ONNX Runtime's quantizer is asked to do, recorded verbatim in the manifest."""

    quant: str
    method: str
    bits: int | None = None
    block_size: int | None = None
    sym: bool | None = None
    accuracy_level: int | None = None
    embeddings: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def onnx_recipe(quant: str, *, block_size: int | None = None, sym: bool | None = None,
                accuracy_level: int | None = None) -> OnnxRecipe:
    """The recipe for ``quant``; MatMulNBits options are refused for the other types."""
    q = quant.lower()
    if q not in ONNX_QUANTS:
        raise UnknownQuantizationError(
            f"unknown ONNX quantization {quant!r}; use one of: {', '.join(ONNX_QUANTS)}"
        )
    if q not in NBITS:
        given = [n for n, v in (("block_size", block_size), ("sym", sym),
                                ("accuracy_level", accuracy_level)) if v is not None]
        if given:
            raise InvalidInputError(f"{', '.join(given)} only apply to --quant int4 or int8, not {q}")
        return OnnxRecipe(q, ONNX_QUANTS[q])
    block = 32 if block_size is None else block_size
    if block not in BLOCK_SIZES:
        raise InvalidInputError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    level = 4 if accuracy_level is None else accuracy_level
    if level not in ACCURACY_LEVELS:
        raise InvalidInputError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    return OnnxRecipe(q, ONNX_QUANTS[q], NBITS[q], block, bool(sym), level,
                      "int4 lm_head and embedding" if NBITS[q] == 4 else "float embedding")


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(name.split(".")[0], "convert-onnx", "ONNX conversion") from None


def _export(hf_dir: Path, dest: Path) -> Path:
    """optimum's exporter on the eagerly-loaded model; returns the exported model.onnx."""
    torch = _import("torch")
    transformers = _import("transformers")
    exporter = _import("optimum.exporters.onnx")
    transformers.logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")  # torch.onnx TracerWarnings; the result is checked
            exporter.onnx_export_from_model(model.eval(), dest, task=TASK, do_validation=False)
    except Exception as exc:  # torch.onnx and optimum raise many types; one line for the user
        detail = " ".join(str(exc).split())[:300]
        raise ConversionError(f"ONNX export of {hf_dir} failed: {detail}") from None
    path = dest / MODEL_FILE
    if not path.is_file():
        raise ConversionError(f"ONNX export of {hf_dir} wrote no {MODEL_FILE}")
    return path


def _graph_bytes(model: Any) -> int:
    """Bytes of the weights held inside the graph (the nodes themselves are a few MB)."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def _save(model: Any, path: Path) -> list[str]:
    """Save ``model`` at ``path`` (weights outside past the protobuf limit); the files written."""
    onnx = _import("onnx")
    external = _graph_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        return [path.name, DATA_FILE]
    onnx.save_model(model, str(path))
    return [path.name]


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """ONNX Runtime's quantizers log every node at INFO and advice on the root logger.

    Importing ``matmul_nbits_quantizer`` even calls ``logging.basicConfig(level=INFO)``: the
    root handler it installs is removed again, so the host application's logging is intact.
    """
    root = logging.getLogger()
    loggers = [root, logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    handlers = list(root.handlers)
    try:
        _import("onnxruntime.quantization.matmul_nbits_quantizer")  # its basicConfig runs now
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _quantize(exported: Path, out: Path, recipe: OnnxRecipe) -> list[str]:
    """Write the ``recipe`` version of ``exported`` at ``out``; the files written."""
    with _quiet_logs():
        return _quantize_quietly(exported, out, recipe)


def _quantize_quietly(exported: Path, out: Path, recipe: OnnxRecipe) -> list[str]:
    onnx = _import("onnx")
    model = onnx.load(str(exported))
    if recipe.quant == "fp16":
        float16 = _import("onnxruntime.transformers.float16")
        model = float16.convert_float_to_float16(model, keep_io_types=False)
    elif recipe.quant == "int8-dynamic":
        quantization = _import("onnxruntime.quantization")
        tmp = out.with_name(".int8-" + out.name)
        quantization.quantize_dynamic(model, tmp, op_types_to_quantize=["MatMul"], per_channel=False,
                                      weight_type=quantization.QuantType.QInt8,
                                      use_external_data_format=_graph_bytes(model) > EXTERNAL_DATA_THRESHOLD,
                                      extra_options={"MatMulConstBOnly": True})
        model = onnx.load(str(tmp))
        for leftover in tmp.parent.glob(tmp.name + "*"):
            leftover.unlink()
    elif recipe.bits is not None:
        nbits = _import("onnxruntime.quantization.matmul_nbits_quantizer")
        if recipe.bits == 4:  # SmolLM2 by hand: 178 -> 104 MiB, 14.6 -> 13.1 ms/token,
            _untie_transposed_weights(model)  # top-1 0.731 -> 0.669; int8 gained nothing
        quantizer = nbits.MatMulNBitsQuantizer(model, bits=recipe.bits, block_size=recipe.block_size,
                                               is_symmetric=recipe.sym,
                                               accuracy_level=recipe.accuracy_level,
                                               op_types_to_quantize=_NBITS_OPS[recipe.bits],
                                               quant_axes=(("MatMul", 0), ("Gather", 1)))
        quantizer.process()
        model = quantizer.model.model
    return _save(model, out)


def _untie_transposed_weights(model: Any) -> int:
    """``MatMul(x, Transpose(W))`` -> ``MatMul(x, Wᵀ)`` with Wᵀ stored: the quantizer needs a constant.

    optimum stores a tied lm_head as a Transpose of the embedding table, which MatMulNBits
    cannot quantize: SmolLM2's int4 model kept a 113 MB float lm_head, read for every token.
    Stored transposed, the lm_head is quantized by MatMulNBits and the embedding by
    GatherBlockQuantized, and the float table goes away. Returns how many were rewritten.
    """
    import numpy as np

    numpy_helper = _import("onnx.numpy_helper")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    rewritten = []
    for node in graph.node:
        t = producer.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits or t in rewritten:
            continue
        weight = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        stored = np.ascontiguousarray(weight.transpose(perm) if perm else weight.T)
        graph.initializer.append(numpy_helper.from_array(stored, name=t.output[0]))
        rewritten.append(t)
    for t in rewritten:
        graph.node.remove(t)
    return len(rewritten)


def _check(path: Path) -> None:
    """``onnx.checker`` on the file (path form: external data and >2 GiB graphs included)."""
    onnx = _import("onnx")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConversionError(f"{path}: onnx.checker rejects the converted graph ({detail})") from None


#: The graph contract of an optimum export (the manifest's ``graph.contract``).
OPTIMUM_CONTRACT = "optimum-concat/1"


def _graph_record(path: Path, n_layers: int) -> dict[str, Any]:
    """What the exported graph takes and gives, for the manifest (the runtime binds by it)."""
    onnx = _import("onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    names = {i.name for i in graph.input}
    past = next(i for i in graph.input if i.name.startswith("past_key_values."))
    dtype = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).name
    inputs = {k: k for k in ("input_ids", "attention_mask", "position_ids") if k in names}
    return {
        "contract": OPTIMUM_CONTRACT, "inputs": inputs, "outputs": {"logits": "logits"},
        "kv": {"past_key": "past_key_values.%d.key", "past_value": "past_key_values.%d.value",
               "present_key": "present.%d.key", "present_value": "present.%d.value", "layout": "BNSH",
               "n_layers": n_layers, "dtype": dtype, "past_present_share_buffer": False},
        "logits": {"dtype": dtype, "positions": "every input position"},
    }


def _count_ops(path: Path) -> dict[str, int]:
    onnx = _import("onnx")
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    keys = ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "Cast")
    return {k: counts[k] for k in keys if k in counts}


#: ``exporter=`` names: edgellm's graph builder (the default where it covers the model) or optimum.
EXPORTERS = ("builder", "optimum")


def choose_exporter(exporter: str | None, spec: Any, quant: str, cfg: dict[str, Any] | None) -> str:
    """The exporter to use: the one asked for, else the builder where it covers the model."""
    from edgellm.converters.onnx_builder import builder_refusals

    if exporter is not None and exporter not in EXPORTERS:
        raise InvalidInputError(f"unknown ONNX exporter {exporter!r}; use one of: {', '.join(EXPORTERS)}")
    refused = builder_refusals(spec, quant, cfg)
    if exporter == "builder" and refused:
        raise InvalidInputError(f"--exporter builder cannot write this model: {'; '.join(refused)}")
    if exporter is None and refused:
        logger.info("ONNX builder not used (%s); exporting with optimum", "; ".join(refused))
    return exporter or ("optimum" if refused else "builder")


def convert_to_onnx(
    src: Path, output: Path, quant: str = "fp32", *, force: bool = False, allow_pickle: bool = False,
    verify: bool = True, reference: Path | None = None, prompts: list[str] | None = None,
    progress: ProgressFn | None = None, block_size: int | None = None, sym: bool | None = None,
    accuracy_level: int | None = None, exporter: str | None = None,
) -> Artifact:
    """Export a HF checkpoint folder or GGUF file to an ONNX decoder folder ``output``.

    ``exporter``: "builder" (edgellm's fused graph, no torch; the default wherever it covers
    the architecture and quantization) or "optimum" (the traced export below). A GGUF source
    is dequantized first; parity is then measured against that checkpoint unless
    ``reference`` names another one. ``block_size``, ``sym`` and ``accuracy_level`` tune
    int4/int8 MatMulNBits (defaults: 32, asymmetric, 4).
    """
    from edgellm.converters.onnx_builder import builder_refusals
    from edgellm.converters.source import open_source
    from edgellm.spec import read_hf_config

    source = open_source(src, allow_pickle=allow_pickle)
    recipe = onnx_recipe(quant, block_size=block_size, sym=sym, accuracy_level=accuracy_level)
    cfg = read_hf_config(source.path) if source.kind == "hf" else None
    chosen = choose_exporter(exporter, source.spec, recipe.quant, cfg)
    if chosen == "builder":
        from edgellm.converters.onnx_builder import convert_with_builder

        return convert_with_builder(source, output, recipe, force=force, verify=verify, reference=reference,
                                    prompts=prompts, progress=progress)
    started = time.perf_counter()
    with Staging(output, force=force) as stage:
        hf_dir = source.hf_dir(stage.path, progress)
        steps = ("export", recipe.quant, "check")
        if progress:
            progress(0, len(steps), "export fp32")
        export_dir = stage.path / ".export"
        exported = _export(hf_dir, export_dir)
        if progress:
            progress(1, len(steps), f"quantize {recipe.quant}")
        if recipe.quant == "fp32":
            files = [p.name for p in export_dir.iterdir() if p.name.startswith(MODEL_FILE)]
            for name in files:
                shutil.move(export_dir / name, stage.path / name)
        else:
            files = _quantize(exported, stage.path / MODEL_FILE, recipe)
        shutil.rmtree(export_dir, ignore_errors=True)
        if progress:
            progress(2, len(steps), "onnx.checker")
        model_path = stage.path / MODEL_FILE
        _check(model_path)
        copied = copy_runtime_files(hf_dir, stage.path, "ONNX Runtime")
        if progress:
            progress(3, len(steps), "done")
        parity = source.parity(model_path, reference, recipe.quant, prompts, verify, fmt="onnx")
        source.cleanup()
        manifest: dict[str, Any] = {
            "format": Format.ONNX.value,
            "files": {"model": MODEL_FILE, "weights": files[1:], "tokenizer": copied},
            "quantization": recipe.quant,
            "exporter": "optimum",
            "exporter_why": ("asked for" if exporter == "optimum" else
                             "; ".join(builder_refusals(source.spec, recipe.quant, cfg))),
            "recipe": recipe.to_dict(),
            "operators": _count_ops(model_path),
            "graph": _graph_record(model_path, source.spec.n_layers),
            **source.manifest_common(),
            "tool": tool_versions("onnxruntime", "onnx", "optimum-onnx", "torch", "transformers"),
            "parity": parity,
        }
        return stage.commit_artifact(manifest, started)
