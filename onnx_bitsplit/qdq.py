"""QDQ writing: the only place that adds QuantizeLinear/DequantizeLinear nodes to the output.

It writes what layout.py decided and capture.py simulated, in the format of qdq_format.py:
- weights as INT4 or INT8 initializers with a per-axis DequantizeLinear, zero points 0;
- biases of quantized layers as INT32 with scale = input scale x weight scale, zero point 0;
- each quantized tensor: one QuantizeLinear and one DequantizeLinear that all readers share
  (runtimes give each node unit its own copy; OpenVINO folds a Q/DQ pair only when the Q has one
  reader), and for a graph output a DequantizeLinear of its own that keeps the output's name;
  a removed Relu/Clip's quantizer reads the Relu/Clip's input;
- quantized constants (an Add's operand) as integer initializers with a per-tensor DequantizeLinear.
Only default-domain operators are used, at qdq_format.OPSET.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import __version__
from .layout import Layout
from .graph import LayerSpec, merge_defaults, split_defaults
from .qdq_format import (IR_VERSION, ActivationQuant, Names, QuantizerNames, dequantize_node, quantize_linear,
                         quantize_node, quantizer_constants, weight_dtype)
from .weights import WeightQuant

PRODUCER = "onnx-bitsplit"


def write_qdq(model: onnx.ModelProto, layout: Layout, weights: list[WeightQuant],
              quantizers: dict[str, ActivationQuant], *, weight_storage: str) -> onnx.ModelProto:
    """A copy of the prepared `model` with the quantizers inserted.

    Args:
        layout: the quantized tensors and constants.
        weights: every quantized layer.
        quantizers: the chosen quantizer of every tensor and constant of the layout.
        weight_storage: one of qdq_format.WEIGHT_STORAGE.
    """
    names = Names.of_model(model)
    model, defaults = split_defaults(model)
    with gs.logger.G_LOGGER.suppress():
        graph = gs.import_onnx(model)
        tensors = graph.tensors()
        nodes = {node.name: node for node in graph.nodes}
        for weight in weights:
            _quantize_weight(graph, names, nodes[weight.layer.name], weight, weight_storage)
        for name in layout.constants:
            _quantize_constant(graph, names, tensors[name], quantizers[name])
        for decision in layout.tensors.values():
            source = nodes[decision.removed_node].inputs[0] if decision.removed_node else None
            _quantize_activation(graph, names, tensors[decision.name], quantizers[decision.name], source)
        graph.cleanup().toposort()
        quantized = merge_defaults(gs.export_onnx(graph), defaults)
    quantized.ir_version = IR_VERSION
    return quantized


def bytes_besides_weights(model: onnx.ModelProto, layout: Layout, layers: list[LayerSpec], *,
                          weight_storage: str) -> int:
    """Bytes of the model write_qdq() writes, less its layers' weights as LayerSpec.stored_bytes
    counts them: measured by writing it once with placeholder 4-bit weights."""
    placeholders = []
    for layer in layers:
        ones = np.ones(layer.rows, np.float32)
        bias = np.zeros(layer.rows, np.int32) if layer.bias_name else None
        placeholders.append(WeightQuant(layer, 4, np.zeros(layer.weight_shape, np.int8), ones, bias, ones))
    quantizers = {name: ActivationQuant(name, 1.0) for name in [*layout.tensors, *layout.constants]}
    written = write_qdq(model, layout, placeholders, quantizers, weight_storage=weight_storage).ByteSize()
    return written - sum(layer.stored_bytes(4, weight_storage) for layer in layers)


def _add_node(graph: gs.Graph, node: onnx.NodeProto, tensors: dict[str, gs.Tensor]) -> None:
    """Append a node built by qdq_format, its tensors looked up by name in `tensors`."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    graph.nodes.append(gs.Node(node.op_type, node.name, attrs, inputs=[tensors[n] for n in node.input],
                               outputs=[tensors[n] for n in node.output]))


