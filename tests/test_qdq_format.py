"""The QDQ format's rules: integer ranges, QuantizeLinear and DequantizeLinear as the ONNX
specification computes them (onnx.reference), stored weight sizes, unique generated names."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from graphs import INPUT, calibration_feeds, conv_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.qdq_format import (OPSET, ActivationQuant, Names, QuantizerNames, activation_dtype,
                                      dequantize_linear, fake_quant, model_names, quant_range, quantize_linear,
                                      weight_bytes)
from runs import model_sqnr_db


def int8_fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    """A signed int8 quantizer with zero point 0, round trip."""
    return dequantize_linear(quantize_linear(x, scale, 0, np.int8), scale, 0)


def reference_qdq(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None):
    """(QuantizeLinear(x), DequantizeLinear of that) by onnx.reference at OPSET."""
    attrs = {} if axis is None else {"axis": axis}
    zero = numpy_helper.from_array(zero_point, "z")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("q", zero.data_type, None), helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(scale, np.float32), "s"), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return ReferenceEvaluator(model).run(None, {"x": x})


def test_fake_quant_golden():
    x = np.array([0.0, 0.5, 1.5, 2.5, -2.5, 300.0, -300.0], np.float32)
    # rounding half to even, saturation at the int8 range
    np.testing.assert_array_equal(int8_fake_quant(x, 1.0), [0, 0, 2, 2, -2, 127, -128])
    np.testing.assert_array_equal(fake_quant(x, ActivationQuant("x", 2.0)), [0, 0, 2, 2, 0, 300, 0])


@pytest.mark.parametrize("signed", [True, False])
def test_fake_quant_matches_onnx_reference(signed):
    x = np.random.default_rng(0).normal(0, 3, 1000).astype(np.float32)
    scale = np.float32(0.037)
    zero = helper.make_tensor("z", TensorProto.INT8 if signed else TensorProto.UINT8, [], [0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = int8_fake_quant(x, float(scale)) if signed else fake_quant(x, ActivationQuant("x", float(scale)))
    np.testing.assert_array_equal(got, expected)


def test_quant_range():
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(8, False) == (0, 255)
    assert quant_range(4, True) == (-8, 7) and quant_range(16, False) == (0, 65535)


@pytest.mark.parametrize("dtype,zero_point,scale", [
    (np.uint8, 131, 0.037),
    (np.uint8, 128, 0.25),  # a power of two: x / scale is exact, so the halves are ties to round to even
    (np.uint16, 30001, 1.3e-4),
    (np.int8, 0, 0.037),
    (np.int8, -3, 0.25),
])
def test_quantize_and_dequantize_linear_are_onnxs_per_tensor(dtype, zero_point, scale):
    rng = np.random.default_rng(0)
    halves = (np.arange(-600, 600) + 0.5) * np.float32(scale)  # ties, and saturation at both ends
    x = np.concatenate([rng.normal(0, 3, 2000), halves]).astype(np.float32)
    expected_q, expected_y = reference_qdq(x, np.float32(scale), np.array(zero_point, dtype))
    q = quantize_linear(x, scale, zero_point, dtype)
    assert q.dtype == dtype
    np.testing.assert_array_equal(q, expected_q)
    np.testing.assert_array_equal(dequantize_linear(q, scale, zero_point), expected_y)


def test_quantize_and_dequantize_linear_are_onnxs_per_axis_int4():
    rng = np.random.default_rng(1)
    x = (rng.normal(0, 1, (6, 40)) * np.geomspace(0.1, 10, 6)[:, None]).astype(np.float32)
    scales = (np.abs(x).max(axis=1) / 10).astype(np.float32)  # the largest values saturate at -8 and 7
    expected_q, expected_y = reference_qdq(x, scales, np.zeros(6, ml_dtypes.int4), axis=0)
    q = quantize_linear(x, scales[:, None], 0, ml_dtypes.int4)
    assert q.dtype == ml_dtypes.int4 and q.astype(np.int8).min() == -8 and q.astype(np.int8).max() == 7
    np.testing.assert_array_equal(q.astype(np.int8), expected_q.astype(np.int8))
    np.testing.assert_array_equal(dequantize_linear(q, scales[:, None], 0), expected_y)


def test_activation_quantizers_are_unsigned():
    assert ActivationQuant("t", 0.1).dtype == np.uint8 == activation_dtype(8)
    assert ActivationQuant("t", 0.1, 30000, bits=16).dtype == np.uint16 == activation_dtype(16)


def test_weight_bytes_golden():
    assert weight_bytes(9, rows=1, bits=4, storage="int4") == 5 + 4  # 9 nibbles round up to 5 bytes
    assert weight_bytes(9, rows=1, bits=3, storage="int4") == 5 + 4  # INT4 storage either way
    assert weight_bytes(9, rows=1, bits=8, storage="int4") == 9 + 4
    assert weight_bytes(1000, rows=10, bits=2, storage="int4") == 500 + 40
    for bits in (2, 4, 8):  # INT8 storage: a byte a weight whatever the bits
        assert weight_bytes(9, rows=1, bits=bits, storage="int8") == 9 + 4
        assert weight_bytes(1000, rows=10, bits=bits, storage="int8") == 1000 + 40


def test_names_are_unique_against_every_name_in_the_model():
    """Tensors, nodes and subgraphs' names are all taken; a taken name gets the first free number."""
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z_scale"], name="inner")], "branch", [],
                               [helper.make_tensor_value_info("z_scale", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="x_zero_point"),
         helper.make_node("If", ["cond"], ["z"], name="branching", then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "x_scale"),
         numpy_helper.from_array(np.ones(1, np.float32), "x_scale_1")])
    model = helper.make_model(graph)
    assert {"x", "y", "z", "cond", "x_zero_point", "branching", "inner", "z_scale", "x_scale", "x_scale_1"} \
        == model_names(model.graph)
    names = Names.of_model(model)
    assert names.new("x", "scale") == "x_scale_2"  # x_scale and x_scale_1 are initializers
    assert names.new("x", "scale") == "x_scale_3"  # and a name given out is taken too
    assert names.new("x", "zero_point") == "x_zero_point_1"  # a node's name
    assert names.new("z", "scale") == "z_scale_1"  # a subgraph's tensor
    assert names.new("y", "scale") == "y_scale"
    generated = QuantizerNames.allocate(names, "y")
    fields = [generated.scale, generated.zero_point, generated.quantized, generated.dequantized, generated.float,
              generated.quantize_node, generated.dequantize_node, generated.output_dequantize_node]
    assert generated.scale == "y_scale_1" and generated.quantized == "y_quantized"
    assert len(set(fields)) == len(fields) and not set(fields) & model_names(model.graph)


def test_a_quantized_tensor_whose_scale_name_is_taken_gets_another():
    """A model with a tensor named `x_scale` (here the first weight) whose input `x` is quantized:
    x's quantizer takes the next free name, the weight keeps its own, the model is valid."""
    model = conv_model()
    for tensor in model.graph.initializer:
        if tensor.name == "w1":
            tensor.name = "x_scale"
    model.graph.node[0].input[1] = "x_scale"
    quantized, _ = quantize(model, calibration_feeds(model, 8), QuantConfig(wbits=8))
    onnx.checker.check_model(quantized, full_check=True)
    quantize_x = next(node for node in quantized.graph.node if node.op_type == "QuantizeLinear" and node.input[0] == INPUT)
    assert quantize_x.input[1] == "x_scale_1"
    weight = next(node for node in quantized.graph.node if node.output[0] == "x_scale_dequantized")
    assert weight.op_type == "DequantizeLinear" and weight.input[:2] == ["x_scale_quantized", "x_scale_scale"]
    names = [t.name for t in quantized.graph.initializer] + [n.name for n in quantized.graph.node]
    assert len(names) == len(set(names))
    assert model_sqnr_db(model, quantized, calibration_feeds(model, 4, seed=7)) > 25
