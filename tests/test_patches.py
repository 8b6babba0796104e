"""Patch matrices reproduce onnxruntime's Conv exactly."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_bitsplit.patches import ConvGeometry, conv_patches, conv_positions, dense_patches

CASES = [  # channels, outputs, groups, kernel, stride, dilation, pads, auto_pad
    (4, 6, 1, 3, 1, 1, (1, 1, 1, 1), "NOTSET"),
    (6, 6, 6, 3, 2, 1, None, "SAME_UPPER"),
    (4, 4, 2, 3, 2, 2, (1, 0, 2, 1), "NOTSET"),
    (3, 5, 1, 5, 2, 1, None, "SAME_LOWER"),
    (3, 2, 1, 2, 1, 1, None, "VALID"),
]


def onnxruntime_conv(x, weight, attrs):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


@pytest.mark.parametrize("channels,outputs,groups,k,stride,dilation,pads,auto_pad", CASES)
def test_conv_patches_reproduce_conv(channels, outputs, groups, k, stride, dilation, pads, auto_pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, channels, 11, 9)).astype(np.float32)
    weight = rng.normal(size=(outputs, channels // groups, k, k)).astype(np.float32)
    attrs = dict(kernel_shape=[k, k], strides=[stride] * 2, dilations=[dilation] * 2, group=groups)
    attrs.update(pads=list(pads)) if auto_pad == "NOTSET" else attrs.update(auto_pad=auto_pad)
    expected = onnxruntime_conv(x, weight, attrs)

    geometry = ConvGeometry((k, k), (stride,) * 2, (dilation,) * 2, pads, auto_pad, groups)
    patches = conv_patches(x, geometry)
    W = weight.reshape(groups, outputs // groups, -1)
    assert patches.shape == (groups, expected[:, 0].size, W.shape[-1])
    np.testing.assert_allclose(conv_from_patches(patches, W, expected.shape), expected, atol=1e-4)


def conv_from_patches(patches, W, shape):
    """(g, B*Ho*Wo, N) @ (g, N, M/g) -> (B, M, Ho, Wo)."""
    batch, outputs, out_h, out_w = shape
    y = (patches @ W.transpose(0, 2, 1)).reshape(W.shape[0], batch, out_h, out_w, -1)
    return y.transpose(1, 0, 4, 2, 3).reshape(shape)


def test_dense_patches_flatten_leading_axes():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    patches = dense_patches(x)
    assert patches.shape == (1, 6, 4)
    np.testing.assert_array_equal(patches[0, 4], [16, 17, 18, 19])


def test_pointwise_grouped_conv_patches_reproduce_conv():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 5, 7)).astype(np.float32)
    weight = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    expected = onnxruntime_conv(x, weight, dict(kernel_shape=[1, 1], group=2))
    patches = conv_patches(x, ConvGeometry((1, 1), groups=2))
    assert patches.shape == (2, 70, 3) and patches.swapaxes(-1, -2).flags.c_contiguous  # BLAS-ready
    np.testing.assert_allclose(conv_from_patches(patches, weight.reshape(2, 2, 3), expected.shape), expected, atol=1e-4)


@pytest.mark.parametrize("channels,outputs,groups,k,stride,dilation,pads,auto_pad", CASES)
def test_patches_of_chosen_rows_are_those_rows_of_all_patches(channels, outputs, groups, k, stride, dilation,
                                                              pads, auto_pad):
    x = np.random.default_rng(1).normal(size=(3, channels, 11, 9)).astype(np.float32)
    geometry = ConvGeometry((k, k), (stride,) * 2, (dilation,) * 2, pads, auto_pad, groups)
    every = conv_patches(x, geometry)
    assert conv_positions(x.shape, geometry) == every.shape[1]
    rows = np.array([0, 5, every.shape[1] // 2, every.shape[1] - 1])
    np.testing.assert_array_equal(conv_patches(x, geometry, rows), every[:, rows])
    np.testing.assert_array_equal(dense_patches(x, rows[:2]), dense_patches(x)[:, rows[:2]])
    no_rows = np.array([], np.int64)  # a batch the sample takes no row from
    assert conv_patches(x, geometry, no_rows).shape == (groups, 0, every.shape[2])


@pytest.mark.parametrize("rows", [None, np.array([0, 7, 40, 97])])  # every row (a padded copy), a few (gathered)
def test_patches_of_integers_dequantize_to_the_patches_of_the_values(rows):
    codes = np.random.default_rng(2).integers(0, 256, (2, 3, 7, 7)).astype(np.uint8)
    scale, zero_point = np.float32(0.1), 128
    geometry = ConvGeometry((3, 3), pads=(1, 1, 1, 1))
    gathered = (conv_patches(codes, geometry, rows, pad_value=zero_point).astype(np.float32) - zero_point) * scale
    expected = conv_patches((codes.astype(np.float32) - zero_point) * scale, geometry, rows)
    np.testing.assert_allclose(gathered, expected, atol=1e-6)
