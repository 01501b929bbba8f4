"""A small ONNX graph writer whose weights stream to an external-data file as they are added.

:class:`GraphWriter` holds nodes and tensor *descriptions*; every initializer's bytes go
straight to ``model.onnx.data`` at a page-aligned offset (ONNX Runtime can map aligned
external data instead of copying it) and the array is dropped. The ``ModelProto`` therefore
never holds weights, and a converter holds one tensor (plus its quantized form) at a time.

States, in order (gguf-py's ``WriterState`` habit): OPEN (add tensors and nodes) -> SAVED.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATA_FILE", "GraphWriter"]

DATA_FILE = "model.onnx.data"
_ALIGN = 4096  # the page size: ONNX Runtime maps external data whose offset is page-aligned
_SMALL = 64  # bytes; smaller tensors stay inside the graph


class _State(enum.Enum):
    OPEN = "open"
    SAVED = "saved"


class GraphWriter:
    """Nodes, inputs, outputs and streamed initializers of one ONNX graph."""

    def __init__(self, folder: Path, opsets: dict[str, int]) -> None:
        import onnx

        self._onnx = onnx
        self.folder = folder
        self.opsets = opsets
        self.nodes: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()
        self._data = (folder / DATA_FILE).open("wb")
        self._offset = 0
        self._state = _State.OPEN
        self.largest_tensor_bytes = 0
        self._const_cache: dict[tuple[str, bytes], str] = {}

    # -- tensors ----------------------------------------------------------------------
    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add ``array`` under ``name`` (bytes written now, array not kept); returns the name."""
        self._check_open()
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._names.add(name)
        arr = np.ascontiguousarray(array)
        self.largest_tensor_bytes = max(self.largest_tensor_bytes, arr.nbytes)
        helper = self._onnx.helper
        if arr.nbytes <= _SMALL:
            self.initializers.append(self._onnx.numpy_helper.from_array(arr, name))
            return name
        pad = (-self._offset) % _ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(arr.tobytes())
        tensor = self._onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        tensor.dims.extend(arr.shape)
        tensor.data_location = self._onnx.TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(self._offset)),
                           ("length", str(arr.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += arr.nbytes
        self.initializers.append(tensor)
        return name

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer, shared by every node that uses the same value."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str + str(arr.shape), arr.tobytes())
        if key not in self._const_cache:
            self._const_cache[key] = self.initializer(f"const_{len(self._const_cache)}", arr)
        return self._const_cache[key]

    # -- graph ------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
             outputs: list[str] | None = None, **attrs: Any) -> list[str]:
        """Add a node; returns its output names (``name/out{i}`` unless given)."""
        self._check_open()
        outs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(self._onnx.helper.make_node(op, inputs, outs, name=name, domain=domain or None,
                                                      **attrs))
        return outs

    def graph_input(self, name: str, elem_type: int, shape: list[Any]) -> str:
        """Declare a graph input."""
        self.inputs.append(self._onnx.helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def graph_output(self, name: str, elem_type: int, shape: list[Any]) -> str:
        """Declare a graph output."""
        self.outputs.append(self._onnx.helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def save(self, path: Path, graph_name: str, producer: str) -> None:
        """Close the data file and write the graph (no weights inside) at ``path``."""
        self._check_open()
        self._data.close()
        helper = self._onnx.helper
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid(domain, version) for domain, version in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = 10
        self._onnx.save_model(model, str(path))
        self._state = _State.SAVED

    def abort(self) -> None:
        """Close the data file after a failure (the staging folder is removed anyway)."""
        if not self._data.closed:
            self._data.close()

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise RuntimeError("the graph was already saved")
