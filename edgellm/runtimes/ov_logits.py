"""Logits only where they are read: a Slice before an OpenVINO LLM's output projection.

An exported causal-LM IR computes ``logits`` for every position of the input: a prefill of
512 tokens on a 49,152-token vocabulary writes 512 x 49,152 floats (96 MiB) that the decode
loop reads one row of, and every infer request (every session) keeps buffers that large.
OpenVINO GenAI slices the hidden states to the last position before the output MatMul
(``apply_slice_before_matmul_transformation`` in ``src/cpp/src/utils.cpp``). edgellm does
the same with the start of the slice as an input, :data:`LOGITS_FROM`: the loop asks for the
last row (``n - 1``), and scoring a text (``all_logits``) asks for every row (``0``), from one
compiled model.

The output projection is found as GenAI finds it: from the ``logits`` result back through
element-wise ops (Gemma 2's soft-capping ``tanh(x / c) * c``, a bias ``Add``, a ``Convert``)
to a ``MatMul`` whose input has rank 3. An IR where no such MatMul is found is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["LOGITS_FROM", "slice_before_lm_head"]

#: The input that says from which position on logits are computed: shape [1], int64.
LOGITS_FROM = "edgellm_logits_from"
#: Ops walked through from the logits result back to the output MatMul (input 0 each time).
ELEMENTWISE = frozenset({"Convert", "Add", "Multiply", "Divide", "Tanh"})
_LAST = 2**62  # Slice's stop: past any sequence length


def _output_matmul(model: Any) -> Any | None:
    try:
        node = model.output("logits").get_node().input_value(0).get_node()
    except RuntimeError:
        return None
    for _ in range(8):  # soft-capping and converts are a few ops deep at most
        kind = node.get_type_name()
        if kind == "MatMul":
            return node if node.input_value(0).get_partial_shape().rank.get_length() == 3 else None
        if kind not in ELEMENTWISE:
            return None
        node = node.input_value(0).get_node()
    return None


def slice_before_lm_head(model: Any) -> bool:
    """Add the :data:`LOGITS_FROM` input and slice the hidden states by it; False if not found."""
    import numpy as np
    import openvino as ov
    import openvino.opset8 as ops

    if LOGITS_FROM in {n for i in model.inputs for n in i.get_names()}:
        return True
    matmul = _output_matmul(model)
    if matmul is None:
        logger.info("no output MatMul found before 'logits': every position's logits are computed")
        return False
    start = ops.parameter([1], ov.Type.i64, name=LOGITS_FROM)
    start.output(0).get_tensor().set_names({LOGITS_FROM})
    hidden = matmul.input_value(0)
    cut = ops.slice(hidden, start, np.array([_LAST], dtype=np.int64), np.array([1], dtype=np.int64),
                    np.array([1], dtype=np.int64))
    matmul.input(0).replace_source_output(cut.output(0))
    model.add_parameters([start])
    model.validate_nodes_and_infer_types()
    return True
