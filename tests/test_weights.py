"""A solved layer as the file stores it: integers and per-channel scales in the weight's own
layout, and its bias as INT32 on the grid input scale x weight scale."""

import numpy as np
import onnx
import pytest

from graphs import gemm_model
from onnx_bitsplit.errors import ModelError
from onnx_bitsplit.graph import find_layers, prepare
from onnx_bitsplit.solver import BitSplitSolver
from onnx_bitsplit.weights import INT32_BIAS_LIMIT, WeightQuant, fit_int32_bias, weight_quant


def test_a_bias_too_large_for_its_grid_gets_a_coarser_weight_scale():
    rng = np.random.default_rng(0)
    q = rng.integers(-7, 8, (3, 16)).astype(np.int8)
    alpha = np.array([0.1, 0.1, 0.02], np.float32)
    bias = np.array([1.0, 1e9, -5.0], np.float32)
    input_scale = 1e-3
    fitted_q, fitted_alpha = fit_int32_bias(q, alpha, bias, input_scale)
    grid = (np.float32(input_scale) * fitted_alpha).astype(np.float32)  # as weight_quant computes it
    assert np.all(np.abs(np.rint(bias / grid)) <= np.iinfo(np.int32).max)
    assert np.abs(bias[1] / grid[1]) > INT32_BIAS_LIMIT / 2  # grown just enough, not more
    assert fitted_alpha[1] > 100 * alpha[1]  # 1e9 / (1e-3 x 0.1) = 1e13 steps: far over int32
    np.testing.assert_array_equal(fitted_q[[0, 2]], q[[0, 2]])  # the channels that fit are unchanged
    np.testing.assert_array_equal(fitted_alpha[[0, 2]], alpha[[0, 2]])
    np.testing.assert_array_equal(fitted_q[1], np.rint(q[1] * (alpha[1] / fitted_alpha[1])))  # rounded onto it
    assert fitted_q.dtype == np.int8 and fitted_alpha.dtype == np.float32
    same_q, same_alpha = fit_int32_bias(q, alpha, bias[[0, 0, 2]], input_scale)
    assert same_q is q and same_alpha is alpha  # nothing to grow: nothing copied


@pytest.fixture
def transposed_gemm():
    """The first layer of gemm_model(trans_b=0): a (32, 24) weight whose outputs run along axis 1."""
    model = prepare(gemm_model(trans_b=0))
    layers, _ = find_layers(model)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return layers[0], weights


def test_simulated_weights_scale_each_output_channel_in_the_stored_layout(transposed_gemm):
    layer, _ = transposed_gemm
    assert layer.axis == 1 and layer.weight_shape == (32, 24)
    rng = np.random.default_rng(0)
    q = rng.integers(-7, 8, (32, 24)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 24).astype(np.float32)
    bias, bias_scale = rng.integers(-1000, 1000, 24).astype(np.int32), rng.uniform(1e-4, 1e-3, 24).astype(np.float32)
    params = WeightQuant(layer, 4, q, scale, bias, bias_scale).simulated()
    np.testing.assert_array_equal(params[layer.weight_name], (q * scale[None, :]).astype(np.float32))
    np.testing.assert_array_equal(params[layer.bias_name], (bias * bias_scale).astype(np.float32))
    assert set(WeightQuant(layer, 4, q, scale).simulated()) == {layer.weight_name}  # no bias, none simulated


@pytest.mark.parametrize("bias_correction", [False, True])
def test_the_bias_is_stored_on_the_accumulators_grid(transposed_gemm, bias_correction):
    layer, weights = transposed_gemm
    W, float_bias = weights[layer.weight_name], weights[layer.bias_name]
    solver = BitSplitSolver(layer.weight_matrix(W))
    x = np.random.default_rng(0).normal(size=(1, 500, 32)).astype(np.float32)
    solver.add_batch(x + 0.3, x)  # a shifted quantized input: a bias shift to correct
    solution = solver.solve(4)
    stored = weight_quant(layer, solution, 4, float_bias=float_bias, bias_correction=bias_correction,
                          input_scale=0.05)
    expected_bias = float_bias + solution.bias_shift.reshape(-1) if bias_correction else float_bias
    np.testing.assert_array_equal(stored.bias_scale, np.float32(0.05) * solution.alpha.reshape(-1))
    np.testing.assert_array_equal(stored.bias, np.rint(expected_bias / stored.bias_scale).astype(np.int32))
    np.testing.assert_array_equal(layer.weight_matrix(stored.q), solution.q)  # back in the (32, 24) layout
    assert stored.bits == 4 and stored.q.shape == (32, 24)


def test_a_corrected_bias_that_is_not_finite_is_refused(transposed_gemm):
    layer, weights = transposed_gemm
    solver = BitSplitSolver(layer.weight_matrix(weights[layer.weight_name]))
    solver.add_batch(np.random.default_rng(0).normal(size=(1, 200, 32)).astype(np.float32))
    bias = weights[layer.bias_name].copy()
    bias[3] = np.inf
    with pytest.raises(ModelError, match=f"layer '{layer.name}'"):
        weight_quant(layer, solver.solve(4), 4, float_bias=bias, bias_correction=True, input_scale=0.05)
