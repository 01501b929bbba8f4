"""edgellm's numpy block quantizer against ONNX Runtime's own kernels.

Each layout (MatMulNBits ``B``/scales/zero points, GatherBlockQuantized data) is run by ONNX
Runtime in a one-node graph and compared with numpy on the dequantized weight: a packing
mistake (nibble order, zero-point layout, padding of K) shows as a large difference.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.converters.onnx_quant import dequantize, pack_low_first, quantize_blockwise
from tests.fixtures import require

require("onnx", "onnxruntime")


def _run(node, inputs: dict, inits: list, out_shape: list) -> np.ndarray:
    import onnxruntime as ort
    from onnx import helper

    graph_inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                    for k, v in inputs.items()]
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("y", 1, out_shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


@pytest.mark.parametrize(("bits", "sym", "k", "block"), [
    (4, False, 64, 32), (4, True, 576, 32), (4, False, 70, 16), (8, False, 100, 32), (8, True, 64, 64)])
def test_matmul_nbits_layout(bits: int, sym: bool, k: int, block: int) -> None:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    n = 24
    qw = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), bits, block, sym)
    inits = [numpy_helper.from_array(qw.matmul_nbits_b(), "B"),
             numpy_helper.from_array(qw.scales.ravel(), "S")]
    names = ["x", "B", "S"]
    if qw.packed_zero_points() is not None:
        inits.append(numpy_helper.from_array(qw.packed_zero_points(), "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = _run(node, {"x": x}, inits, [3, n])
    assert np.abs(y - x @ dequantize(qw).T).max() < 1e-4
    assert (qw.zero_points is None) == sym


@pytest.mark.parametrize("sym", [True, False])
def test_gather_block_quantized_layout(sym: bool) -> None:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    qw = quantize_blockwise(rng.standard_normal((50, 64)).astype(np.float32), 4, 32, sym)
    inits = [numpy_helper.from_array(qw.gather_data(), "D"), numpy_helper.from_array(qw.scales, "S")]
    names = ["D", "i", "S"]
    if not sym:
        inits.append(numpy_helper.from_array(pack_low_first(qw.zero_points, 4), "Z"))
        names.append("Z")
    node = helper.make_node("GatherBlockQuantized", names, ["y"], domain="com.microsoft", gather_axis=0,
                            quantize_axis=1, block_size=32, bits=4)
    idx = np.array([0, 3, 49], np.int64)
    assert np.array_equal(_run(node, {"i": idx}, inits, [3, 64]), dequantize(qw)[idx])


def test_quantization_error_is_bounded_by_half_a_step() -> None:
    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    for bits in (4, 8):
        qw = quantize_blockwise(w, bits, 32, symmetric=False)
        step = np.repeat(qw.scales, 32, axis=1)
        assert np.all(np.abs(dequantize(qw) - w) <= step / 2 + 1e-6)


@pytest.mark.parametrize("sym", [True, False])
def test_clipping_search_never_increases_a_blocks_error(sym: bool) -> None:
    from edgellm.converters.onnx_quant import CLIP_GRID

    w = np.random.default_rng(3).standard_t(3, (16, 128)).astype(np.float32)  # heavy tails
    plain = quantize_blockwise(w, 4, 32, sym)
    searched = quantize_blockwise(w, 4, 32, sym, clip_grid=CLIP_GRID)

    def block_error(qw):
        return ((dequantize(qw) - w) ** 2).reshape(16, -1, 32).sum(-1)

    assert np.all(block_error(searched) <= block_error(plain) + 1e-6)
    assert block_error(searched).sum() < block_error(plain).sum()
