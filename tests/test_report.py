"""What a conversion did: the versioned JSON report, phase times, text safe for a terminal."""

import json
import math

import pytest

from graphs import calibration_feeds, conv_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit import report as report_module
from onnx_bitsplit.cli import main
from onnx_bitsplit.report import LayerReport, PhaseClock, finite_json, outliers, printable


def test_report_to_stdout_is_versioned_json(tmp_path, model_path, npy_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_path), str(tmp_path / "q.onnx"), "--calib", str(npy_dir), "--report", "-", "--quiet",
              "--exclude", "conv2"])
    assert exit_info.value.code == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert report["schema"] == 1 and report["tool"]["version"] and report["options"]["wbits"] == 4
    assert report["files"]["input"] == str(model_path) and report["skipped"] == [{"name": "conv2", "reason": "excluded by 'conv2'"}]
    assert all(" " not in phase for phase in report["phase_seconds"])
    assert {"outputs", "inputs", "groups", "rel_error"} <= set(report["layers"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "model.onnx", "q.onnx"]


def test_a_phase_inside_another_is_not_counted_twice(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(report_module.time, "perf_counter", lambda: now[0])
    clock = PhaseClock()
    with clock("capture"):
        now[0] += 1.0
        with clock("activation_scales"):
            now[0] += 2.0
        now[0] += 3.0
    with clock("capture"):  # a phase entered again adds up
        now[0] += 4.0
    assert clock.seconds == {"capture": 8.0, "activation_scales": 2.0}


def test_non_finite_numbers_become_null():
    value = {"a": math.nan, "b": [math.inf, 1.0], "c": (2.0, -math.inf), "d": "text", "e": 3}
    assert finite_json(value) == {"a": None, "b": [None, 1.0], "c": [2.0, None], "d": "text", "e": 3}
    json.loads(json.dumps(finite_json(value)), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def test_names_from_a_model_are_printable():
    assert printable("conv\x1b[31m1\x07\r\n") == "conv\\x1b[31m1\\x07\\r\\n"
    assert printable("résumé/layer 1") == "résumé/layer 1"


@pytest.mark.parametrize("options,expected", [
    (dict(wbits=4), "integer kernels on QNN HTP; onnxruntime CPU and OpenVINO run its INT4 layers in float"),
    (dict(wbits=4, target="cpu"), "integer kernels on onnxruntime CPU, OpenVINO and QNN HTP"),
    (dict(wbits=8), "integer kernels on onnxruntime CPU, OpenVINO and QNN HTP"),
    (dict(wbits=8, abits=16), "integer kernels on QNN HTP; onnxruntime CPU and OpenVINO run its 16-bit"),
])
def test_the_summary_says_where_the_file_runs_as_integer_kernels(options, expected):
    model = conv_model()
    _, report = quantize(model, calibration_feeds(model, 4), QuantConfig(first_last_wbits=None, **options))
    assert expected in report.summary()


def test_a_layer_and_a_tensor_far_above_the_rest_are_warned_about_with_their_fix():
    layers = [LayerReport(f"conv{i}", "Conv", 4, (8, 8, 1), 0.01, 0.02, 0.0) for i in range(5)]
    layers.append(LayerReport("bad", "Conv", 4, (8, 8, 1), 0.2, 0.3, 0.0))
    tensors = {f"t{i}": 1e-4 for i in range(5)} | {"score": 0.19}
    assert outliers(layers, tensors, 8) == [
        "layer 'bad' (W4) keeps a relative output error of 0.200, the median layer's 0.010: "
        "--bits-per-layer 'bad=8' or --exclude 'bad' may keep more",
        "tensor 'score' loses 19.0% to its quantizer, the median tensor 1.0e-04: --abits 16 keeps more"]
    assert outliers(layers[:5], {f"t{i}": 1e-4 for i in range(5)}, 8) == []  # uniformly accurate: nothing
