"""The float network and the partially quantized network, run side by side one segment at a time.

The prepared graph is cut before each quantized layer. Segment k holds the nodes from layer k up
to (not including) layer k+1; its inputs are the cached tensors at the cut (the frontier), its
outputs the tensors that later nodes read. Each segment is its own onnxruntime session with the
layer's weight and bias as inputs, so one session serves both streams: the float stream with the
float weights, the quantized stream with the solved ones. No pass ever restarts from the input,
and the cache holds only the frontier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .graph import LayerSpec

Batches = list[np.ndarray]


@dataclass(frozen=True)
class Segment:
    """Nodes [start, stop) of the topologically sorted graph, as a runnable model."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]


class NetworkStreams:
    """Two caches of frontier tensors, float and quantized, advanced layer by layer.

    Args:
        model: a prepared model (graph.prepare), topologically sorted.
        layers: its quantized layers, in graph order.
        batches: calibration feeds, one dict per batch.
        compensate: keep a separate quantized stream (error compensation); without it the
            quantized stream is the float stream.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[LayerSpec],
                 batches: list[dict[str, np.ndarray]], *, compensate: bool):
        self.model = model
        self.layers = layers
        self.compensate = compensate
        self.nodes = list(model.graph.node)
        position = {node.name: index for index, node in enumerate(self.nodes)}
        self.starts = [position[layer.name] for layer in layers]
        self.last_use = _last_uses(model)
        self.value_infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
        self.batch_count = len(batches)
        self.float_cache: dict[str, Batches] = {
            name: [batch[name] for batch in batches] for name in batches[0]}
        self._run(self._segment(0, self.starts[0]), self.float_cache, {})
        self.quant_cache = dict(self.float_cache) if compensate else self.float_cache

    def layer_inputs(self, index: int) -> tuple[Batches, Batches]:
        """(x_tilde, x): the input batches of layer `index` in the quantized and float streams."""
        name = self.layers[index].input_name
        return self.quant_cache[name], self.float_cache[name]

    def replace_quantized(self, tensor_name: str, batches: Batches) -> None:
        """Substitute a tensor's values in the quantized stream (e.g. fake-quantized)."""
        if self.compensate:
            self.quant_cache[tensor_name] = batches

    def advance(self, index: int, *, float_params: dict[str, np.ndarray],
                quant_params: dict[str, np.ndarray]) -> None:
        """Run segment `index` (layer `index` up to the next layer) on both streams.

        Args:
            float_params, quant_params: the layer's weight (and bias) by initializer name.
        """
        stop = self.starts[index + 1] if index + 1 < len(self.layers) else len(self.nodes)
        segment = self._segment(self.starts[index], stop, params=list(float_params))
        self._run(segment, self.float_cache, float_params)
        if self.compensate:
            self._run(segment, self.quant_cache, quant_params)
        for cache in (self.float_cache, self.quant_cache) if self.compensate else (self.float_cache,):
            for name in [n for n in cache if self.last_use.get(n, -1) < stop]:
                del cache[name]

    def _run(self, segment: Segment, cache: dict[str, Batches], params: dict[str, np.ndarray]) -> None:
        if not segment.outputs:
            return
        session = make_session(segment.model)
        results = [session.run(segment.outputs, {**{name: cache[name][i] for name in segment.inputs}, **params})
                   for i in range(self.batch_count)]
        for position, name in enumerate(segment.outputs):
            cache[name] = [result[position] for result in results]

    def _segment(self, start: int, stop: int, params: list[str] = ()) -> Segment:
        """Nodes [start, stop) as a model reading the frontier and `params`, writing what is read later."""
        nodes = self.nodes[start:stop]
        produced = {name for node in nodes for name in node.output}
        initializers = {t.name: t for t in self.model.graph.initializer}
        read = list(dict.fromkeys(name for node in nodes for name in node.input if name))
        inputs = [n for n in read if n not in produced and n not in initializers]
        outputs = [n for n in dict.fromkeys(o for node in nodes for o in node.output)
                   if self.last_use.get(n, -1) >= stop]
        param_inputs = [helper.make_tensor_value_info(name, initializers[name].data_type,
                                                      list(initializers[name].dims)) for name in params]
        graph = helper.make_graph(
            nodes, f"segment_{start}",
            [self._value_info(name) for name in inputs] + param_inputs,
            [self._value_info(name, typed=False) for name in outputs],
            [initializers[n] for n in read if n in initializers and n not in params],
        )
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        return Segment(model, inputs, outputs)

    def _value_info(self, name: str, typed: bool = True) -> onnx.ValueInfoProto:
        """The tensor's inferred type with its shape dropped (batch and sizes vary); for a frontier
        input with no inferred type, the cached data's."""
        info = self.value_infos.get(name)
        if info is not None and info.type.tensor_type.elem_type:
            return helper.make_tensor_value_info(name, info.type.tensor_type.elem_type, None)
        if typed:
            cached = self.float_cache.get(name)
            if cached:
                return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(cached[0].dtype), None)
            graph_input = next((i for i in self.model.graph.input if i.name == name), None)
            if graph_input is not None:
                return graph_input
        return onnx.ValueInfoProto(name=name)


def make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session that reports failures by exception only, not on the user's terminal."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _last_uses(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> index of the last node that reads it (graph outputs: past the end)."""
    last = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            last[name] = index
    for output in model.graph.output:
        last[output.name] = len(model.graph.node)
    return last