def _dequantize(graph: gs.Graph, names: Names, name: str, values: np.ndarray, scale: np.ndarray | float, dtype,
                axis: int | None = None, zero_point: int = 0) -> gs.Variable:
    """A DequantizeLinear of constant integers (one zero point per scale) and its output."""
    generated = QuantizerNames.allocate(names, name)
    scale, zero = quantizer_constants(generated, scale, zero_point, dtype)
    tensors = {generated.quantized: _integer_constant(generated.quantized, values.astype(dtype)),
               generated.scale: gs.Constant(generated.scale, scale),
               generated.zero_point: _integer_constant(generated.zero_point, zero),
               generated.dequantized: gs.Variable(generated.dequantized, np.float32, values.shape)}
    _add_node(graph, dequantize_node(generated, generated.dequantized, axis=axis), tensors)
    return tensors[generated.dequantized]


def _integer_constant(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, LazyValues(numpy_helper.from_array(values, name)))


def _quantize_weight(graph: gs.Graph, names: Names, node: gs.Node, weight: WeightQuant, storage: str) -> None:
    layer = weight.layer
    node.inputs[layer.weight_index] = _dequantize(graph, names, layer.weight_name, weight.q, weight.scale,
                                                  weight_dtype(weight.bits, storage), layer.axis)
    if weight.bias is not None and layer.bias_name:
        node.inputs[2] = _dequantize(graph, names, layer.bias_name, weight.bias, weight.bias_scale, np.int32, 0)


def _quantize_constant(graph: gs.Graph, names: Names, constant: gs.Constant, quantizer: ActivationQuant) -> None:
    values = quantize_linear(constant.values, quantizer.scale, quantizer.zero_point, quantizer.dtype)
    output = _dequantize(graph, names, constant.name, values, quantizer.scale, quantizer.dtype,
                         zero_point=quantizer.zero_point)
    for reader in list(constant.outputs):
        _replace_input(reader, constant, output)


def _quantize_activation(graph: gs.Graph, names: Names, tensor: gs.Variable, quantizer: ActivationQuant,
                         source: gs.Variable | None) -> None:
    """Q on `source` (the tensor itself, or a removed Relu/Clip's input), a DQ for each reader."""
    name = tensor.name
    generated = QuantizerNames.allocate(names, name)
    readers = list(tensor.outputs)
    if tensor in graph.outputs:  # the output keeps its name: the float tensor gives it up
        tensor.name = generated.float
        output = gs.Variable(name, np.float32, tensor.shape)
        graph.outputs[graph.outputs.index(tensor)] = output
    else:
        output = None
    scale, zero_point = quantizer_constants(generated, quantizer.scale, quantizer.zero_point, quantizer.dtype)
    tensors = {(source or tensor).name: source or tensor,
               generated.scale: gs.Constant(generated.scale, scale),
               generated.zero_point: gs.Constant(generated.zero_point, zero_point),
               generated.quantized: gs.Variable(generated.quantized, zero_point.dtype, tensor.shape)}
    _add_node(graph, quantize_node(generated, (source or tensor).name), tensors)
    if readers:
        tensors[generated.dequantized] = gs.Variable(generated.dequantized, np.float32, tensor.shape)
        _add_node(graph, dequantize_node(generated, generated.dequantized), tensors)
        for reader in readers:
            _replace_input(reader, tensor, tensors[generated.dequantized])
    if output is not None:
        tensors[name] = output
        _add_node(graph, dequantize_node(generated, name, generated.output_dequantize_node), tensors)


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


def stamped(model: onnx.ModelProto, key: str) -> str | None:
    """The value carry_metadata() stamped under `key` (e.g. "target"), or None (another producer's
    file, or one written before the key existed)."""
    return next((p.value for p in model.metadata_props if p.key == f"{PRODUCER}.{key}"), None)
