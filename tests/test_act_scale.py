"""Activation scales and fake quantization against hand-computed values and onnx.reference."""

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnx_bitsplit.act_scale import fake_quant, minmax_affine, mse_scale, quant_range


def test_fake_quant_golden():
    x = np.array([0.0, 0.5, 1.5, 2.5, -2.5, 300.0, -300.0], np.float32)
    # rounding half to even, saturation at the int8 range
    np.testing.assert_array_equal(fake_quant(x, 1.0, 8, signed=True), [0, 0, 2, 2, -2, 127, -128])
    np.testing.assert_array_equal(fake_quant(x, 2.0, 8, signed=False), [0, 0, 2, 2, 0, 300, 0])


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
    np.testing.assert_array_equal(fake_quant(x, float(scale), 8, signed), expected)


def test_quant_range():
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(8, False) == (0, 255)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("distribution", ["normal", "student_t", "relu_laplace"])
def test_mse_scale_matches_a_brute_force_search(signed, distribution):
    rng = np.random.default_rng(0)
    x = {"normal": lambda: rng.normal(size=50_000),
         "student_t": lambda: rng.standard_t(df=2, size=50_000),
         "relu_laplace": lambda: np.maximum(rng.laplace(size=50_000), 0)}[distribution]()

    def error(scale):
        return ((x - fake_quant(x, scale, 8, signed)) ** 2).sum()

    peak = np.abs(x).max() if signed else x.max()
    brute_force = min(error(s) for s in peak / 127 * np.linspace(0.01, 1.0, 2000))
    assert error(mse_scale(x, 8, signed)) <= 1.05 * brute_force  # the error is jagged in s


def test_mse_scale_is_exact_on_grid_values():
    x = np.arange(0, 256) * 0.25
    assert mse_scale(x, 8, signed=False) == pytest.approx(0.25)


def test_mse_scale_of_zeros_is_finite():
    assert mse_scale(np.zeros(10), 8, signed=True) == 1.0


def test_minmax_affine_clips_nothing():
    x = np.array([-2.0, 0.5, 6.0, 3.0])
    scale, zero_point = minmax_affine(x, 8)
    assert scale == pytest.approx(8.0 / 255) and zero_point == 64  # round(2 / (8/255)) = round(63.75)
    np.testing.assert_allclose(fake_quant(x, scale, 8, False, zero_point), x, atol=scale / 2 + 1e-6)
    assert minmax_affine(np.array([0.0, 4.0]), 8) == (pytest.approx(4.0 / 255), 0)
