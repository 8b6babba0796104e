"""Cross-layer equalization: the same function, evened-out channels, pairs only where exact."""

import numpy as np
import onnx
import onnxruntime as ort

from graphs import calibration_feeds, inverted_residual_model, mobile_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.equalize import MAX_STRETCH, equalize
from onnx_bitsplit.graph import find_layers, non_negative_tensors, prepare


def run(model, feed, outputs=None):
    if outputs:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs)
    return ort.InferenceSession(model.SerializeToString()).run(outputs, feed)


def _equalized(build):
    prepared = prepare(build())
    layers, _ = find_layers(prepared)
    feeds = calibration_feeds(build(), count=8)
    equalized, pairs = equalize(prepared, {layer.name for layer in layers}, feeds)
    return prepared, equalized, pairs, layers


def test_the_function_is_unchanged_and_clip_bounds_become_per_channel():
    prepared, equalized, pairs, _ = _equalized(inverted_residual_model)
    assert [(p.producer, p.consumer) for p in pairs] == [("expand", "depthwise"), ("depthwise", "project")]
    assert all(p.note == "1 Clip made per-channel" for p in pairs)
    ops = [node.op_type for node in equalized.graph.node]
    assert "Clip" not in ops and ops.count("Relu") == 2 and ops.count("Min") == 2
    feed = calibration_feeds(inverted_residual_model(), count=1, seed=5)[0]
    np.testing.assert_allclose(run(equalized, feed)[0], run(prepared, feed)[0], rtol=1e-4, atol=1e-5)


def test_a_depthwise_input_gets_one_range_for_every_channel():
    prepared, equalized, _, layers = _equalized(inverted_residual_model)
    depthwise_input = next(layer.input_name for layer in layers if layer.name == "depthwise")
    feed = {"x": np.concatenate([f["x"] for f in calibration_feeds(inverted_residual_model(), count=8)])}

    def ranges(model):
        return run(model, feed, [depthwise_input])[0].max(axis=(0, 2, 3))

    before, after = ranges(prepared), ranges(equalized)
    assert before.max() / before.min() > 4  # the rows' scales spread the channels
    stretched = before >= before.max() / MAX_STRETCH
    np.testing.assert_allclose(after[stretched], before.max(), rtol=1e-5)
    np.testing.assert_allclose(after[~stretched], before[~stretched] * MAX_STRETCH, rtol=1e-5)
    assert depthwise_input in non_negative_tensors(equalized)  # still unsigned through Relu, Min and Pad


def test_no_pair_through_a_nonlinearity_or_a_shared_tensor():
    prepared, equalized, pairs, _ = _equalized(mobile_model)  # HardSwish, SiLU, Resize, Concat
    assert pairs == [] and equalized is prepared


def test_quantize_with_equalization_reports_the_pairs_and_stays_close():
    model = inverted_residual_model()
    feeds = calibration_feeds(model, count=32)
    quantized, report = quantize(model, feeds, QuantConfig(equalization=True))
    assert len(report.equalized) == 2 and "equalized 2 layer pairs" in report.summary()
    feed = calibration_feeds(model, count=1, seed=9)[0]
    reference, result = run(model, feed)[0], run(quantized, feed)[0]
    cosine = (reference * result).sum() / np.linalg.norm(reference) / np.linalg.norm(result)
    assert cosine > 0.99
