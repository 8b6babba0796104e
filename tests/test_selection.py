"""Which layers get which bits, and which stay in float: first and last layer, depthwise layers,
patterns by name, operator type or kind; a pattern that selects nothing is an error."""

import pytest

from graphs import calibration_feeds, conv_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.errors import BitsplitError


def test_first_and_last_layer_bits_and_overrides():
    model = conv_model()
    _, report = quantize(model, calibration_feeds(model, count=4), QuantConfig(wbits=3))
    assert [layer.bits for layer in report.layers] == [8, 3, 8]
    _, report = quantize(model, calibration_feeds(model, count=4),
                         QuantConfig(wbits=3, first_last_wbits=None, layer_wbits={"conv2": 5}))
    assert [layer.bits for layer in report.layers] == [3, 5, 3]
    _, report = quantize(model, calibration_feeds(model, count=4),
                         QuantConfig(wbits=3, layer_wbits={"conv*": 4, "conv3": 6}))
    assert [layer.bits for layer in report.layers] == [4, 4, 6]  # the exact name wins


def test_depthwise_layers_keep_8_bits_unless_asked():
    model = conv_model(groups=16)
    feeds = calibration_feeds(model, count=4)
    _, report = quantize(model, feeds, QuantConfig(wbits=3, first_last_wbits=None))
    assert [layer.bits for layer in report.layers] == [3, 8, 3]
    _, report = quantize(model, feeds, QuantConfig(wbits=3, first_last_wbits=None, depthwise_wbits=None))
    assert [layer.bits for layer in report.layers] == [3, 3, 3]
    _, report = quantize(model, feeds, QuantConfig(wbits=3, first_last_wbits=None, depthwise_wbits=None,
                                                   layer_wbits={"@depthwise": 5}))
    assert [layer.bits for layer in report.layers] == [3, 5, 3]


def test_excluded_layers_stay_float_and_patterns_must_match():
    model = conv_model(groups=16)
    feeds = calibration_feeds(model, count=4)
    quantized, report = quantize(model, feeds, QuantConfig(wbits=4, exclude=("conv2",)))
    assert [layer.name for layer in report.layers] == ["conv1", "conv3"]
    assert ("conv2", "excluded by 'conv2'") in report.skipped
    conv2 = next(n for n in quantized.graph.node if n.name == "conv2")
    assert "w2" in conv2.input  # its float weight, read directly
    with pytest.raises(BitsplitError, match="selects no node"):
        quantize(model, feeds, QuantConfig(exclude=("conv9",)))
    with pytest.raises(BitsplitError, match="selects none"):
        quantize(model, feeds, QuantConfig(layer_wbits={"conv_2": 3}))
    with pytest.raises(BitsplitError, match="no layer to quantize"):
        quantize(model, feeds, QuantConfig(exclude=("op:Conv",)))
    _, report = quantize(model, feeds, QuantConfig(wbits=3, layer_wbits={"op:Conv": 5}))
    assert [layer.bits for layer in report.layers] == [5, 5, 5]


@pytest.mark.parametrize("excluded", [False, True])
def test_any_node_can_be_excluded_and_then_reads_and_writes_float(excluded):
    """matmul_model's last node, Add(m2, b2) -> y: as a node unit its constant and its output are
    quantized; excluded, it adds the float bias to the dequantized product and writes y in float,
    while matmul2 keeps its output quantizer."""
    from graphs import matmul_model

    model = matmul_model()
    exclude = ("op:Add",) if excluded else ()
    quantized, report = quantize(model, calibration_feeds(model, count=16), QuantConfig(wbits=8, exclude=exclude))
    assert [layer.name for layer in report.layers] == ["matmul1", "matmul2"]
    produced = {output: node.op_type for node in quantized.graph.node for output in node.output}
    add = next(node for node in quantized.graph.node if node.op_type == "Add")
    assert produced["y"] == ("Add" if excluded else "DequantizeLinear")
    assert ("b2" in add.input) is excluded  # the float bias, or its dequantized integers
    assert produced[add.input[0]] == "DequantizeLinear"  # matmul2's output quantizer either way
