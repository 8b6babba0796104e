"""The runtime accuracy check: identical models agree, a damaged one is caught."""

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from graphs import calibration_feeds, gemm_model
from onnx_bitsplit.check import compare, compare_output
from onnx_bitsplit.cli import check_command, main


def damaged(model, scale=-1.0):
    """The model with its first weight multiplied by `scale`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weight = copy.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * scale, weight.name))
    return copy


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
    output = compare_output("y", y, y_q, labels=np.array([0, 0]))
    assert output.agreement == 0.5
    assert (output.top1_float, output.top1_quant) == (0.5, 1.0)
    assert output.cosine == pytest.approx(1 / np.sqrt(5 * 2))  # <y, y_q> = 1, |y| = √5, |y_q| = √2
    assert output.sqnr_db == pytest.approx(10 * np.log10(5 / 5))
    assert output.max_abs_error == 2.0


@pytest.fixture
def models_and_data(tmp_path):
    model = gemm_model()
    onnx.save(model, tmp_path / "float.onnx")
    onnx.save(damaged(model), tmp_path / "damaged.onnx")
    data = tmp_path / "data.npy"
    np.save(data, np.concatenate([f["x"] for f in calibration_feeds(model, count=30)]))
    return tmp_path


@pytest.mark.parametrize("gate,exit_code", [("0.5", 0), ("0.99", 3)])
def test_cli_gates_on_agreement(models_and_data, gate, exit_code):
    d = models_and_data
    quantized = d / ("float.onnx" if gate == "0.5" else "damaged.onnx")
    result = CliRunner().invoke(check_command, [str(d / "float.onnx"), str(quantized), "--data",
                                                str(d / "data.npy"), "--min-agree", gate])
    assert result.exit_code == exit_code, result.output
    assert "agree" in result.output


def test_cli_json_and_routing(models_and_data, capsys):
    d = models_and_data
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(d / "float.onnx"), str(d / "float.onnx"), "--data", str(d / "data.npy"), "--json"])
    assert exit_info.value.code == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["samples"] == 30 and figures["outputs"][0]["agreement"] == 1.0


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
    assert figures["thresholds"] == {"min_agree": 0.9, "min_sqnr": 20.0}
    assert figures["passed"] is True and figures["failures"] == [] and figures["outputs"][0]["sqnr_db"] is None
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(d / "float.onnx"), str(d / "damaged.onnx"), "--data", str(d / "data.npy"), "--json",
              "--min-agree", "0.99"])
    figures = strict(capsys.readouterr().out)
    assert exit_info.value.code == 3 and figures["passed"] is False and "agreement" in figures["failures"][0]


@pytest.mark.parametrize("value", ["90", "1.5", "-0.1", "ninety"])
def test_min_agree_is_a_fraction_or_a_percent(models_and_data, capsys, value):
    d = models_and_data
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(d / "float.onnx"), str(d / "float.onnx"), "--data", str(d / "data.npy"), "--min-agree", value])
    assert exit_info.value.code == 2 and "percent" in capsys.readouterr().err


def test_overlap_with_the_calibration_data_is_warned(models_and_data, capsys):
    d = models_and_data
    with pytest.raises(SystemExit):
        main(["check", str(d / "float.onnx"), str(d / "float.onnx"), "--data", str(d / "data.npy"),
              "--calib", str(d / "data.npy"), "--batch-size", "7"])
    captured = capsys.readouterr()
    assert "1 of the 1 --data files are calibration data" in captured.err
    assert "30 samples in batches of 7" in captured.out
