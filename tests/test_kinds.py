"""Models of each kind users bring besides CNNs (kinds.py) convert, stay accurate and keep what
their kind needs: an attention mask, a static batch, states with the batch on axis 1, 0-D inputs."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kinds
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.act_scale import MASK_DEPTH
from onnx_bitsplit.errors import ModelError
from runs import model_sqnr_db, outputs


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("wbits,abits,least", [(8, 8, 0.999), (4, 8, 0.995), (8, 16, 0.9999)])
def test_an_encoder_with_a_padding_mask_stays_accurate_on_padded_input(wbits, abits, least):
    """With 16 bits, finfo.min as a quantized constant must still dequantize to a finite value:
    -inf times the mask's 0 is NaN."""
    model = kinds.bert_model()
    quantized, _ = quantize(model, kinds.bert_feeds(32), QuantConfig(wbits=wbits, abits=abits))
    held_out = kinds.bert_feeds(16, seed=7)
    assert cosine(outputs(model, held_out), outputs(quantized, held_out)) >= least


def test_padding_weighs_nothing_in_the_quantized_encoder():
    """What the padded positions hold must not reach the others: the mask's -3.4e38 saturates the
    quantized scores far below every real one, instead of stretching their grid."""
    model = kinds.bert_model()
    quantized, _ = quantize(model, kinds.bert_feeds(32), QuantConfig(wbits=8))
    feed = kinds.bert_feeds(1, seed=3)[0]
    feed["input_ids"][0, 5:], feed["attention_mask"][0, 5:] = 0, 0
    other = {**feed, "input_ids": feed["input_ids"].copy()}
    other["input_ids"][0, 5:] = 7  # other tokens where the padding is
    np.testing.assert_array_equal(outputs(quantized, [feed])[0, :5], outputs(quantized, [other])[0, :5])


def test_the_mask_keeps_a_depth_integer_kernels_can_requantize():
    model = kinds.bert_model()
    quantized, _ = quantize(model, kinds.bert_feeds(8), QuantConfig(wbits=8))
    constants = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    (mask_quantizer,) = [node for node in quantized.graph.node
                         if node.op_type == "QuantizeLinear" and node.input[0].startswith("mask_l")]
    scale, zero_point = float(constants[mask_quantizer.input[1]]), int(constants[mask_quantizer.input[2]])
    assert -zero_point * scale == pytest.approx(-MASK_DEPTH, rel=0.01)  # not -3.4e38


def test_a_vit_of_static_shape_converts_and_stays_accurate():
    """Its batch of 1 is written into constants (the class token's Concat, Reshapes): samples run one
    at a time."""
    model = kinds.vit_model()
    quantized, report = quantize(model, kinds.image_feeds(32), QuantConfig(wbits=8))
    held_out = kinds.image_feeds(16, seed=7)
    assert cosine(outputs(model, held_out), outputs(quantized, held_out)) >= 0.99
    assert report.calibration_samples == 32


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_a_recurrent_model_with_its_state_batch_on_axis_1_and_a_0d_input_converts(cell):
    model = kinds.recurrent_model(cell)
    quantized, report = quantize(model, kinds.recurrent_feeds(24), QuantConfig(wbits=8))
    assert [why for _, why in report.skipped] == [f"{cell} is kept in float"]
    held_out = kinds.recurrent_feeds(8, seed=7)
    for output in (0, 1):  # the probability and the new state
        assert model_sqnr_db(model, quantized, held_out, output) > 20


