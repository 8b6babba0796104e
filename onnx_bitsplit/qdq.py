"""QDQ writing: the only place that creates QuantizeLinear/DequantizeLinear nodes in the output.

It writes what layout.py decided and capture.py simulated:
- weights as INT4 (bits <= 4, unless INT8 storage is asked for) or INT8 initializers with a
  per-axis DequantizeLinear, zero points 0;
- biases of quantized layers as INT32 with scale = input scale x weight scale, zero point 0;
- each quantized tensor: one QuantizeLinear and one DequantizeLinear that all readers share
  (runtimes give each node unit its own copy; OpenVINO folds a Q/DQ pair only when the Q has one
  reader), and for a graph output a DequantizeLinear of its own that keeps the output's name;
  a removed Relu/Clip's quantizer reads the Relu/Clip's input;
- quantized constants (an Add's operand) as integer initializers with a per-tensor DequantizeLinear.
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

from . import __version__
from .capture import quantizer_dtype
from .graph import IR_VERSION, LayerSpec
from .layout import ActivationQuant, Layout

INT4_STORAGE = "int4"  # the other storage, "int8", keeps every weight in INT8
PRODUCER = "onnx-bitsplit"


@dataclass(frozen=True)
class WeightQuant:
    """A solved layer: integers in the stored weight's layout, scales along layer.axis, and its
    bias as integers on the grid of input scale x weight scale (None without a bias)."""

    layer: LayerSpec
    bits: int
    q: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None
    bias_scale: np.ndarray | None = None


def qdq_name(base: str, role: str) -> str:
    """Every tensor and node name this module creates."""
    return f"{base}_{role}"


def write_qdq(model: onnx.ModelProto, layout: Layout, weights: list[WeightQuant],
              quantizers: dict[str, ActivationQuant], *, weight_storage: str = INT4_STORAGE) -> onnx.ModelProto:
    """A copy of the prepared `model` with the quantizers inserted.

    Args:
        layout: the quantized tensors and constants.
        weights: every quantized layer.
        quantizers: the chosen quantizer of every tensor and constant of the layout.
        weight_storage: "int4" keeps weights of 4 bits or fewer in INT4, "int8" stores every
            weight in INT8 (the values are the same; CPU runtimes have INT8 kernels).
    """
    with gs.logger.G_LOGGER.suppress():
        graph = gs.import_onnx(model)
        tensors = graph.tensors()
        nodes = {node.name: node for node in graph.nodes}
        for weight in weights:
            _quantize_weight(graph, nodes[weight.layer.name], weight, weight_storage)
        for name in layout.constants:
            _quantize_constant(graph, tensors[name], quantizers[name])
        for decision in layout.tensors.values():
            source = nodes[decision.removed_node].inputs[0] if decision.removed_node else None
            _quantize_activation(graph, tensors[decision.name], quantizers[decision.name], source)
        graph.cleanup().toposort()
        quantized = gs.export_onnx(graph)
    quantized.ir_version = IR_VERSION
    return quantized


def _integer_constant(name: str, values: np.ndarray, dtype) -> gs.Constant:
    return gs.Constant(name, LazyValues(numpy_helper.from_array(values.astype(dtype), name)))


def _dequantize(graph: gs.Graph, name: str, values: np.ndarray, scale: np.ndarray | float, dtype,
                axis: int | None = None, zero_point: int = 0) -> gs.Variable:
    """A DequantizeLinear of constant integers (one zero point per scale) and its output."""
    scale = np.asarray(scale, np.float32)
    output = gs.Variable(qdq_name(name, "dequantized"), np.float32, values.shape)
    graph.nodes.append(gs.Node(
        "DequantizeLinear", qdq_name(name, "DequantizeLinear"), attrs={} if axis is None else {"axis": axis},
        inputs=[_integer_constant(qdq_name(name, "quantized"), values, dtype),
                gs.Constant(qdq_name(name, "scale"), scale),
                _integer_constant(qdq_name(name, "zero_point"), np.full(scale.shape, zero_point), dtype)],
        outputs=[output]))
    return output


def _quantize_weight(graph: gs.Graph, node: gs.Node, weight: WeightQuant, storage: str) -> None:
    layer = weight.layer
    dtype = ml_dtypes.int4 if weight.bits <= 4 and storage == INT4_STORAGE else np.int8
    node.inputs[layer.weight_index] = _dequantize(graph, layer.weight_name, weight.q, weight.scale, dtype, layer.axis)
    if weight.bias is not None and layer.bias_name:
        node.inputs[2] = _dequantize(graph, layer.bias_name, weight.bias, weight.bias_scale, np.int32, 0)


def _quantize_constant(graph: gs.Graph, constant: gs.Constant, quantizer: ActivationQuant) -> None:
    dtype = quantizer_dtype(quantizer)
    low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
    values = np.clip(np.rint(constant.values / quantizer.scale) + quantizer.zero_point, low, high)
    output = _dequantize(graph, constant.name, values, quantizer.scale, dtype, zero_point=quantizer.zero_point)
    for reader in list(constant.outputs):
        _replace_input(reader, constant, output)


def _quantize_activation(graph: gs.Graph, tensor: gs.Variable, quantizer: ActivationQuant,
                         source: gs.Variable | None) -> None:
    """Q on `source` (the tensor itself, or a removed Relu/Clip's input), a DQ for each reader."""
    name = tensor.name
    readers = list(tensor.outputs)
    if tensor in graph.outputs:  # the output keeps its name: the float tensor gives it up
        tensor.name = qdq_name(name, "float")
        output = gs.Variable(name, np.float32, tensor.shape)
        graph.outputs[graph.outputs.index(tensor)] = output
    else:
        output = None
    zero_point = np.array(quantizer.zero_point, quantizer_dtype(quantizer))
    scale = gs.Constant(qdq_name(name, "scale"), np.array(quantizer.scale, np.float32))
    zero = gs.Constant(qdq_name(name, "zero_point"), zero_point)
    quantized = gs.Variable(qdq_name(name, "quantized"), zero_point.dtype, tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", qdq_name(name, "QuantizeLinear"),
                               inputs=[source or tensor, scale, zero], outputs=[quantized]))
    if readers:
        dequantized = gs.Variable(qdq_name(name, "dequantized"), np.float32, tensor.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", qdq_name(name, "DequantizeLinear"),
                                   inputs=[quantized, scale, zero], outputs=[dequantized]))
        for reader in readers:
            _replace_input(reader, tensor, dequantized)
    if output is not None:
        graph.nodes.append(gs.Node("DequantizeLinear", qdq_name(name, "DequantizeLinear_output"),
                                   inputs=[quantized, scale, zero], outputs=[output]))


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for position, read in enumerate(node.inputs):
        if read is old:
            node.inputs[position] = new


