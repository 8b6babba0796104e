"""Stored patch rows -> the solver's float32 inputs, converted by onnxruntime.

The streams store their tensors as 8- or 16-bit integers (the quantized stream) and float16 (the
float stream), and a layer's statistics need them as float32, X~ blended with X. numpy converts
float16 one value at a time, onnxruntime's Cast with the CPU's conversion instructions, on every
core (docs/scaling.md). The results are numpy's, bit for bit: DequantizeLinear is
(q - zero point) · scale in float32, and the blend is the same two float32 products and one sum.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .providers import make_session
from .qdq_format import OPSET, ActivationQuant


class RowConverter:
    """Converts (X~, X) patch rows as stored into float32, one onnxruntime session per kind of
    input (stored types, dequantized or not, blended or not)."""

    def __init__(self):
        self.sessions = {}

    def __call__(self, x_tilde: np.ndarray, quantizer: ActivationQuant | None, x: np.ndarray | None,
                 blend: float) -> tuple[np.ndarray, np.ndarray | None]:
        """(blend · X~ + (1 - blend) · X, X) as float32, X~ dequantized by `quantizer` (None: it
        is stored as float); without X (no error compensation), (X~, None).

        Args:
            x_tilde, x: (g, R, N) patch rows as stored; the results have their memory layout
                (the Gram products round by it).
        """
        rows_last = not x_tilde.flags.c_contiguous  # patches are mostly views of (g, N, R) arrays
        def as_stored(rows):
            return np.ascontiguousarray(rows.swapaxes(-1, -2) if rows_last else rows)

        feeds = {"x_tilde": as_stored(x_tilde)}
        if quantizer is not None:
            feeds["scale"] = np.array(quantizer.scale, np.float32)
            feeds["zero_point"] = np.array(quantizer.zero_point, x_tilde.dtype)
        if x is not None:
            feeds["x"] = as_stored(x)
            if blend < 1:
                feeds["keep"], feeds["mix"] = np.array(blend, np.float32), np.array(1 - blend, np.float32)
        kind = tuple((name, value.dtype.str) for name, value in feeds.items())
        if kind not in self.sessions:
            # no spinning: the runs alternate with numpy's Gram products, which need the cores
            self.sessions[kind] = make_session(_converter(dict(kind)), spinning=False)
        results = [value.swapaxes(-1, -2) if rows_last else value for value in self.sessions[kind].run(None, feeds)]
        return results[0], results[1] if x is not None else None


def _converter(dtypes: dict[str, str]) -> onnx.ModelProto:
    """The conversion graph for feeds of these numpy types: outputs x_tilde (blended) and x."""
    def info(name):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[name])), None)

    if "scale" in dtypes:
        nodes = [helper.make_node("DequantizeLinear", ["x_tilde", "scale", "zero_point"], ["x_tilde_float"])]
    else:
        nodes = [helper.make_node("Cast", ["x_tilde"], ["x_tilde_float"], to=TensorProto.FLOAT)]
    outputs = ["x_tilde_float"]
    if "x" in dtypes:
        nodes.append(helper.make_node("Cast", ["x"], ["x_float"], to=TensorProto.FLOAT))
        outputs.append("x_float")
    if "keep" in dtypes:
        nodes += [helper.make_node("Mul", ["x_tilde_float", "keep"], ["x_tilde_kept"]),
                  helper.make_node("Mul", ["x_float", "mix"], ["x_mixed"]),
                  helper.make_node("Add", ["x_tilde_kept", "x_mixed"], ["x_tilde_blended"])]
        outputs[0] = "x_tilde_blended"
    graph = helper.make_graph(nodes, "rows", [info(name) for name in dtypes],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