def scaled_model(gain: float) -> onnx.ModelProto:
    """x [N,8] -> MatMul -> Mul by gain -> MatMul (its weight divided by gain) -> y."""
    rng = np.random.default_rng(0)
    values = {"w1": rng.normal(0, 0.3, (8, 16)).astype(np.float32), "gain": np.float32(gain),
              "w2": (rng.normal(0, 0.3, (16, 4)) / gain).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="first"),
             helper.make_node("Mul", ["m1", "gain"], ["loud"]),
             helper.make_node("MatMul", ["loud", "w2"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v, k) for k, v in values.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_values_beyond_float16_are_kept_in_float32_in_the_float_stream():
    """A power spectrum's 1e12 overflows float16 (65504), where the float stream keeps what it
    quantizes: such a tensor stays float32, and scaling it by 1e6 changes nothing (every quantizer
    scales with it)."""
    feeds = [{"x": np.random.default_rng(i).normal(0, 3, (4, 8)).astype(np.float32)} for i in range(8)]
    sqnr = {}
    for gain in (1.0, 1e6):
        model = scaled_model(gain)
        quantized, _ = quantize(model, feeds, QuantConfig(wbits=8))
        sqnr[gain] = model_sqnr_db(model, quantized, feeds)
    assert sqnr[1e6] == pytest.approx(sqnr[1.0], abs=0.5)


def test_an_if_reading_outer_tensors_converts_and_its_branch_layers_are_reported():
    """The branches read `hidden` after the outer graph's last reader of it: the segments carry it."""
    model = kinds.if_model()
    feeds = kinds.feeds(model, 24)
    quantized, report = quantize(model, feeds, QuantConfig(wbits=8))
    # onnxruntime fuses middle/MatMul with the Add of the If's result: split again, its weight is quantized
    assert [layer.name.split("/")[0] for layer in report.layers] == ["first", "middle", "last"]
    assert dict(report.skipped) == {name: "inside If 'branch': control-flow bodies are kept in float"
                                    for name in ("then/MatMul", "else/MatMul")}
    assert model_sqnr_db(model, quantized, kinds.feeds(model, 8, seed=7)) > 25


def test_a_loops_body_layers_are_reported_as_kept_in_float():
    model = kinds.loop_model()
    quantized, report = quantize(model, kinds.feeds(model, 24), QuantConfig(wbits=8))
    assert dict(report.skipped) == {"body/MatMul": "inside Loop 'loop': control-flow bodies are kept in float"}
    assert model_sqnr_db(model, quantized, kinds.feeds(model, 8, seed=7)) > 20


def test_a_model_whose_layers_are_all_inside_an_if_is_refused_saying_so():
    model = kinds.if_only_model()
    with pytest.raises(ModelError, match="its 2 layers are inside If/Loop/Scan bodies, kept in float"):
        quantize(model, kinds.feeds(model, 4), QuantConfig(wbits=8))


def test_an_outlier_channel_in_the_residual_stream_leaves_the_others_their_resolution():
    """BERT's residual stream carries a few channels two orders of magnitude above the rest: on
    one 8-bit grid they leave the others a step or two, and the layer norm divides that back up.
    The layer norm's input and the terms of its Add keep 16 bits; what layers read stays 8 (their
    integer kernels take 8-bit inputs)."""
    model = kinds.bert_model()
    bias = next(t for t in model.graph.initializer if t.name == "ffn2_b")
    values = numpy_helper.to_array(bias).copy()
    values[3] = 200.0
    bias.CopyFrom(numpy_helper.from_array(values, "ffn2_b"))
    quantized, _ = quantize(model, kinds.bert_feeds(32), QuantConfig(wbits=8))
    widths = {node.input[0]: numpy_helper.to_array(next(t for t in quantized.graph.initializer
                                                         if t.name == node.input[2])).dtype
              for node in quantized.graph.node if node.op_type == "QuantizeLinear"}
    assert {widths[name] for name in ("residual2", "ffn2")} == {np.dtype(np.uint16)}
    assert {widths[name] for name in ("norm1", "gelu")} == {np.dtype(np.uint8)}
    held_out = kinds.bert_feeds(16, seed=7)
    others = [np.delete(outputs(m, held_out), 3, axis=-1) for m in (model, quantized)]
    assert cosine(*others) >= 0.9995  # 0.9986 with 8 bits there


def test_the_command_takes_npz_feeds_with_a_scalar_and_checks_them(tmp_path, run):
    """Silero's way: audio, a state with the batch on axis 1 and a 0-D sample rate, one .npz a
    feed; `check` compares the probability per feed and finds no class scores to agree on."""
    onnx.save(kinds.recurrent_model("LSTM"), tmp_path / "vad.onnx")
    for folder, seed in (("calib", 1), ("data", 7)):
        (tmp_path / folder).mkdir()
        for index, feed in enumerate(kinds.recurrent_feeds(6, seed=seed)):
            np.savez(tmp_path / folder / f"{index}.npz", **feed)
    converted = run(tmp_path / "vad.onnx", tmp_path / "q.onnx", "--calib", tmp_path / "calib", "--wbits", "8", "-q")
    assert converted.exit_code == 0, converted.output
    checked = run("check", tmp_path / "vad.onnx", tmp_path / "q.onnx", "--data", tmp_path / "data",
                  "--min-cosine", "0.99")
    assert checked.exit_code == 0, checked.output
    assert "6 samples" in checked.output


def test_target_qnn_refuses_a_dynamic_model_naming_the_option(tmp_path, run):
    onnx.save(kinds.bert_model(), tmp_path / "encoder.onnx")
    (tmp_path / "calib").mkdir()
    for index, feed in enumerate(kinds.bert_feeds(4)):
        np.savez(tmp_path / "calib" / f"{index}.npz", **feed)
    refused = run(tmp_path / "encoder.onnx", tmp_path / "q.onnx", "--calib", tmp_path / "calib", "--target", "qnn")
    assert refused.exit_code == 2 and not (tmp_path / "q.onnx").exists()
    assert refused.output.strip() == ("Error: --target qnn needs static shapes: give --input-shape for "
                                      "'input_ids', 'attention_mask'")


def test_target_qnn_widens_a_transformers_activations_to_16_bits_and_says_so():
    """QNN HTP takes no layer writing 16 bits from 8, which the residual stream's terms need."""
    _, report = quantize(kinds.vit_model(), kinds.image_feeds(8), QuantConfig(wbits=8, target="qnn"))
    assert report.activation_bits == 16
    assert any(warning.startswith("--target qnn: 16-bit activations throughout") for warning in report.warnings)
    _, cnn_report = quantize(kinds.tiny_sigmoid_model(), kinds.feeds(kinds.tiny_sigmoid_model(), 8),
                             QuantConfig(wbits=8, target="qnn", input_shapes={"x": (1, 16)}))
    assert cnn_report.activation_bits == 8 and not cnn_report.warnings  # no layer normalization: 8 bits


def test_a_sigmoid_output_of_tiny_values_keeps_its_resolution():
    """A wake-word score of 1e-5 to 1e-3: on the fixed [0, 1] grid of a Sigmoid (a step of 1/256) it
    would be a constant 0; as a graph output it gets its calibration range."""
    model = kinds.tiny_sigmoid_model()
    quantized, _ = quantize(model, kinds.feeds(model, 32), QuantConfig(wbits=8))
    held_out = kinds.feeds(model, 16, seed=7)
    scores = outputs(model, held_out)
    assert scores.max() < 1 / 512  # below half a step of the fixed grid
    assert cosine(scores, outputs(quantized, held_out)) >= 0.99
