"""edgellm's own ONNX exporter: the decoder graph written from the weights, no torch, no optimum.

The default ONNX exporter wherever it covers the architecture and the quantization
(:func:`builder_refusals` says why not, and ``convert_to_onnx`` then uses optimum unless
``exporter="builder"`` was asked for explicitly). The graph
(:mod:`~edgellm.converters.onnx_decoder`) uses ONNX Runtime's fused operators —
GroupQueryAttention with rotary inside and one shared KV buffer, skip-RMSNorms, fused QKV and
gate/up projections, ``MatMulNBits`` for int4/int8 and ``GatherBlockQuantized`` for an int4
embedding — so decoding reads each weight once and copies no KV.

Tensors stream from the safetensors checkpoint one at a time straight into
``model.onnx.data`` (:class:`~edgellm.converters.onnx_graph.GraphWriter`); int4/int8 blocks
are computed by :mod:`~edgellm.converters.onnx_quant` in numpy. A GGUF source is read the
same way, tensor by tensor, through :class:`~edgellm.converters.gguf_tensors.GGUFTensors`
(gguf-py dequantizes; no float checkpoint is written), with config and tokenizer files built
from its metadata. Neither imports torch (tests/test_onnx_builder.py checks both in a fresh
process); only parity does, where transformers is installed — without it a GGUF source is
compared with llama.cpp running the GGUF (the manifest's ``parity.reference_by``).

The folder also carries ``genai_config.json`` so onnxruntime-genai can run it; the manifest
records the graph contract the runtime binds by (``graph``), the builder's per-feature
choices (``builder``) and the recipe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgellm.artifact import Artifact, Format, write_manifest
from edgellm.converters import ProgressFn
from edgellm.converters.onnx_arch import BUILDER_ARCHS, refusals
from edgellm.converters.provenance import tool_versions
from edgellm.converters.source import copy_runtime_files
from edgellm.converters.staging import Staging
from edgellm.errors import ConversionError, MissingDependencyError, UnsupportedArchitectureError
from edgellm.spec import ModelSpec, read_hf_config

logger = logging.getLogger(__name__)

__all__ = ["BUILDER_QUANTS", "builder_refusals", "convert_with_builder"]

MODEL_FILE = "model.onnx"
#: quantizations the builder writes -> what it does (the manifest's recipe "method").
BUILDER_QUANTS: dict[str, str] = {
    "fp32": "edgellm graph builder, float32 weights",
    "int4": "edgellm graph builder, MatMulNBits 4-bit (numpy block quantizer, clipping search)",
    "int8": "edgellm graph builder, MatMulNBits 8-bit (numpy block quantizer)",
}


def builder_refusals(spec: ModelSpec, quant: str, cfg: dict[str, Any] | None = None) -> list[str]:
    """Why the builder cannot write this model at ``quant`` (empty: it can)."""
    out = []
    if quant not in BUILDER_QUANTS:
        out.append(f"quantization {quant!r} is not one the builder writes ({', '.join(BUILDER_QUANTS)}); "
                   "use --exporter optimum")
    if spec.architecture not in BUILDER_ARCHS:
        out.append(f"architecture {spec.architecture!r} has no builder row; use --exporter optimum")
    elif cfg is not None:
        out.extend(refusals(cfg, spec))
    return out


def _options(recipe: Any, spec: ModelSpec) -> Any:
    """Build options for ``recipe``. Asymmetric int4 searches each block's clipping range:
    on SmolLM2 (tests/test_onnx_smollm2.py, hand run) top-1 0.669 -> 0.719 and KL 0.356 ->
    0.320 for 13 s of conversion instead of 3; symmetric blocks gained nothing (KL got worse)
    and int8 has little to gain, so they round to nearest."""
    from edgellm.converters.onnx_decoder import BuildOptions
    from edgellm.converters.onnx_quant import CLIP_GRID

    if recipe.bits is None:
        return BuildOptions()
    embed = recipe.bits == 4 and spec.hidden_size % recipe.block_size == 0
    grid = CLIP_GRID if recipe.bits == 4 and not recipe.sym else (1.0,)
    return BuildOptions(recipe.bits, recipe.block_size, bool(recipe.sym), recipe.accuracy_level, embed, grid)


def _check_shapes(ckpt: Any, spec: ModelSpec) -> None:
    """Every tensor the builder reads has the shape config.json implies (headers only)."""
    from edgellm.converters.onnx_arch import expected_shape

    for name, info in ckpt.items():
        want = expected_shape(spec, name)
        if want is not None and tuple(info.shape) != want:
            raise ConversionError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)} but config.json implies "
                f"{list(want)} for a {spec.architecture} model; the checkpoint does not match its "
                "config.json")


def _write_graph(source: Any, stage: Path, cfg: dict[str, Any], spec: ModelSpec,
                 opts: Any) -> tuple[Any, dict[str, int]]:
    from edgellm.converters.onnx_decoder import OPSETS, DecoderBuilder, Reader
    from edgellm.converters.onnx_graph import GraphWriter

    ckpt = source.tensors()  # safetensors, or the GGUF file dequantized tensor by tensor
    _check_shapes(ckpt, spec)
    largest_read = max(info.numel * 4 for _, info in ckpt.items())  # read as float32
    writer = GraphWriter(stage, OPSETS)
    try:
        builder = DecoderBuilder(writer, Reader(ckpt), cfg, spec, opts)
        builder.build()
        writer.save(stage / MODEL_FILE, f"{spec.architecture}-decoder", "edgellm")
    except KeyError as exc:
        raise ConversionError(f"{source.path}: tensor {exc.args[0]!r} is missing for a {spec.architecture} "
                              "model; the checkpoint does not match its config.json") from None
    finally:
        writer.abort()
        ckpt.close()
    return builder, {"largest_source_tensor_bytes": largest_read,
                     "largest_written_tensor_bytes": writer.largest_tensor_bytes}


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConversionError(f"{path}: onnx.checker rejects the built graph ({detail})") from None


def _recipe(recipe: Any, opts: Any) -> dict[str, Any]:
    embedding = "int4 GatherBlockQuantized" if opts.quantize_embedding else "float32 Gather"
    data = replace(recipe, method=BUILDER_QUANTS[recipe.quant], embeddings=embedding).to_dict()
    if recipe.bits is not None:
        data["clip_search"] = list(opts.clip_grid)
    return data


def convert_with_builder(source: Any, output: Path, recipe: Any, *, force: bool = False,
                         verify: bool = True, reference: Path | None = None,
                         prompts: list[str] | None = None, progress: ProgressFn | None = None) -> Artifact:
    """Build the ONNX decoder of an opened ``source`` (see ``converters.source``) into ``output``."""
    from edgellm.converters.genai_config import write_genai_config

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MissingDependencyError("onnx", "build-onnx", "the ONNX graph builder") from None
    started = time.perf_counter()
    with Staging(output, force=force) as stage:
        hf_dir = source.hf_dir(stage.path, progress, weights=False)  # tensors come from source.tensors()
        cfg = read_hf_config(hf_dir)
        spec = ModelSpec.from_hf_config(cfg, source=str(hf_dir / "config.json"))
        refused = builder_refusals(spec, recipe.quant, cfg)
        if refused:
            raise UnsupportedArchitectureError(f"{source.path}: the ONNX builder cannot write this model: "
                                               f"{'; '.join(refused)}")
        opts = _options(recipe, spec)
        if progress:
            progress(0, spec.n_layers, "build graph")
        builder, sizes = _write_graph(source, stage.path, cfg, spec, opts)
        _check(stage.path / MODEL_FILE)
        copied = copy_runtime_files(hf_dir, stage.path, "ONNX Runtime")
        contract = builder.contract()
        genai = write_genai_config(stage.path, hf_dir, spec, cfg, contract, MODEL_FILE)
        manifest: dict[str, Any] = {
            "format": Format.ONNX.value,
            "files": {"model": MODEL_FILE, "weights": ["model.onnx.data"], "tokenizer": copied,
                      "genai_config": genai},
            "quantization": recipe.quant,
            "exporter": "builder",
            "recipe": _recipe(recipe, opts),
            "graph": contract,
            "builder": {**builder.features(), **sizes},
            "operators": dict(sorted(builder.ops.items())),
            **source.manifest_common(),
            "tool": tool_versions("onnx", "onnxruntime", "numpy"),
        }
        write_manifest(stage.path, manifest)  # the runtime binds by its graph record, parity included
        if progress:
            progress(spec.n_layers, spec.n_layers, "build graph")
        manifest["parity"] = source.parity(stage.path / MODEL_FILE, reference, recipe.quant, prompts, verify,
                                           fmt="onnx")
        source.cleanup()
        return stage.commit_artifact(manifest, started)
