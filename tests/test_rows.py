"""Patch rows as stored -> float32 in onnxruntime: numpy's results, bit for bit, in the same layout."""

import numpy as np
import pytest

from onnx_bitsplit.qdq_format import ActivationQuant
from onnx_bitsplit.rows import RowConverter


def numpy_conversion(x_tilde, quantizer, x, blend):
    """What the statistics computed before onnxruntime did it: dequantize, cast, blend."""
    values = x_tilde.astype(np.float32)
    if quantizer is not None:
        values -= np.float32(quantizer.zero_point)
        values *= np.float32(quantizer.scale)
    if x is None:
        return values, None
    x_values = x.astype(np.float32)
    if blend < 1:
        values = blend * values
        values += (1 - blend) * x_values
    return values, x_values


def stored_rows(rng, dtype, rows_last):
    """(2, 700, 9) rows, as a view of a (2, 9, 700) array (conv patches) or contiguous (dense)."""
    if np.issubdtype(dtype, np.integer):
        values = rng.integers(0, np.iinfo(dtype).max, size=(2, 9, 700)).astype(dtype)
    else:  # subnormals, large values and exact halves included
        values = (rng.standard_normal((2, 9, 700)) * 10.0 ** rng.integers(-8, 4, size=(2, 9, 700))).astype(dtype)
    return values.swapaxes(1, 2) if rows_last else np.ascontiguousarray(values.swapaxes(1, 2))


@pytest.mark.parametrize("rows_last", [True, False])
@pytest.mark.parametrize("stored, quantizer", [
    (np.uint8, ActivationQuant("t", 0.0371, 131)),
    (np.uint16, ActivationQuant("t", 3.1e-5, 30001, bits=16)),
    (np.float32, None),
])
@pytest.mark.parametrize("x_dtype, blend", [(np.float16, 0.5), (np.float32, 0.3), (np.float16, 1.0), (None, 1.0)])
def test_rows_convert_as_numpy_does(rows_last, stored, quantizer, x_dtype, blend):
    rng = np.random.default_rng(0)
    x_tilde = stored_rows(rng, stored, rows_last)
    x = None if x_dtype is None else stored_rows(rng, x_dtype, rows_last)
    got = RowConverter()(x_tilde, quantizer, x, blend)
    expected = numpy_conversion(x_tilde, quantizer, x, blend)
    for value, reference in zip(got, expected):
        if reference is None:
            assert value is None
            continue
        assert value.dtype == np.float32 and value.shape == reference.shape
        assert value.strides == reference.strides  # the Gram products round by the layout
        np.testing.assert_array_equal(value, reference)
