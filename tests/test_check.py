"""The runtime accuracy check: identical models agree, a damaged one is caught, outputs that are
not finite fail whatever the thresholds, and its JSON is versioned and strict."""

import hashlib
import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from graphs import calibration_feeds, conv_model, damaged, gemm_model
from onnx_bitsplit.check import CheckReport, compare, compare_output
from onnx_bitsplit.cli import check_command, main


def test_identical_models_agree_completely():
    model = gemm_model()
    report = compare(model, model, calibration_feeds(model, count=20))
    (output,) = report.outputs
    assert report.samples == 20
    assert output.agreement == 1.0 and output.cosine == pytest.approx(1.0)
    assert math.isinf(output.sqnr_db) and output.max_abs_error == 0.0
    assert report.failures(min_agree=0.999, min_sqnr=100) == []


def test_damaged_model_is_caught():
    model = gemm_model()
    report = compare(model, damaged(model), calibration_feeds(model, count=40))
    (output,) = report.outputs
    assert output.agreement < 0.9 and output.sqnr_db < 3
    assert len(report.failures(min_agree=0.99, min_sqnr=20)) == 2


def test_output_figures_golden():
    y = np.array([[1.0, 0.0], [0.0, 2.0]])
    y_q = np.array([[1.0, 0.0], [1.0, 0.0]])
    output = compare_output("y", [y], [y_q], labels=np.array([0, 0]))
    assert output.agreement == 0.5
    assert (output.top1_float, output.top1_quant) == (0.5, 1.0)
    assert output.cosine == pytest.approx(1 / np.sqrt(5 * 2))  # <y, y_q> = 1, |y| = √5, |y_q| = √2
    assert output.sqnr_db == pytest.approx(10 * np.log10(5 / 5))
    assert output.max_abs_error == 2.0


def test_outputs_of_different_sizes_are_compared_sample_by_sample():
    """A recognizer's sequence or a detector's map varies with the input's size."""
    y = [np.ones((1, 3, 2)), np.arange(10.0).reshape(1, 5, 2)]
    output = compare_output("y", y, [part.copy() for part in y], labels=None)
    assert output.cosine == pytest.approx(1.0) and output.agreement == 1.0


def test_agreement_is_for_class_scores_only_and_its_gate_says_so():
    maps = [np.random.default_rng(0).normal(size=(1, 4, 8, 8))]
    output = compare_output("map", maps, maps, labels=None)
    assert output.agreement is None
    report = CheckReport(1, outputs=[output])
    assert report.failures(min_agree=0.9) == [
        "--min-agree: no output is shaped as class scores, argmax agreement does not apply "
        "(gate on --min-cosine or --min-sqnr)"]
    assert report.failures(min_cosine=0.99) == []
    assert "      -" in report.table().splitlines()[-1]


def test_a_quantized_output_that_collapsed_to_a_constant_fails_the_check():
    """A wake-word score of 1e-5 on a [0, 1] grid of 8 bits: all zeros, and a cosine of 0 that no
    gate may be needed to notice."""
    scores = [np.full((1, 1), 1e-5 * (i + 1)) for i in range(4)]
    output = compare_output("score", scores, [np.zeros((1, 1))] * 4, labels=None)
    assert CheckReport(4, outputs=[output]).failures() == [
        "output 'score': the quantized model's is constant, the float model's is not"]


def strict(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_json_is_versioned_strict_and_says_whether_it_passed(models_and_data, capsys):
    d = models_and_data
    with pytest.raises(SystemExit) as exit_info:  # identical models: an infinite SQNR
        main(["check", str(d / "float.onnx"), str(d / "float.onnx"), "--data", str(d / "data.npy"), "--json",
              "--min-agree", "90%", "--min-sqnr", "20"])
    figures = strict(capsys.readouterr().out)
    assert exit_info.value.code == 0
    assert figures["schema"] == 1 and figures["tool"]["name"] == "onnx-bitsplit"
    assert figures["thresholds"] == {"min_agree": 0.9, "min_cosine": None, "min_sqnr": 20.0}
    assert figures["passed"] is True and figures["failures"] == [] and figures["outputs"][0]["sqnr_db"] is None
    assert figures["files"] == {"float": str(d / "float.onnx"), "quantized": str(d / "float.onnx"),
                                "data": str(d / "data.npy")}
    assert figures["sha256"] == {str(d / "float.onnx"): hashlib.sha256((d / "float.onnx").read_bytes()).hexdigest()}
    assert set(figures["tool"]["versions"]) == {"onnx", "onnxruntime", "numpy"}
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(d / "float.onnx"), str(d / "damaged.onnx"), "--data", str(d / "data.npy"), "--json",
              "--min-agree", "0.99"])
    figures = strict(capsys.readouterr().out)
    assert exit_info.value.code == 3 and figures["passed"] is False and "agreement" in figures["failures"][0]


