"""Bit allocation under a size budget (pure Python) and the budget mode end to end."""

import numpy as np
import pytest

from graphs import calibration_feeds, conv_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.errors import BitsplitError
from onnx_bitsplit.graph import find_layers, prepare
from onnx_bitsplit.mixed import BUDGET_BITS, LayerCost, allocate_bits, budget_bits
from onnx_bitsplit.qdq_format import weight_bytes


def int4_sizes(weights: int, rows: int) -> dict[int, int]:
    return {bits: weight_bytes(weights, rows, bits, "int4") for bits in (4, 8)}


def test_upgrades_go_where_they_remove_most_error_per_byte():
    layers = [
        LayerCost("big", errors={4: 0.10, 8: 0.01}, sizes=int4_sizes(1000, 10)),   # 0.09 for 500 bytes
        LayerCost("small", errors={4: 0.05, 8: 0.00}, sizes=int4_sizes(100, 10)),  # 0.05 for 50 bytes
    ]
    base = weight_bytes(1000, 10, 4, "int4") + weight_bytes(100, 10, 4, "int4")
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


def test_with_int8_storage_a_budget_below_the_int8_size_is_refused():
    """INT8 storage makes W4 cost as much as W8: a budget that INT4 storage meets with some 4-bit
    layers is below the smallest INT8 size, and one that meets it gets 8 bits everywhere."""
    layers, _ = find_layers(prepare(conv_model()))
    sensitivity = [{4: 0.1, 8: 0.01} for _ in layers]
    int8_size = sum(weight_bytes(int(np.prod(layer.weight_shape)), layer.weight_shape[layer.axis], 8, "int8")
                    for layer in layers)
    int4_config, int8_config = QuantConfig(weight_storage="int4"), QuantConfig(weight_storage="int8", size_budget=0.5)
    bits, _ = budget_bits(layers, sensitivity, int4_config, int8_size - 1)
    assert 4 in bits and 8 in bits
    with pytest.raises(BitsplitError, match="size budget 0.5: .*below the smallest possible size"):
        budget_bits(layers, sensitivity, int8_config, int8_size - 1)
    bits, reasons = budget_bits(layers, sensitivity, int8_config, int8_size)
    assert bits == [8] * len(layers) and all(reason.startswith("size budget: W8") for reason in reasons)
    assert BUDGET_BITS == (4, 8)


def test_size_budget_too_small(tmp_path, model_path, npy_dir, invoke, assert_one_line_error):
    assert_one_line_error(invoke(model_path, tmp_path / "q.onnx", "--calib", npy_dir, "--size-budget", "0.01"),
                          "size budget")
    assert not (tmp_path / "q.onnx").exists()
