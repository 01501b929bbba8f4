"""The decoder graph of edgellm's ONNX builder, written from the weights one tensor at a time.

One graph for every architecture of :data:`~edgellm.converters.onnx_arch.BUILDER_ARCHS`;
the rows say what differs. Per layer (ONNX Runtime contrib operators, ``com.microsoft``)::

    x ─ SkipSimplifiedLayerNormalization ─ QKV (one MatMul / MatMulNBits) ─ [Q/K RMSNorm]
      ─ GroupQueryAttention (rotary inside, past/present = one shared KV buffer)
      ─ O ─ SkipSimplifiedLayerNormalization ─ gate|up (one MatMul) ─ act(gate) * up ─ down

Skip-norms carry the residual stream (their 4th output is ``input + skip``). Gemma's sandwich
norms add a plain ``RMSNormalization`` (ONNX 23) after attention and after the MLP.
The last norm feeds the LM head through ``Slice(hidden, -logits_to_keep)``: ``logits_to_keep``
is an overridable initializer (default 0 = every position, what onnxruntime-genai expects);
edgellm's runtime binds 1 so a prefill computes one row of logits, not one per token.

The graph contract (input/output names, KV layout and sharing) is returned by
:meth:`DecoderBuilder.contract` for the manifest; the runtime binds by it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgellm.converters.onnx_arch import (
    ACTIVATIONS,
    BUILDER_ARCHS,
    LayerPlan,
    activation,
    attention_scale,
    layer_plans,
)
from edgellm.converters.onnx_graph import GraphWriter
from edgellm.converters.onnx_quant import quantize_blockwise
from edgellm.converters.onnx_rope import rope_tables
from edgellm.spec import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["ACTIVATION_OPS", "CONTRACT", "BuildOptions", "DecoderBuilder"]

MS = "com.microsoft"
#: ONNX 23 brings RMSNormalization (ONNX Runtime has no standalone SimplifiedLayerNormalization
#: schema that onnx.checker knows); the fused operators are com.microsoft version 1.
OPSETS = {"": 23, MS: 1}
#: The graph contract name recorded in the manifest; the runtime binds by it.
CONTRACT = "gqa-shared-kv/1"
_FLOAT = 1  # onnx.TensorProto.FLOAT
_INT64 = 7


@dataclass(frozen=True)
class BuildOptions:
    """Weight precision of the builder graph: float32, or MatMulNBits with these settings."""

    bits: int | None = None  # None = float32 weights
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    quantize_embedding: bool = False  # GatherBlockQuantized (4-bit only)
    clip_grid: tuple[float, ...] = (1.0,)  # range shrink factors searched per block


class Reader:
    """Tensor access by Hugging Face name, with the checkpoint's prefix found once."""

    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt
        embed = next((n for n in ckpt.names() if n.endswith("embed_tokens.weight")), None)
        if embed is None:
            from edgellm.errors import ConversionError

            raise ConversionError(f"{ckpt.folder}: no *embed_tokens.weight tensor; not a decoder checkpoint")
        self.prefix = embed[: -len("embed_tokens.weight")]  # "model." or "language_model.model."
        self.root = self.prefix[: -len("model.")] if self.prefix.endswith("model.") else ""

    def layer(self, i: int, name: str) -> str:
        return f"{self.prefix}layers.{i}.{name}"

    def has(self, name: str) -> bool:
        return name in self.ckpt

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.ckpt.read(name), dtype=np.float32)


def _silu(w: GraphWriter, x: str, name: str) -> str:
    sig = w.node("Sigmoid", [x], f"{name}/Sigmoid")[0]
    return w.node("Mul", [x, sig], f"{name}/Mul")[0]


def _gelu_tanh(w: GraphWriter, x: str, name: str) -> str:
    return w.node("FastGelu", [x], f"{name}/FastGelu", domain=MS)[0]


