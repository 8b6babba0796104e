"""Activation quantizers: MSE-optimal scales against brute force and hand-computed values, and
the choice of a tensor's quantizer from its layout decision."""

import numpy as np
import pytest

from onnx_bitsplit.act_scale import MIN_RANGE, choose_quantizer, minmax_affine, mse_scale
from onnx_bitsplit.errors import ModelError
from onnx_bitsplit.layout import TensorQuant
from onnx_bitsplit.qdq_format import ActivationQuant, dequantize_linear, fake_quant, quantize_linear


def symmetric_fake_quant(x: np.ndarray, scale: float, signed: bool) -> np.ndarray:
    """int8 or uint8 with zero point 0, round trip: the quantizers mse_scale searches."""
    q = quantize_linear(x, scale, 0, np.int8 if signed else np.uint8)
    return dequantize_linear(q, scale, 0)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("distribution", ["normal", "student_t", "relu_laplace"])
def test_mse_scale_matches_a_brute_force_search(signed, distribution):
    rng = np.random.default_rng(0)
    x = {"normal": lambda: rng.normal(size=50_000),
         "student_t": lambda: rng.standard_t(df=2, size=50_000),
         "relu_laplace": lambda: np.maximum(rng.laplace(size=50_000), 0)}[distribution]()

    def error(scale):
        return ((x - symmetric_fake_quant(x, scale, signed)) ** 2).sum()

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
    np.testing.assert_allclose(fake_quant(x, ActivationQuant("x", scale, zero_point)), x, atol=scale / 2 + 1e-6)
    assert minmax_affine(np.array([0.0, 4.0]), 8) == (pytest.approx(4.0 / 255), 0)


def relative_error(values: np.ndarray, quantizer: ActivationQuant) -> float:
    residual = values - fake_quant(values, quantizer)
    return float(residual @ residual / (values @ values))


@pytest.mark.parametrize("low,high,scale,zero_point", [(0.0, 1.0, 1 / 256, 0), (-1.0, 1.0, 2 / 256, 128)])
def test_a_bounded_operator_gets_exactly_its_range(low, high, scale, zero_point):
    """Sigmoid [0, 1] and Tanh [-1, 1] as QNN and onnxruntime's quantizer span them, whatever
    the calibration values cover."""
    values = np.random.default_rng(0).uniform(0.2, 0.6, 1000)
    quantizer, error = choose_quantizer(TensorQuant("t", signed=low < 0, fixed_range=(low, high)), [values], 8)
    assert quantizer == ActivationQuant("t", pytest.approx(scale), zero_point, 8)
    assert error == pytest.approx(relative_error(values, quantizer))


def test_a_non_negative_tensor_has_zero_point_zero_and_saturates_where_its_clip_did():
    values = np.random.default_rng(0).uniform(0, 10, 5000)
    free, _ = choose_quantizer(TensorQuant("t", signed=False), [values], 8)
    clipped, _ = choose_quantizer(TensorQuant("t", signed=False, upper_bound=6.0), [values], 8)
    assert free.zero_point == clipped.zero_point == 0
    assert free.scale * 255 > 6.0 and clipped.scale * 255 <= 6.0


def test_signed_and_graph_output_tensors_get_a_zero_point():
    rng = np.random.default_rng(0)
    values = [rng.normal(1.0, 1.0, 2000), rng.normal(1.0, 1.0, 2000)]  # samples of two batches
    signed, signed_error = choose_quantizer(TensorQuant("t", signed=True), values, 8)
    output, _ = choose_quantizer(TensorQuant("t", signed=True, full_range=True), values, 8)
    wide, _ = choose_quantizer(TensorQuant("t", signed=True), values, 16)
    assert 0 < signed.zero_point < 255 and signed.dtype == np.uint8 and wide.dtype == np.uint16
    everything = np.concatenate(values)
    assert signed_error == pytest.approx(relative_error(everything, signed))
    assert (output.scale, output.zero_point) == minmax_affine(everything, 8)  # a graph output: nothing clipped
    assert relative_error(everything, wide) < relative_error(everything, signed) / 100


def test_a_nearly_constant_tensor_gets_the_narrowest_range_runtimes_accept():
    quantizer, _ = choose_quantizer(TensorQuant("t", signed=False), [np.full(100, 1e-7)], 8)
    assert quantizer.scale * 255 == pytest.approx(MIN_RANGE) and quantizer.zero_point == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused_naming_the_tensor(bad):
    values = np.ones(100)
    values[7] = bad
    with pytest.raises(ModelError, match="tensor 'c1' has NaN or infinite values"):
        choose_quantizer(TensorQuant("c1", signed=False), [np.ones(10), values], 8)