def with_nan_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    weight = broken.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(np.full((16, 8, 3, 3), np.nan, np.float32), weight.name))
    return broken


def test_check_fails_on_non_finite_outputs(folder):
    onnx.save(with_nan_weights(conv_model()), folder / "broken.onnx")
    result = CliRunner().invoke(check_command, [str(folder / "model.onnx"), str(folder / "broken.onnx"),
                                                "--data", str(folder / "calib.npy"), "--min-sqnr", "10"])
    assert result.exit_code == 3 and "not finite" in result.output, result.output


def test_check_json_of_non_finite_outputs_is_strict(folder, capsys):
    onnx.save(with_nan_weights(conv_model()), folder / "nan.onnx")
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(folder / "model.onnx"), str(folder / "nan.onnx"), "--data", str(folder / "calib.npy"), "--json"])
    figures = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert exit_info.value.code == 3 and figures["passed"] is False and figures["outputs"][0]["finite"] is False


def test_the_table_escapes_cuts_and_counts_what_the_model_names():
    """Names come from the model: control characters escaped, long ones cut with an ellipsis;
    a provider's fallbacks listed up to ten, then how many more."""
    from onnx_bitsplit.check import CheckReport, OutputComparison
    from onnx_bitsplit.providers import Placement
    fallbacks = [("Conv", f"conv{i}\x1b]0;title\x07", "not supported") for i in range(25)]
    report = CheckReport(4, placement=Placement("qnn", whole=False, fallbacks=fallbacks), provider_agreement=1.0,
                         outputs=[OutputComparison("y" * 40 + "\r\nFAILED: forged", 0.5, None, None, 0.9, 10.0, 1.0)])
    table = report.table()
    assert not any(c in table for c in "\x1b\x07\r") and "and 15 more" in table
    assert table.count("conv") == 10 and "y" * 23 + "…" in table
    failures = report.failures(min_agree=0.9)
    assert failures[0] == "25 nodes did not run on qnn"
    assert "\n" not in failures[1] and "\\r\\nFAILED" in failures[1]
    openvino = Placement("openvino", whole=False, fallbacks=[("Convolution", "c", "runs in bf16")])
    assert "ran on openvino in floating point" in openvino.shortfall()


def test_compare_takes_the_labels_of_an_image_reader(tmp_path):
    """From the Python API as from the command: images named CCC_name.jpg give top-1."""
    from PIL import Image
    from graphs import image_model
    from onnx_bitsplit.calibration import ImageFolderReader
    model = image_model()
    for index in range(4):
        Image.new("RGB", (16, 16), (60 * index, 30, 90)).save(tmp_path / f"{index:03d}_class.png")
    reader = ImageFolderReader(tmp_path, "x", (16, 16), preset="unit")
    assert reader.labels() == [0, 1, 2, 3] and float(reader.std.ravel()[0]) == 255.0
    report = compare(model, model, reader)
    assert report.outputs[0].top1_float is None  # a (N, 4, 16, 16) map has no class per sample
    flat = onnx.helper.make_model(onnx.helper.make_graph(
        [*model.graph.node, onnx.helper.make_node("ReduceMean", ["y"], ["scores"], axes=[2, 3], keepdims=0)],
        "classifier", list(model.graph.input),
        [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", 4])], list(model.graph.initializer)),
        opset_imports=model.opset_import)
    report = compare(flat, flat, reader)
    assert report.outputs[0].top1_float is not None and report.outputs[0].top1_float == report.outputs[0].top1_quant