def _gelu(w: GraphWriter, x: str, name: str) -> str:
    return w.node("Gelu", [x], f"{name}/Gelu", domain=MS)[0]


#: ACTIVATIONS value -> the nodes that compute it.
ACTIVATION_OPS: dict[str, Callable[[GraphWriter, str, str], str]] = {
    "silu": _silu, "gelu_tanh": _gelu_tanh, "gelu": _gelu,
}


class DecoderBuilder:
    """Writes one decoder graph into a :class:`GraphWriter` (call :meth:`build` once)."""

    def __init__(self, w: GraphWriter, reader: Reader, cfg: Mapping[str, Any], spec: ModelSpec,
                 opts: BuildOptions) -> None:
        self.w, self.r, self.cfg, self.spec, self.opts = w, reader, cfg, spec, opts
        self.arch = BUILDER_ARCHS[spec.architecture]
        self.act = ACTIVATION_OPS[ACTIVATIONS[activation(cfg, self.arch)]]
        self.layers = layer_plans(cfg, spec, self.arch)
        self.eps = float(spec.norm_eps)
        self.ops: dict[str, int] = {}
        self.quantized: list[str] = []

    # -- small helpers ------------------------------------------------------------------
    def _node(self, op: str, inputs: list[str], name: str, **kw: Any) -> list[str]:
        self.ops[op] = self.ops.get(op, 0) + 1
        return self.w.node(op, inputs, name, **kw)

    def _norm_weight(self, name: str) -> str:
        return self.w.initializer(name, self.r.read(name) + np.float32(self.arch.norm_offset))

    def _norm(self, x: str, weight: str, name: str) -> str:
        return self._node("RMSNormalization", [x, self._norm_weight(weight)], name,
                          axis=-1, epsilon=self.eps, stash_type=1)[0]

    def _skip_norm(self, x: str, skip: str, weight: str, name: str) -> tuple[str, str]:
        """(normalized, x + skip) of a SkipSimplifiedLayerNormalization."""
        out = [f"{name}/out0", "", "", f"{name}/out3"]
        self._node("SkipSimplifiedLayerNormalization", [x, skip, self._norm_weight(weight)], name,
                   outputs=out, domain=MS, epsilon=self.eps)
        return out[0], out[3]

    def _quantized(self, weight: np.ndarray, name: str, bits: int) -> list[str]:
        """MatMulNBits initializers of ``weight``: [B, scales, zero points (asymmetric only)]."""
        qw = quantize_blockwise(weight, bits, self.opts.block_size, self.opts.symmetric, self.opts.clip_grid)
        names = [self.w.initializer(f"{name}.qweight", qw.matmul_nbits_b()),
                 self.w.initializer(f"{name}.scales", qw.scales.reshape(-1))]
        zp = qw.packed_zero_points()
        if zp is not None:
            names.append(self.w.initializer(f"{name}.zero_points", zp))
        self.quantized.append(name)
        return names

    def _matmul_nbits(self, x: str, weights: list[str], n: int, k: int, name: str) -> str:
        return self._node("MatMulNBits", [x, *weights], f"{name}/MatMulNBits", domain=MS, K=k, N=n,
                          bits=self.opts.bits, block_size=self.opts.block_size,
                          accuracy_level=self.opts.accuracy_level)[0]

    def _linear(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """``x @ weightᵀ (+ bias)``; ``weight`` is ``[N, K]`` (out x in), quantized if asked."""
        n, k = weight.shape
        if self.opts.bits is None:
            y = self._node("MatMul", [x, self.w.initializer(f"{name}.weight", weight.T)], f"{name}/MatMul")[0]
        else:
            y = self._matmul_nbits(x, self._quantized(weight, name, self.opts.bits), n, k, name)
        if bias is not None:
            y = self._node("Add", [y, self.w.initializer(f"{name}.bias", bias)], f"{name}/Add")[0]
        return y

    def _maybe(self, name: str) -> np.ndarray | None:
        return self.r.read(name) if self.r.has(name) else None

    # -- graph pieces -------------------------------------------------------------------
    def _inputs(self) -> tuple[str, str]:
        w, s = self.w, self.spec
        ids = w.graph_input("input_ids", _INT64, ["batch_size", "sequence_length"])
        mask = w.graph_input("attention_mask", _INT64, ["batch_size", "total_sequence_length"])
        for i in range(s.n_layers):
            for kind in ("key", "value"):
                w.graph_input(f"past_key_values.{i}.{kind}", _FLOAT,
                              ["batch_size", s.n_kv_heads, "past_sequence_length", s.head_dim])
        return ids, mask

    def _mask_lengths(self, mask: str) -> tuple[str, str]:
        """``seqlens_k`` (tokens seen - 1, int32 [batch]) and ``total_sequence_length`` (int32)."""
        name = "/model/attn_mask"
        total = self._node("ReduceSum", [mask, self.w.const([1])], f"{name}/ReduceSum", keepdims=0)[0]
        minus = self._node("Sub", [total, self.w.const(1)], f"{name}/Sub")[0]
        seqlens = self._node("Cast", [minus], f"{name}/Sub/Cast", to=6)[0]
        shape = self._node("Shape", [mask], f"{name}/Shape")[0]
        length = self._node("Gather", [shape, self.w.const(1)], f"{name}/Gather", axis=0)[0]
        return seqlens, self._node("Cast", [length], f"{name}/Gather/Cast", to=6)[0]

    def _embedding(self, ids: str) -> str:
        """Gather (float) or GatherBlockQuantized over the table; a tied LM head reuses it.

        Quantized, the table is stored once in MatMulNBits layout (``[V, H/block, block/2]``
        bytes are the same as GatherBlockQuantized's ``[V, H/2]``, scales and zero points
        too): the gather reads it through Reshapes and a tied LM head directly.
        """
        table = self.r.read(self.r.prefix + "embed_tokens.weight")
        name, (v, h) = "model.embed_tokens", table.shape
        if self.opts.quantize_embedding:
            self._table = self._quantized(table, name, 4)
            shapes = ([v, h // 2], [v, -1], [v, -1])
            inputs = [self._node("Reshape", [t, self.w.const(shape)], f"{name}/Reshape{j}")[0]
                      for j, (t, shape) in enumerate(zip(self._table, shapes, strict=False))]
            x = self._node("GatherBlockQuantized", [inputs[0], ids, *inputs[1:]],
                           f"{name}/GatherBlockQuantized", domain=MS, gather_axis=0, quantize_axis=1,
                           block_size=self.opts.block_size, bits=4)[0]
        else:
            self._table = [self.w.initializer(f"{name}.weight", table)]
            x = self._node("Gather", [self._table[0], ids], f"{name}/Gather")[0]
        if self.arch.scaled_embedding:  # transformers: embeddings * hidden_size ** 0.5 in float32
            scale = self.w.const(np.float32(self.spec.hidden_size) ** np.float32(0.5), np.float32)
            x = self._node("Mul", [x, scale], f"{name}/Mul")[0]
        return x

    def _rope(self, total: str) -> dict[str, tuple[str, str]]:
        """cos/sin cache names per rope kind ("global", "local"); longrope selects by length."""
        cfg, s = self.cfg, self.spec
        caches = {}
        kinds = {p.rope for p in self.layers}
        for kind in sorted(kinds):
            local = kind == "local"
            theta = float(cfg[self.arch.local_rope_key]) if local else s.rope_theta
            tables = rope_tables(theta, s.head_dim, s.max_positions,
                                 None if local else cfg.get("rope_scaling"), cfg)
            cos = self.w.initializer(f"cos_cache_{kind}", tables.cos[:, : s.head_dim // 2])
            sin = self.w.initializer(f"sin_cache_{kind}", tables.sin[:, : s.head_dim // 2])
            if tables.long is not None:
                cos, sin = self._longrope_switch(total, (cos, sin), tables, kind)
            caches[kind] = (cos, sin)
        return caches

    def _longrope_switch(self, total: str, short: tuple[str, str], tables: Any, kind: str) -> tuple[str, str]:
        import onnx

        helper = onnx.helper
        long = (self.w.initializer(f"cos_cache_{kind}_long", tables.long[0]),
                self.w.initializer(f"sin_cache_{kind}_long", tables.long[1]))
        switch = self.w.const(tables.switch_at, np.int32)
        cond = self._node("Greater", [total, switch], "/model/rope/Greater")[0]

        def branch(pair: tuple[str, str], label: str) -> Any:
            outs = [f"/model/rope/{label}/cos", f"/model/rope/{label}/sin"]
            nodes = [helper.make_node("Identity", [src], [dst]) for src, dst in zip(pair, outs, strict=True)]
            vals = [helper.make_tensor_value_info(o, _FLOAT, None) for o in outs]
            return helper.make_graph(nodes, label, [], vals)

        outs = self._node("If", [cond], "/model/rope/If", n_out=2,
                          then_branch=branch(long, "long"), else_branch=branch(short, "short"))
        return outs[0], outs[1]

    def _attention(self, i: int, x: str, lengths: tuple[str, str], caches: dict[str, tuple[str, str]],
                   plan: LayerPlan) -> str:
        s, r = self.spec, self.r
        name = f"model.layers.{i}.self_attn"
        q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        if self.arch.fused_qkv:
            weight, bias = r.read(r.layer(i, "self_attn.qkv_proj.weight")), self._maybe(
                r.layer(i, "self_attn.qkv_proj.bias"))
        else:
            parts = [r.read(r.layer(i, f"self_attn.{p}_proj.weight")) for p in "qkv"]
            weight = np.concatenate(parts, axis=0)
            del parts
            biases = [self._maybe(r.layer(i, f"self_attn.{p}_proj.bias")) for p in "qkv"]
            bias = None if all(b is None for b in biases) else np.concatenate(
                [b if b is not None else np.zeros(d, np.float32) for b, d in zip(
                    biases, (q_dim, kv_dim, kv_dim), strict=True)])
        qkv = self._linear(x, weight, f"{name}.qkv_proj", bias)
        del weight
        q_in, k_in, v_in = qkv, "", ""
        if self.arch.qk_norm:
            q_in, k_in, v_in = self._node("Split", [qkv, self.w.const([q_dim, kv_dim, kv_dim])],
                                          f"{name}/Split", n_out=3, axis=-1)
            q_in = self._head_norm(q_in, r.layer(i, "self_attn.q_norm.weight"), f"{name}.q_norm")
            k_in = self._head_norm(k_in, r.layer(i, "self_attn.k_norm.weight"), f"{name}.k_norm")
        cos, sin = caches[plan.rope]
        attn = self._node(
            "GroupQueryAttention",
            [q_in, k_in, v_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *lengths, cos, sin],
            f"{name}/GroupQueryAttention", domain=MS,
            outputs=[f"{name}/attn", f"present.{i}.key", f"present.{i}.value"],
            num_heads=s.n_heads, kv_num_heads=s.n_kv_heads, scale=attention_scale(self.cfg, s),
            local_window_size=plan.window, softcap=float(self.cfg.get("attn_logit_softcapping") or 0.0),
            do_rotary=1, rotary_interleaved=0)[0]
        o_bias = self._maybe(r.layer(i, "self_attn.o_proj.bias"))
        return self._linear(attn, r.read(r.layer(i, "self_attn.o_proj.weight")), f"{name}.o_proj", o_bias)

    def _head_norm(self, x: str, weight: str, name: str) -> str:
        heads = self._node("Reshape", [x, self.w.const([0, 0, -1, self.spec.head_dim])], f"{name}/Reshape")[0]
        normed = self._norm(heads, weight, f"{name}/RMSNormalization")
        return self._node("Reshape", [normed, self.w.const([0, 0, -1])], f"{name}/Reshape_back")[0]

    def _mlp(self, i: int, x: str) -> str:
        r = self.r
        name = f"model.layers.{i}.mlp"
        if self.arch.fused_gate_up:
            weight = r.read(r.layer(i, "mlp.gate_up_proj.weight"))
        else:
            weight = np.concatenate([r.read(r.layer(i, "mlp.gate_proj.weight")),
                                     r.read(r.layer(i, "mlp.up_proj.weight"))], axis=0)
        gate_up = self._linear(x, weight, f"{name}.gate_up_proj")
        del weight
        gate, up = self._node("Split", [gate_up, self.w.const([self.spec.intermediate_size] * 2)],
                              f"{name}/Split", n_out=2, axis=-1)
        hidden = self._node("Mul", [self.act(self.w, gate, f"{name}/act"), up], f"{name}/Mul")[0]
        return self._linear(hidden, r.read(r.layer(i, "mlp.down_proj.weight")), f"{name}.down_proj")

    def _layer(self, i: int, x: str, residual: str, lengths: tuple[str, str],
               caches: dict[str, tuple[str, str]]) -> tuple[str, str]:
        """One decoder layer: (its output before the residual add, the residual stream)."""
        r, name = self.r, f"model.layers.{i}"
        norm_in = r.layer(i, "input_layernorm.weight")
        if i == 0:
            h = self._norm(x, norm_in, f"{name}/input_layernorm")
        else:
            h, residual = self._skip_norm(x, residual, norm_in, f"{name}/input_layernorm")
        attn = self._attention(i, h, lengths, caches, self.layers[i])
        if self.arch.sandwich_norms:
            post = r.layer(i, "post_attention_layernorm.weight")
            attn = self._norm(attn, post, f"{name}/post_attention_norm")
            pre_mlp = r.layer(i, "pre_feedforward_layernorm.weight")
        else:
            pre_mlp = r.layer(i, "post_attention_layernorm.weight")
        h, residual = self._skip_norm(attn, residual, pre_mlp, f"{name}/pre_mlp_norm")
        out = self._mlp(i, h)
        if self.arch.sandwich_norms:
            out = self._norm(out, r.layer(i, "post_feedforward_layernorm.weight"), f"{name}/post_mlp_norm")
        return out, residual

    def _lm_head(self, hidden: str) -> str:
        w, s = self.w, self.spec
        keep = w.graph_input("logits_to_keep", _INT64, [1])
        w.initializer(keep, np.zeros(1, np.int64))  # overridable default: every position
        start = self._node("Neg", [keep], "/model/logits_to_keep/Neg")[0]
        sliced = self._node("Slice", [hidden, start, w.const([np.iinfo(np.int64).max]), w.const([1])],
                            "/model/logits_to_keep/Slice")[0]
        logits = self._head_matmul(sliced)
        cap = self.cfg.get("final_logit_softcapping")
        if cap:
            c = w.const(np.float32(cap), np.float32)
            t = self._node("Tanh", [self._node("Div", [logits, c], "/lm_head/softcap/Div")[0]],
                           "/lm_head/softcap/Tanh")[0]
            logits = self._node("Mul", [t, c], "/lm_head/softcap/Mul")[0]
        self._node("Identity", [logits], "/lm_head/logits", outputs=["logits"])
        return w.graph_output("logits", _FLOAT, ["batch_size", "kept_sequence_length", s.vocab_size])

    def _head_matmul(self, hidden: str) -> str:
        """``hidden @ Wᵀ`` for the ``[V, H]`` head: the embedding's own tensors when tied and stored
        in a usable form, else the head's (or the table's) weight written once more."""
        r, s = self.r, self.spec
        head = r.root + "lm_head.weight"
        tied = s.tied_embeddings or not r.has(head)
        quantized_table = self.opts.quantize_embedding
        if self.opts.bits is not None and not (tied and quantized_table):
            weight = r.read(head if not tied else r.prefix + "embed_tokens.weight")
            return self._linear(hidden, weight, "lm_head")
        if self.opts.bits is not None:  # tied, and the table is in MatMulNBits layout already
            return self._matmul_nbits(hidden, self._table, s.vocab_size, s.hidden_size, "lm_head")
        table = self._table[0] if tied else self.w.initializer("lm_head.weight", r.read(head))
        # Gemm(transB=1) reads the [V, H] table as stored (as fast as MatMul on a transposed
        # copy, measured): a tied float model keeps one copy of its largest tensor.
        flat = self._node("Reshape", [hidden, self.w.const([-1, s.hidden_size])], "/lm_head/Reshape")[0]
        logits = self._node("Gemm", [flat, table], "/lm_head/Gemm", transB=1)[0]
        lead = self._node("Slice", [self._node("Shape", [hidden], "/lm_head/Shape")[0], self.w.const([0]),
                                    self.w.const([2])], "/lm_head/Shape/Slice")[0]
        shape = self._node("Concat", [lead, self.w.const([s.vocab_size])], "/lm_head/Concat", axis=0)[0]
        return self._node("Reshape", [logits, shape], "/lm_head/Reshape_back")[0]

    def build(self) -> None:
        """Write the whole graph: inputs, embedding, layers, final norm, LM head, outputs."""
        s = self.spec
        ids, mask = self._inputs()
        lengths = self._mask_lengths(mask)
        caches = self._rope(lengths[1])
        x = residual = self._embedding(ids)
        for i in range(s.n_layers):
            x, residual = self._layer(i, x, residual, lengths, caches)
            logger.debug("layer %d written", i)
        hidden, _ = self._skip_norm(x, residual, self.r.prefix + "norm.weight", "model.norm")
        self._lm_head(hidden)
        for i in range(s.n_layers):
            for kind in ("key", "value"):
                self.w.graph_output(f"present.{i}.{kind}", _FLOAT,
                                    ["batch_size", s.n_kv_heads, "total_sequence_length", s.head_dim])

    def contract(self) -> dict[str, Any]:
        """The graph contract the manifest records and the runtime binds by."""
        s = self.spec
        return {
            "contract": CONTRACT,
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "logits_to_keep": "logits_to_keep"},
            "outputs": {"logits": "logits"},
            "kv": {
                "past_key": "past_key_values.%d.key", "past_value": "past_key_values.%d.value",
                "present_key": "present.%d.key", "present_value": "present.%d.value",
                "layout": "BNSH", "n_layers": s.n_layers, "kv_heads": s.n_kv_heads, "head_dim": s.head_dim,
                "dtype": "float32", "past_present_share_buffer": True,
            },
            "logits": {"dtype": "float32", "positions": "the last logits_to_keep (0: all)"},
            "max_positions": s.max_positions,
        }

    def features(self) -> dict[str, Any]:
        """What the graph does per feature, for the manifest (never silent about a fallback)."""
        windows = sorted({p.window for p in self.layers if p.window >= 0})
        return {
            "attention": "GroupQueryAttention (rotary fused, do_rotary=1)",
            "fused_qkv": True, "fused_gate_up": True,
            "qk_norm": self.arch.qk_norm,
            "sliding_layers": [i for i, p in enumerate(self.layers) if p.window >= 0],
            "sliding_window": windows[0] if windows else None,
            "sliding_kv": "local_window_size masks keys; the shared KV buffer keeps every position",
            "rope_tables": sorted({p.rope for p in self.layers}),
            "attn_softcap": self.cfg.get("attn_logit_softcapping"),
            "final_softcap": self.cfg.get("final_logit_softcapping"),
            "activation": activation(self.cfg, self.arch),
            "quantized": len(self.quantized),
            "operators": dict(sorted(self.ops.items())),
        }
