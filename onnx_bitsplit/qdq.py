"""QDQ writing: the only place that creates QuantizeLinear/DequantizeLinear nodes.

Weights become INT4 (bits <= 4) or INT8 initializers with a per-axis DequantizeLinear; activations
get a per-tensor QuantizeLinear/DequantizeLinear pair that every reader of the tensor goes through.
Only default-domain operators are used, at opset 21.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph import IR_VERSION, LayerSpec


@dataclass(frozen=True)
class WeightQuant:
    """A solved layer: integers in the stored weight's layout, scales along layer.axis."""

    layer: LayerSpec
    bits: int
    q: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class ActivationQuant:
    """A per-tensor activation quantizer: int8 if signed, else uint8 (with its zero point)."""

    tensor_name: str
    scale: float
    signed: bool
    zero_point: int = 0


def qdq_name(base: str, role: str) -> str:
    """Every tensor and node name this module creates."""
    return f"{base}_{role}"


def write_qdq(model: onnx.ModelProto, weights: list[WeightQuant],
              activations: list[ActivationQuant]) -> onnx.ModelProto:
    """A copy of the prepared `model` with the quantizers inserted."""
    with gs.logger.G_LOGGER.suppress():
        graph = gs.import_onnx(model)
        tensors = graph.tensors()
        nodes = {node.name: node for node in graph.nodes}
        for weight in weights:
            _quantize_weight(graph, nodes[weight.layer.name], weight)
        for activation in activations:
            _quantize_activation(graph, tensors[activation.tensor_name], activation)
        graph.cleanup().toposort()
        quantized = gs.export_onnx(graph)
    quantized.ir_version = IR_VERSION
    return quantized


def _integer_constant(name: str, values: np.ndarray, bits: int) -> gs.Constant:
    dtype = ml_dtypes.int4 if bits <= 4 else np.int8
    return gs.Constant(name, LazyValues(numpy_helper.from_array(values.astype(dtype), name)))


def _quantize_weight(graph: gs.Graph, node: gs.Node, weight: WeightQuant) -> None:
    layer = weight.layer
    name = layer.weight_name
    dequantized = gs.Variable(qdq_name(name, "dequantized"), np.float32, layer.weight_shape)
    graph.nodes.append(gs.Node(
        "DequantizeLinear", qdq_name(name, "DequantizeLinear"),
        attrs={"axis": layer.axis},
        inputs=[_integer_constant(qdq_name(name, "quantized"), weight.q, weight.bits),
                gs.Constant(qdq_name(name, "scale"), weight.scale.astype(np.float32)),
                _integer_constant(qdq_name(name, "zero_point"), np.zeros_like(weight.scale), weight.bits)],
        outputs=[dequantized]))
    node.inputs[layer.weight_index] = dequantized
    if weight.bias is not None and layer.bias_name:
        node.inputs[2] = gs.Constant(qdq_name(layer.bias_name, "corrected"), weight.bias.astype(np.float32))
    graph.cleanup().toposort()


def _quantize_activation(graph: gs.Graph, tensor: gs.Variable, activation: ActivationQuant) -> None:
    readers = list(tensor.outputs)
    name = tensor.name
    zero_point = np.array(activation.zero_point, np.int8 if activation.signed else np.uint8)
    quantized = gs.Variable(qdq_name(name, "quantized"), zero_point.dtype)
    dequantized = gs.Variable(qdq_name(name, "dequantized"), np.float32, tensor.shape)
    scale = gs.Constant(qdq_name(name, "scale"), np.array(activation.scale, np.float32))
    zero = gs.Constant(qdq_name(name, "zero_point"), zero_point)
    graph.nodes += [
        gs.Node("QuantizeLinear", qdq_name(name, "QuantizeLinear"), inputs=[tensor, scale, zero],
                outputs=[quantized]),
        gs.Node("DequantizeLinear", qdq_name(name, "DequantizeLinear"), inputs=[quantized, scale, zero],
                outputs=[dequantized]),
    ]
    for reader in readers:
        for position, read in enumerate(reader.inputs):
            if read is tensor:
                reader.inputs[position] = dequantized
    graph.cleanup().toposort()