def carry_metadata(source: onnx.ModelProto, target: onnx.ModelProto, *, keep_output_types: bool,
                   stamp: dict[str, str]) -> None:
    """Copy into `target` what quantization does not change in `source` (metadata_props, which
    pipelines read, e.g. an OCR model's character dictionary; doc strings, model version, domain,
    graph name; input and output doc strings, and the output types unless input shapes were
    made static), then stamp this tool as the producer with `stamp` as onnx_bitsplit.* metadata."""
    for field_name in ("doc_string", "model_version", "domain"):
        setattr(target, field_name, getattr(source, field_name))
    target.graph.name, target.graph.doc_string = source.graph.name, source.graph.doc_string
    for values in ("input", "output"):
        originals = {v.name: v for v in getattr(source.graph, values)}
        for value in getattr(target.graph, values):
            original = originals.get(value.name)
            if original is not None:
                if values == "output" and keep_output_types:
                    value.type.CopyFrom(original.type)
                value.doc_string = original.doc_string
    del target.metadata_props[:]
    target.metadata_props.extend(p for p in source.metadata_props if not p.key.startswith(f"{PRODUCER}."))
    for key, value in stamp.items():
        target.metadata_props.add(key=f"{PRODUCER}.{key}", value=value)
    target.producer_name, target.producer_version = PRODUCER, __version__
