"""Models as users have them: each kind converts and runs in onnxruntime, close to float at W8."""

import numpy as np
import onnxruntime as ort
import pytest

from graphs import conv1d_conv3d_model, dynamic_size_model, feeds_for, matmul_left_model, mobile_model
from onnx_bitsplit import QuantConfig, quantize


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def sqnr_db(model, quantized, feeds, output=0):
    reference = np.concatenate([r[output].ravel() for r in run(model, feeds)])
    test = np.concatenate([r[output].ravel() for r in run(quantized, feeds)])
    noise = ((reference - test) ** 2).sum()
    return 10 * np.log10((reference ** 2).sum() / noise) if noise > 0 else np.inf


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_mobile_block(opset):
    model = mobile_model(opset)
    quantized, report = quantize(model, feeds_for(model, 24), QuantConfig(wbits=8))
    assert quantized.opset_import[0].version == 21
    assert [layer.name for layer in report.layers] == ["conv1", "depthwise", "pointwise", "project"]
    assert ("upsample", "ConvTranspose is kept in float") in report.skipped
    assert sqnr_db(model, quantized, feeds_for(model, 6, seed=9)) > 25
    w4, _ = quantize(model, feeds_for(model, 24), QuantConfig(wbits=4))
    assert sqnr_db(model, w4, feeds_for(model, 6, seed=9)) > 8


def test_conv1d_quantized_conv3d_kept_two_inputs():
    model = conv1d_conv3d_model()
    quantized, report = quantize(model, feeds_for(model, 16), QuantConfig(wbits=8))
    assert [layer.name for layer in report.layers] == ["conv1d_a", "conv1d_b", "gemm"]
    assert report.skipped == [("conv3d", "Conv3d is kept in float")]
    held_out = feeds_for(model, 6, seed=9)
    assert sqnr_db(model, quantized, held_out, output=0) > 25
    assert sqnr_db(model, quantized, held_out, output=1) > 100  # float, untouched


def test_constant_on_the_left_of_matmul():
    model = matmul_left_model()
    quantized, report = quantize(model, feeds_for(model, 16), QuantConfig(wbits=8))
    assert [(layer.name, layer.shape) for layer in report.layers] == [("left1", (24, 32, 1)), ("left2", (16, 24, 1))]
    assert sqnr_db(model, quantized, feeds_for(model, 6, seed=9)) > 25


def test_dynamic_spatial_size():
    model = dynamic_size_model()
    feeds = feeds_for(model, 12, sizes=[8, 12, 10])  # batches of different sizes cannot be stacked
    quantized, report = quantize(model, feeds, QuantConfig(wbits=8))
    assert report.calibration_samples == 12
    assert sqnr_db(model, quantized, feeds_for(model, 4, seed=9, sizes=[16, 6])) > 25
    assert not report.warnings


def test_one_calibration_size_of_a_dynamic_input_is_warned_about():
    model = dynamic_size_model()
    _, report = quantize(model, feeds_for(model, 6, sizes=[10]), QuantConfig(wbits=8))
    assert len(report.warnings) == 1 and "'x'" in report.warnings[0] and "8x10x10" in report.warnings[0]
    assert f"warning: {report.warnings[0]}" in report.summary()
    _, static = quantize(model, feeds_for(model, 6, sizes=[10]), QuantConfig(wbits=8, input_shapes={"x": (1, 8, 10, 10)}))
    assert not static.warnings  # a fixed shape runs at no other
