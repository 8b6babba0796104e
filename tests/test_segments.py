"""Segments: the nodes between two layers as a runnable model, with the simulation's Q/DQ under
names of their own."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import batch_in_constants_model, conv_model, feeds_for, inverted_residual_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.act_scale import choose_quantizer
from onnx_bitsplit import capture
from onnx_bitsplit.capture import NetworkStreams
from onnx_bitsplit.graph import find_layers, prepare
from onnx_bitsplit.layout import plan_layout
from onnx_bitsplit.qdq_format import model_names
from onnx_bitsplit.errors import ModelError
from onnx_bitsplit.segments import Segment, last_uses, run_segment, segment_session
from onnx_bitsplit.store import BatchStore
from runs import outputs


def with_batch_of_one(model: onnx.ModelProto) -> onnx.ModelProto:
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return model


@pytest.mark.parametrize("build", [batch_in_constants_model, lambda: with_batch_of_one(inverted_residual_model())])
def test_a_fixed_batch_model_runs_one_batch_at_a_time_whatever_the_batch_size(build):
    """batch_in_constants_model mixes samples run at once without any shape error."""
    model = build()
    feeds = feeds_for(model, 24)
    one_at_a_time, _ = quantize(model, feeds, QuantConfig(batch_size=1))
    asked_for_eight, _ = quantize(model, feeds, QuantConfig(batch_size=8))
    np.testing.assert_array_equal(outputs(asked_for_eight, feeds), outputs(one_at_a_time, feeds))


def test_last_uses_golden():
    # conv1 (0) reads x, w1, b1; relu1 (1) c1; conv2 (2) r1, w2, b2; relu2 (3) c2; conv3 (4) r2, w3, b3
    assert last_uses(conv_model()) == {"x": 0, "w1": 0, "b1": 0, "c1": 1, "r1": 2, "w2": 2, "b2": 2, "c2": 3,
                                       "r2": 4, "w3": 4, "b3": 4, "y": 5}  # a graph output: past the end


def single_node_segment(op: str, inputs: list[str], constants: list[onnx.TensorProto], **attrs) -> Segment:
    graph = helper.make_graph([helper.make_node(op, ["x", *inputs], ["y"], **attrs)], "segment",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return Segment(model, 0, ["x"], ["y"], ["y"], ["y"], {})


def test_a_run_onnxruntime_refuses_names_the_segments_first_node():
    constants = [numpy_helper.from_array(np.array([5, -1], np.int64), "shape")]
    segment = single_node_segment("Reshape", ["shape"], constants, name="to_rows_of_5")
    with pytest.raises(ModelError, match="cannot run the nodes from 'to_rows_of_5' on the calibration data"):
        run_segment(segment_session(segment), segment, {"x": np.zeros((2, 3), np.float32)})


def test_the_simulations_names_are_unique_in_the_model(monkeypatch):
    """`{tensor}_float`, `_quantized`, `_scale`, `_zero_point`, `_half`: a name the model already
    holds gets the next free number, and no segment writes a name twice."""
    model = conv_model()
    for node in model.graph.node:  # the tensor conv2 writes becomes r2_float: the name r2's producer would get
        node.input[:] = ["r2_float" if name == "c2" else name for name in node.input]
        node.output[:] = ["r2_float" if name == "c2" else name for name in node.output]
    model = prepare(model)
    layers, _ = find_layers(model)
    store = BatchStore(2**30)
    batches = [{name: store.put(value) for name, value in feed.items()} for feed in feeds_for(model, 2, sizes=[12])]
    streams = NetworkStreams(model, layers, batches, store, layout=plan_layout(model, layers), compensate=True,
                             choose=lambda decision, values: choose_quantizer(decision, values, 8)[0])
    segments = []
    monkeypatch.setattr(capture, "segment_session",
                        lambda segment: segments.append(segment) or segment_session(segment))
    for index, layer in enumerate(layers):
        params = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                  if t.name in (layer.weight_name, layer.bias_name)}
        streams.advance(index, float_params=params, quant_params=params)
    generated = streams.builder.quantizer_names["r2"]
    assert (generated.float, generated.quantized, generated.scale, generated.zero_point) == (
        "r2_float_1", "r2_quantized", "r2_scale", "r2_zero_point")
    halves = streams.builder.half_names  # the float stream's float16 copies
    assert halves and all(half == f"{name}_half" for name, half in halves.items())
    assert segments
    for segment in segments:  # one producer per name
        produced = [name for node in segment.model.graph.node for name in node.output]
        assert len(produced) == len(set(produced)), produced
    taken = model_names(model.graph)
    for names in streams.builder.quantizer_names.values():
        assert taken.isdisjoint({names.float, names.quantized, names.scale, names.zero_point}), names
