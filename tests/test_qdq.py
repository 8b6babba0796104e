"""The QDQ writer: INT4/INT8 weights with per-channel scales, INT32 biases on the accumulator's
grid, uint8/uint16 activations, a model onnx.reference and onnxruntime agree on, what the float
model carried carried over, and the bytes it writes besides the weights."""

import json

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from graphs import calibration_feeds, conv_model, gemm_model, inverted_residual_model, matmul_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.graph import find_layers, prepare
from onnx_bitsplit.layout import plan_layout
from onnx_bitsplit.qdq import bytes_besides_weights, write_qdq
from onnx_bitsplit.qdq_format import ActivationQuant, weight_bytes
from onnx_bitsplit.weights import WeightQuant
from runs import outputs, sqnr_db

BUILDERS = {
    "conv": conv_model,
    "depthwise_conv": lambda: conv_model(groups=16),
    "gemm": gemm_model,
    "matmul": matmul_model,
}


@pytest.mark.parametrize("kind", BUILDERS)
def test_w4_stores_int4_weights_with_per_channel_scales_and_int32_biases(kind):
    model = BUILDERS[kind]()
    quantized, report = quantize(model, calibration_feeds(model),
                                 QuantConfig(wbits=4, first_last_wbits=None, depthwise_wbits=None))
    initializers = {t.name: t for t in quantized.graph.initializer}
    producers = {output: node for node in quantized.graph.node for output in node.output}
    quantized_layers = [n for n in quantized.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(quantized_layers) == len(report.layers)
    for node in quantized_layers:
        activation, weight, *bias = [producers[name] for name in node.input]
        assert all(dq.op_type == "DequantizeLinear" for dq in (activation, weight, *bias))
        weight_scale = onnx.numpy_helper.to_array(initializers[weight.input[1]])
        assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT4
        assert weight_scale.shape == (initializers[weight.input[0]].dims[weight.attribute[0].i],)
        if bias:  # int32 on the accumulator's grid: input scale x weight scale
            input_scale = onnx.numpy_helper.to_array(initializers[activation.input[1]])
            assert initializers[bias[0].input[0]].data_type == onnx.TensorProto.INT32
            np.testing.assert_allclose(onnx.numpy_helper.to_array(initializers[bias[0].input[1]]),
                                       input_scale * weight_scale, rtol=1e-6)
    assert all(0 < error < 1e-3 for error in report.activations.values())  # 8 bits: ~40 dB or better
    held_out = calibration_feeds(model, count=8, seed=7)
    assert sqnr_db(outputs(model, held_out), outputs(quantized, held_out)) > 10


def test_int8_storage_writes_the_same_4_bit_values_as_int8():
    model = conv_model()
    config = dict(wbits=4, first_last_wbits=None)
    int4, _ = quantize(model, calibration_feeds(model, 8), QuantConfig(**config))
    int8, _ = quantize(model, calibration_feeds(model, 8), QuantConfig(weight_storage="int8", **config))

    def weights(quantized):
        initializers = {t.name: t for t in quantized.graph.initializer}
        return {name: initializers[name] for name in (f"w{i}_quantized" for i in (1, 2, 3))}

    for name, tensor in weights(int8).items():
        assert tensor.data_type == onnx.TensorProto.INT8, name
        values = onnx.numpy_helper.to_array(tensor)
        assert values.min() >= -8 and values.max() <= 7
        np.testing.assert_array_equal(values, onnx.numpy_helper.to_array(weights(int4)[name]).astype(np.int8))
    assert int8.ByteSize() > int4.ByteSize()


def test_onnx_reference_agrees_with_onnxruntime():
    model = conv_model(groups=4)
    quantized, _ = quantize(model, calibration_feeds(model), QuantConfig(wbits=4))
    feed = calibration_feeds(model, count=1, seed=3)[0]
    expected = ReferenceEvaluator(quantized).run(None, feed)[0]
    actual = outputs(quantized, [feed])
    # onnxruntime runs QDQ with integer kernels; a tie rounded differently moves a value one step
    assert np.abs(actual - expected).max() < 0.02 * np.abs(expected).max()
    assert sqnr_db(expected, actual) > 35


def test_16_bit_activations_are_uint16_and_closer_to_float():
    model = conv_model()
    held_out = calibration_feeds(model, count=8, seed=7)
    errors = {}
    for abits in (8, 16):
        quantized, _ = quantize(model, calibration_feeds(model), QuantConfig(wbits=8, abits=abits))
        # activation zero points are scalars; weights' and biases' have one entry per channel
        zero_points = [t for t in quantized.graph.initializer if t.name.endswith("_zero_point") and t.dims == []]
        expected = {8: onnx.TensorProto.UINT8, 16: onnx.TensorProto.UINT16}[abits]
        assert zero_points and all(t.data_type == expected for t in zero_points)
        errors[abits] = sqnr_db(outputs(model, held_out), outputs(quantized, held_out))
    assert errors[16] > errors[8] + 3


def test_what_quantization_does_not_change_is_carried_over():
    """Pipelines read metadata_props (an OCR model's character dictionary), names and doc strings."""
    model = conv_model()
    model.doc_string, model.model_version, model.domain = "a classifier", 7, "com.example"
    model.graph.name, model.graph.doc_string = "net", "the graph"
    model.graph.input[0].doc_string, model.graph.output[0].doc_string = "image", "scores"
    onnx.helper.set_model_props(model, {"character": "a\nb\nc", "labels": "cat,dog"})
    quantized, _ = quantize(model, calibration_feeds(model, 4), QuantConfig(wbits=4))
    assert (quantized.doc_string, quantized.model_version, quantized.domain) == ("a classifier", 7, "com.example")
    assert (quantized.graph.name, quantized.graph.doc_string) == ("net", "the graph")
    assert [v.name for v in quantized.graph.input] == ["x"] and [v.name for v in quantized.graph.output] == ["y"]
    assert quantized.graph.input[0].doc_string == "image" and quantized.graph.output[0].doc_string == "scores"
    assert quantized.graph.output[0].type == model.graph.output[0].type
    props = {p.key: p.value for p in quantized.metadata_props}
    assert props["character"] == "a\nb\nc" and props["labels"] == "cat,dog"
    assert quantized.producer_name == "onnx-bitsplit" and props["onnx-bitsplit.calibration_samples"] == "4"
    assert json.loads(props["onnx-bitsplit.layer_bits"]) == {"conv1": 8, "conv2": 4, "conv3": 8}


@pytest.mark.parametrize("storage", ["int4", "int8"])
def test_bytes_besides_weights_and_weight_bytes_add_up_to_the_written_model(storage):
    """Whatever the integers, scales and zero points: the written size is the two parts' sum, so a
    size budget can be spent on the weights alone."""
    model = prepare(inverted_residual_model())
    layers, _ = find_layers(model)
    layout = plan_layout(model, layers)
    rng = np.random.default_rng(0)
    solved = []
    for layer in layers:
        rows = layer.weight_shape[layer.axis]
        q = rng.integers(-8, 8, layer.weight_shape).astype(np.int8)
        scale, bias_scale = rng.uniform(0.01, 1, rows).astype(np.float32), rng.uniform(1e-4, 1e-3, rows).astype(np.float32)
        bias = rng.integers(-2**30, 2**30, rows).astype(np.int32) if layer.bias_name else None
        solved.append(WeightQuant(layer, 4, q, scale, bias, bias_scale if layer.bias_name else None))
    quantizers = {name: ActivationQuant(name, float(rng.uniform(0.001, 1)), int(rng.integers(0, 256)))
                  for name in [*layout.tensors, *layout.constants]}
    written = write_qdq(model, layout, solved, quantizers, weight_storage=storage).ByteSize()
    weights = sum(weight_bytes(int(np.prod(layer.weight_shape)), layer.weight_shape[layer.axis], 4, storage)
                  for layer in layers)
    assert written == bytes_besides_weights(model, layout, layers, weight_storage=storage) + weights
