"""Segments of a prepared graph as runnable models, and their runs over calibration batches.

A segment is nodes [start, stop) of the topologically sorted graph. Its inputs are the tensors at
the cut that earlier nodes produced (the frontier), its outputs the tensors that later nodes read
plus any asked for. It comes in the two forms the streams store their tensors in:
- float: the tensors the layout quantizes are stored as float16 (a rounding error 2^-11 of the
  value, far below an 8-bit quantizer's step); onnxruntime's Cast converts them, 10x faster than
  numpy and with the same rounding. A tensor whose values overflow float16 (an attention mask's
  -3.4e38, a power spectrum) is stored as float32 (store_float32);
- quantized: each tensor the layout quantizes goes through QuantizeLinear and DequantizeLinear
  (qdq_format) before anything reads it, and is stored as its integers; inputs quantized earlier
  are read as integers and dequantized; quantized constants replace the float ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from .errors import ModelError, first_line
from .layout import Layout
from .modelio import node_reads
from .providers import make_session
from .qdq_format import ActivationQuant, Names, QuantizerNames, dequantize_node, quantize_node, quantizer_constants

RUN_ERRORS = (Fail, InvalidArgument, RuntimeException)  # what onnxruntime raises for a run it cannot do


@dataclass(frozen=True)
class Segment:
    """Nodes [start, stop) as a runnable model.

    Attributes:
        inputs: the tensors it reads; fed under their stored names (`coded`).
        outputs: the tensors it writes, one per graph output (a tensor may be written twice:
            stored, and as float for its value samples).
        fetches: the graph output of each of `outputs`: the tensor's name, or its stored name.
        kept: the outputs that later nodes read.
        coded: tensor -> the name of its stored form (integers, or float16 in the float stream).
    """

    model: onnx.ModelProto
    start: int
    inputs: list[str]
    outputs: list[str]
    fetches: list[str]
    kept: list[str]
    coded: dict[str, str]


class SegmentBuilder:
    """Builds the segments of one prepared, topologically sorted model.

    Args:
        layout: the quantized tensors.
        last_use: tensor name -> index of the last node that reads it (last_uses()).
        cached_dtype: the stored type of a frontier tensor that shape inference left untyped.
    """

    def __init__(self, model: onnx.ModelProto, layout: Layout, last_use: dict[str, int],
                 cached_dtype: Callable[[str], np.dtype | None]):
        self.model = model
        self.layout = layout
        self.last_use = last_use
        self.cached_dtype = cached_dtype
        self.nodes = list(model.graph.node)
        self.value_infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.graph_inputs = {i.name: i for i in model.graph.input}
        self.names = Names.of_model(model)
        self.quantizer_names: dict[str, QuantizerNames] = {}
        self.half_names: dict[str, str] = {}
        self.float32_stored: set[str] = set()

    def float_segment(self, start: int, stop: int, params: dict[str, np.ndarray],
                      extra_outputs: set[str]) -> Segment:
        """The float form, with `params` (initializer name -> value) for the layer's weight and
        bias, also writing `extra_outputs` as float32."""
        nodes, inputs, kept, constants = self._cut(start, stop, params)
        coded = {name: self._half_name(name) for name in inputs + kept if self._stored_half(name)}
        nodes = ([helper.make_node("Cast", [coded[name]], [name], to=TensorProto.FLOAT) for name in inputs
                  if name in coded] + nodes
                 + [helper.make_node("Cast", [name], [coded[name]], to=TensorProto.FLOAT16) for name in kept
                    if name in coded])
        outputs = kept + sorted(extra_outputs - {name for name in kept if name not in coded})
        fetches = [coded.get(name, name) for name in kept] + outputs[len(kept):]
        input_infos = [_untyped_info(coded[name], np.float16) if name in coded else self._value_info(name)
                       for name in inputs]
        output_infos = [_untyped_info(fetch, np.float16) if fetch != name else self._value_info(name, typed=False)
                        for name, fetch in zip(outputs, fetches)]
        return self._segment(start, nodes, constants, inputs, outputs, fetches, kept, coded, input_infos, output_infos)

    def quantized_segment(self, start: int, stop: int, params: dict[str, np.ndarray], *,
                          written: list[ActivationQuant], quantizers: dict[str, ActivationQuant],
                          quantized_constants: dict[str, onnx.TensorProto]) -> Segment:
        """The quantized form, with `params` for the layer's weight and bias.

        Args:
            written: the quantizers of the tensors the segment produces.
            quantizers: every quantizer chosen so far (those of its inputs among them).
            quantized_constants: the layout's constants on their quantizers' grids, by name.
        """
        nodes, inputs, kept, constants = self._cut(start, stop, params)
        read = [quantizers[name] for name in inputs if name in quantizers]
        produced = {q.tensor_name: q for q in written}
        nodes = [dequantize_node(self._names(q.tensor_name), q.tensor_name) for q in read] + self._with_quantizers(
            nodes, produced)
        constants = [quantized_constants.get(c.name, c) for c in constants]
        constants += [tensor for q in read + written for tensor in self._quantizer_constants(q)]
        coded = {q.tensor_name: self._names(q.tensor_name).quantized for q in read}
        coded.update({name: self._names(name).quantized for name in kept if name in produced})
        stored = {**{q.tensor_name: q for q in read}, **produced}
        input_infos = [_untyped_info(coded[name], stored[name].dtype) if name in coded else self._value_info(name)
                       for name in inputs]
        output_infos = [_untyped_info(coded[name], stored[name].dtype) if name in coded
                        else self._value_info(name, typed=False) for name in kept]
        fetches = [coded.get(name, name) for name in kept]
        return self._segment(start, nodes, constants, inputs, kept, fetches, kept, coded, input_infos, output_infos)

    def _cut(self, start: int, stop: int, params: dict[str, np.ndarray]):
        """(nodes, frontier inputs, outputs later nodes read, constants with `params` in place)."""
        nodes = self.nodes[start:stop]
        produced = {name for node in nodes for name in node.output}
        read = list(dict.fromkeys(name for node in nodes for name in node_reads(node)))
        inputs = [n for n in read if n not in produced and n not in self.initializers]
        kept = [n for n in dict.fromkeys(o for node in nodes for o in node.output) if self.last_use.get(n, -1) >= stop]
        constants = [self.initializers[n] for n in read if n in self.initializers and n not in params]
        constants += [numpy_helper.from_array(value, name) for name, value in params.items()]
        return nodes, inputs, kept, constants

    def _segment(self, start, nodes, constants, inputs, outputs, fetches, kept, coded, input_infos,
                 output_infos) -> Segment:
        graph = helper.make_graph(nodes, f"segment_{start}", input_infos, output_infos, constants)
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        return Segment(model, start, inputs, outputs, fetches, kept, coded)

    def _with_quantizers(self, nodes: list[onnx.NodeProto], produced: dict[str, ActivationQuant]) -> list[onnx.NodeProto]:
        """The nodes with each quantized tensor renamed at its producer and restored by a Q/DQ pair."""
        result = []
        for node in nodes:
            outputs = [name for name in node.output if name in produced]
            if not outputs:
                result.append(node)
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.output[:] = [self._names(name).float if name in produced else name for name in node.output]
            result.append(copy)
            for name in outputs:
                names = self._names(name)
                result += [quantize_node(names, names.float), dequantize_node(names, name)]
        return result

    def _quantizer_constants(self, quantizer: ActivationQuant) -> list[onnx.TensorProto]:
        names = self._names(quantizer.tensor_name)
        scale, zero_point = quantizer_constants(names, quantizer.scale, quantizer.zero_point, quantizer.dtype)
        return [numpy_helper.from_array(scale, names.scale), numpy_helper.from_array(zero_point, names.zero_point)]

    def _names(self, tensor: str) -> QuantizerNames:
        if tensor not in self.quantizer_names:
            self.quantizer_names[tensor] = QuantizerNames.allocate(self.names, tensor)
        return self.quantizer_names[tensor]

    def _half_name(self, tensor: str) -> str:
        if tensor not in self.half_names:
            self.half_names[tensor] = self.names.new(tensor, "half")
        return self.half_names[tensor]

    def store_float32(self, names: list[str]) -> None:
        """Store these tensors as float32 in the float stream from now on: their values overflow float16."""
        self.float32_stored.update(names)

    def _stored_half(self, name: str) -> bool:
        """Whether the float stream stores the tensor as float16: a float32 tensor that the layout
        quantizes, produced inside the graph (calibration inputs are stored as given), unless its
        values overflow float16 (store_float32)."""
        info = self.value_infos.get(name)
        return (name in self.layout.tensors and name not in self.graph_inputs and name not in self.float32_stored
                and info is not None and info.type.tensor_type.elem_type == TensorProto.FLOAT)

    def _value_info(self, name: str, typed: bool = True) -> onnx.ValueInfoProto:
        """The tensor's inferred type with its shape dropped (batch and sizes vary); for a frontier
        input with no inferred type, the cached data's."""
        info = self.value_infos.get(name)
        if info is not None and info.type.tensor_type.elem_type:
            return helper.make_tensor_value_info(name, info.type.tensor_type.elem_type, None)
        if typed:
            dtype = self.cached_dtype(name)
            if dtype is not None:
                return _untyped_info(name, dtype)
            if name in self.graph_inputs:
                return self.graph_inputs[name]
        return onnx.ValueInfoProto(name=name)


def _untyped_info(name: str, dtype) -> onnx.ValueInfoProto:
    """A value info of the type, with no shape."""
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)


def last_uses(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> index of the last node that reads it, subgraphs' reads included (graph
    outputs: past the end)."""
    last = {}
    for index, node in enumerate(model.graph.node):
        for name in node_reads(node):
            last[name] = index
    for output in model.graph.output:
        last[output.name] = len(model.graph.node)
    return last


def segment_session(segment: Segment):
    """A segment's onnxruntime session. No spinning: between runs the main thread copies and samples
    the outputs, and spinning workers would take the cores from it."""
    return make_session(segment.model, qdq_fusion=False, spinning=False)


def run_segment(session, segment: Segment, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The segment's fetches on one batch; a run onnxruntime refuses names the nodes."""
    try:
        return session.run(segment.fetches, feed)
    except RUN_ERRORS as exc:
        named = [node.name for node in segment.model.graph.node if node.name]
        where = f"the nodes from '{named[0]}'" if named else "the model"
        raise ModelError(f"onnxruntime cannot run {where} on the calibration data: {first_line(exc)}") from None
