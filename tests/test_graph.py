"""Graph preparation and layer discovery."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from graphs import INPUT, calibration_feeds, conv_bn_model, conv_model, gemm_model, matmul_model
from onnx_bitsplit.errors import ModelError
from onnx_bitsplit.graph import OPSET, find_layers, non_negative_tensors, prepare


def run(model, feed):
    return ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]


@pytest.mark.parametrize("build", [conv_model, conv_bn_model, gemm_model, matmul_model])
def test_prepare_keeps_the_function(build):
    model = build()
    prepared = prepare(model)
    feed = calibration_feeds(model, count=1)[0]
    np.testing.assert_allclose(run(prepared, feed), run(model, feed), rtol=1e-4, atol=1e-5)
    assert prepared.opset_import[0].version == OPSET


def test_prepare_does_not_modify_its_input():
    model = conv_bn_model()
    before = model.SerializeToString()
    prepare(model)
    assert model.SerializeToString() == before


def test_batch_norm_and_constant_weights_are_folded():
    prepared = prepare(conv_bn_model())
    ops = [node.op_type for node in prepared.graph.node]
    assert "BatchNormalization" not in ops and "Constant" not in ops and "Identity" not in ops
    layers, skipped = find_layers(prepared)
    assert [layer.name for layer in layers] == ["conv1", "conv2"] and skipped == []
    assert all(layer.bias_name for layer in layers)  # a zero bias was added where none was


@pytest.mark.parametrize("trans_b,axis", [(1, 0), (0, 1)])
def test_gemm_layers_know_their_output_axis(trans_b, axis):
    prepared = prepare(gemm_model(trans_b))
    layers, _ = find_layers(prepared)
    assert [layer.axis for layer in layers] == [axis, axis]
    # alpha 0.5 and beta 2 of the second Gemm are folded into its weight and bias
    assert all({a.name for a in node.attribute} <= {"transA", "transB"} for node in prepared.graph.node)
    W = np.arange(24 * 32, dtype=np.float32).reshape((24, 32) if trans_b else (32, 24))
    matrix = layers[0].weight_matrix(W)
    assert matrix.shape == (1, 24, 32)
    np.testing.assert_array_equal(layers[0].stored_weight(matrix), W)


def test_grouped_conv_weight_matrix_round_trips():
    layers, _ = find_layers(prepare(conv_model(groups=4)))
    W = np.random.default_rng(0).normal(size=layers[1].weight_shape)
    matrix = layers[1].weight_matrix(W)
    assert matrix.shape == (4, 4, 4 * 9)
    np.testing.assert_array_equal(layers[1].stored_weight(matrix), W)


def test_non_negative_inputs_are_recognised():
    prepared = prepare(conv_model())
    layers, _ = find_layers(prepared)
    assert [layer.input_name in non_negative_tensors(prepared) for layer in layers] == [False, True, True]


def test_already_quantized_models_are_refused():
    model = conv_model()
    model.graph.node.append(helper.make_node("QuantizeLinear", ["y", "s"], ["yq"]))
    with pytest.raises(ModelError, match="already quantized"):
        prepare(model)


def test_non_constant_weights_are_kept_in_float():
    """
        x [N,4,4] -> MatMul(x, x) -> y     (no constant side: nothing to quantize)
    """
    graph = helper.make_graph([helper.make_node("MatMul", [INPUT, INPUT], ["y"], name="square")], "g",
                              [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, ["N", 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 4])])
    layers, skipped = find_layers(prepare(helper.make_model(graph)))
    assert layers == [] and skipped == [("square", "weight is not a constant")]
