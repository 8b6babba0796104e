"""quantize() on tiny models: valid QDQ that onnxruntime and onnx.reference run, close to float."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from graphs import calibration_feeds, conv_bn_model, conv_model, gemm_model, matmul_model
from onnx_bitsplit import QuantConfig, quantize, quantize_file
from onnx_bitsplit.errors import BitsplitError, CalibrationError, ModelError

BUILDERS = {
    "conv": conv_model,
    "conv_no_bias": lambda: conv_model(bias=False),
    "grouped_conv": lambda: conv_model(groups=4),
    "depthwise_conv": lambda: conv_model(groups=16),
    "conv_bn": conv_bn_model,
    "gemm": gemm_model,
    "gemm_transposed": lambda: gemm_model(trans_b=0),
    "matmul": matmul_model,
}


def outputs(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def sqnr_db(reference, test):
    noise = ((reference - test) ** 2).sum()
    return 10 * np.log10((reference ** 2).sum() / noise) if noise > 0 else np.inf


@pytest.mark.parametrize("kind", BUILDERS)
def test_w8_is_close_to_float_in_onnxruntime(kind):
    model = BUILDERS[kind]()
    quantized, report = quantize(model, calibration_feeds(model), QuantConfig(wbits=8))
    onnx.checker.check_model(quantized, full_check=True)
    assert all(node.domain in ("", "ai.onnx") for node in quantized.graph.node)
    held_out = calibration_feeds(model, count=8, seed=7)
    assert sqnr_db(outputs(model, held_out), outputs(quantized, held_out)) > 25
    assert len(report.layers) == sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)


@pytest.mark.parametrize("kind", ["conv", "depthwise_conv", "gemm", "matmul"])
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


def test_onnx_reference_agrees_with_onnxruntime():
    model = conv_model(groups=4)
    quantized, _ = quantize(model, calibration_feeds(model), QuantConfig(wbits=4))
    feed = calibration_feeds(model, count=1, seed=3)[0]
    expected = ReferenceEvaluator(quantized).run(None, feed)[0]
    actual = outputs(quantized, [feed])
    # onnxruntime runs QDQ with integer kernels; a tie rounded differently moves a value one step
    assert np.abs(actual - expected).max() < 0.02 * np.abs(expected).max()
    assert sqnr_db(expected, actual) > 35


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


def test_bit_split_beats_round_to_nearest_per_layer():
    model = conv_model()
    _, report = quantize(model, calibration_feeds(model), QuantConfig(wbits=3, first_last_wbits=None))
    assert all(layer.rel_error < layer.rtn_rel_error for layer in report.layers)


def test_input_model_is_untouched():
    model = conv_bn_model()
    before = model.SerializeToString()
    quantize(model, calibration_feeds(model, count=4))
    assert model.SerializeToString() == before


def test_calibration_reader_protocol_is_accepted():
    model = gemm_model()
    feeds = calibration_feeds(model, count=5)

    class Reader:  # what users of onnxruntime.quantization.CalibrationDataReader already have
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    _, report = quantize(model, Reader())
    assert report.calibration_samples == 5


def test_bad_calibration_and_models_raise_one_line_errors():
    model = conv_model()
    with pytest.raises(CalibrationError, match="empty"):
        quantize(model, [])
    with pytest.raises(CalibrationError, match="shape"):
        quantize(model, [{"x": np.zeros((1, 3, 12, 12), np.float32)}])
    with pytest.raises(CalibrationError, match="no value for input"):
        quantize(model, [{"image": np.zeros((1, 8, 12, 12), np.float32)}])
    no_layers = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])]))
    with pytest.raises(ModelError, match="no Conv, Gemm or MatMul"):
        quantize(no_layers, [{"x": np.zeros((1, 4), np.float32)}])


def test_blend_zero_is_solving_on_float_inputs():
    """With compensation_blend=0 the solve sees only float inputs: the same weights as without
    error compensation (one layer, so both streams read the same activation)."""
    model = matmul_model()
    del model.graph.node[2:]  # keep x -> MatMul -> Sigmoid
    model.graph.output[0].name = "s1"
    feeds = calibration_feeds(model, 8)
    blended, _ = quantize(model, feeds, QuantConfig(wbits=3, compensation_blend=0.0, first_last_wbits=None))
    plain, _ = quantize(model, feeds, QuantConfig(wbits=3, error_compensation=False, first_last_wbits=None))
    for a, b in zip(blended.graph.initializer, plain.graph.initializer):
        assert a.name == b.name
        # same statistics up to float rounding (BLAS takes XᵀX and XᵀX~ by different routes)
        np.testing.assert_allclose(onnx.numpy_helper.to_array(a).astype(np.float64),
                                   onnx.numpy_helper.to_array(b).astype(np.float64), rtol=1e-4)
    with pytest.raises(Exception, match="compensation_blend"):
        QuantConfig(compensation_blend=1.5)


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


def test_excluded_layers_stay_float_and_patterns_must_match():
    model = conv_model(groups=16)
    feeds = calibration_feeds(model, count=4)
    quantized, report = quantize(model, feeds, QuantConfig(wbits=4, exclude=("conv2",)))
    assert [layer.name for layer in report.layers] == ["conv1", "conv3"]
    assert ("conv2", "excluded by 'conv2'") in report.skipped
    conv2 = next(n for n in quantized.graph.node if n.name == "conv2")
    assert "w2" in conv2.input  # its float weight, read directly
    with pytest.raises(BitsplitError, match="selects none"):
        quantize(model, feeds, QuantConfig(exclude=("conv9",)))
    with pytest.raises(BitsplitError, match="selects none"):
        quantize(model, feeds, QuantConfig(layer_wbits={"conv_2": 3}))
    with pytest.raises(BitsplitError, match="no layer to quantize"):
        quantize(model, feeds, QuantConfig(exclude=("op:Conv",)))
    _, report = quantize(model, feeds, QuantConfig(wbits=3, layer_wbits={"op:Conv": 5}))
    assert [layer.bits for layer in report.layers] == [5, 5, 5]


def test_file_to_file_api_with_a_path_and_a_reader_of_the_model(tmp_path):
    """quantize() takes a path too; quantize_file() writes atomically with the command's checks."""
    model = conv_model()
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    quantized, _ = quantize(tmp_path / "model.onnx", calibration_feeds(model, 4))
    assert quantized.graph.node
    report = quantize_file(tmp_path / "model.onnx", tmp_path / "q.onnx",
                           lambda loaded: calibration_feeds(loaded, 4), report_path=tmp_path / "r.json")
    assert report.files["output"] == str(tmp_path / "q.onnx") and report.quant_bytes == (tmp_path / "q.onnx").stat().st_size
    assert json.loads((tmp_path / "r.json").read_text())["files"]["input"] == str(tmp_path / "model.onnx")
    with pytest.raises(BitsplitError, match="is the input file"):
        quantize_file(tmp_path / "model.onnx", tmp_path / "weights.bin", calibration_feeds(model, 4))


def test_progress_counts_work_per_phase():
    model = conv_model()
    calls = []
    quantize(model, calibration_feeds(model, 4), QuantConfig(size_budget=0.5),
             progress=lambda phase, done, total, name: calls.append((phase, done, total, name)))
    assert [c[0] for c in calls] == ["sensitivity"] * 3 + ["layers"] * 3
    for phase in ("sensitivity", "layers"):
        done = [c[1] for c in calls if c[0] == phase]
        assert done == sorted(done) and done[-1] == calls[-1][2]
    # conv1 (16x8x3x3 on 12x12) does more work than conv3 (8x16x1x1 on 6x6): the bar is not per layer
    steps = np.diff([0] + [c[1] for c in calls if c[0] == "layers"])
    assert steps[0] > 10 * steps[2]
