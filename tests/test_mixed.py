"""Bit allocation under a size budget (pure Python) and the budget mode end to end."""

import pytest

from graphs import calibration_feeds, conv_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.errors import BitsplitError
from onnx_bitsplit.mixed import LayerCost, allocate_bits, storage_bytes


def test_storage_bytes_golden():
    assert storage_bytes(weights=9, rows=1, bits=4) == 5 + 4  # 9 nibbles round up to 5 bytes
    assert storage_bytes(weights=9, rows=1, bits=3) == 5 + 4  # INT4 storage either way
    assert storage_bytes(weights=9, rows=1, bits=8) == 9 + 4


def test_upgrades_go_where_they_remove_most_error_per_byte():
    layers = [
        LayerCost("big", weights=1000, rows=10, errors={4: 0.10, 8: 0.01}),   # 0.09 for 500 bytes
        LayerCost("small", weights=100, rows=10, errors={4: 0.05, 8: 0.00}),  # 0.05 for 50 bytes
    ]
    base = storage_bytes(1000, 10, 4) + storage_bytes(100, 10, 4)
    assert allocate_bits(layers, budget=base)[0] == [4, 4]
    assert allocate_bits(layers, budget=base + 50)[0] == [4, 8]
    assert allocate_bits(layers, budget=base + 549)[0] == [4, 8]
    bits, reasons = allocate_bits(layers, budget=base + 550)
    assert bits == [8, 8] and "W4: 0.1000" in reasons[0]
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_bits(layers, budget=base - 1)


def test_budget_mode_respects_the_budget_and_reports_sensitivity():
    model = conv_model()
    feeds = calibration_feeds(model, 16)
    w4, _ = quantize(model, feeds, QuantConfig(wbits=4, first_last_wbits=None))
    w8, _ = quantize(model, feeds, QuantConfig(wbits=8, first_last_wbits=None))
    budget = (w4.ByteSize() + w8.ByteSize()) / 2 / model.ByteSize()
    quantized, report = quantize(model, feeds, QuantConfig(size_budget=budget))
    assert quantized.ByteSize() <= budget * model.ByteSize()
    assert {layer.bits for layer in report.layers} == {4, 8}  # room for some, not all, at 8 bits
    for layer in report.layers:
        assert set(layer.sensitivity) == {4, 8} and layer.sensitivity[8] < layer.sensitivity[4]
        assert layer.reason.startswith("size budget")
    with pytest.raises(BitsplitError, match="size budget"):
        quantize(model, feeds, QuantConfig(size_budget=0.01))


def test_budget_keeps_layer_overrides():
    model = conv_model()
    feeds = calibration_feeds(model, 8)
    _, report = quantize(model, feeds, QuantConfig(size_budget=0.9, layer_wbits={"conv2": 3}))
    assert [layer.bits for layer in report.layers] == [8, 3, 8]  # a generous budget: 8 bits where free
    assert report.layers[1].sensitivity == {}
