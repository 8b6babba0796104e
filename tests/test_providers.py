"""Deployment runtimes: QNN HTP (onnxruntime-qnn) and OpenVINO run our output whole, as integer
kernels; each test skips with a reason where its package is not installed."""

import importlib.util
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from graphs import INPUT, calibration_feeds, conv_model, inverted_residual_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.cli import check_command
from onnx_bitsplit.errors import BitsplitError
from onnx_bitsplit.providers import open_runner

needs_qnn = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_qnn") is None,
                               reason="onnxruntime-qnn is not installed (pip install onnxruntime-qnn)")
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not installed (pip install openvino)")
STATIC = {INPUT: (1, 4, 10, 10)}


def static_block(**options):
    model = inverted_residual_model()
    quantized, _ = quantize(model, calibration_feeds(model, 16), QuantConfig(input_shapes=STATIC, **options))
    return model, quantized


def agreement_with_cpu(quantized, provider):
    feeds = calibration_feeds(quantized, 8, seed=3)
    cpu, other = open_runner(quantized, "cpu"), open_runner(quantized, provider)
    expected = np.concatenate([cpu.run(feed)[0] for feed in feeds])
    actual = np.concatenate([other.run(feed)[0] for feed in feeds])
    return 10 * np.log10((expected ** 2).sum() / max(((expected - actual) ** 2).sum(), 1e-30))


@needs_qnn
@pytest.mark.parametrize("options", [dict(wbits=8), dict(wbits=4), dict(wbits=4, abits=16)])
def test_qnn_htp_runs_the_whole_graph(options):
    _, quantized = static_block(**options)
    runner = open_runner(quantized, "qnn")
    assert runner.placement.whole and runner.placement.fallbacks == []
    assert agreement_with_cpu(quantized, "qnn") > 30  # the same integers, up to rounding


@needs_qnn
def test_qnn_reports_what_it_refuses():
    model = inverted_residual_model()
    dynamic, _ = quantize(model, calibration_feeds(model, 8))  # no --input-shape: QNN needs static shapes
    placement = open_runner(dynamic, "qnn").placement
    assert not placement.whole
    assert {op for op, _, _ in placement.fallbacks} >= {"Conv", "Add"}
    assert all("static shapes" in reason for _, _, reason in placement.fallbacks)


@needs_openvino
def test_openvino_runs_every_conv_in_int8():
    _, quantized = static_block(wbits=4, weight_storage="int8")
    assert open_runner(quantized, "openvino").placement.whole
    assert agreement_with_cpu(quantized, "openvino") > 30
    _, int4 = static_block(wbits=4, depthwise_wbits=None)  # OpenVINO decompresses INT4 weights to float
    placement = open_runner(int4, "openvino").placement
    assert not placement.whole and all(kind == "Convolution" for kind, _, _ in placement.fallbacks)


@pytest.mark.parametrize("provider,package", [("qnn", "onnxruntime-qnn"), ("openvino", "openvino")])
def test_a_missing_provider_package_is_named(monkeypatch, provider, package):
    monkeypatch.setitem(sys.modules, {"qnn": "onnxruntime_qnn", "openvino": "openvino"}[provider], None)
    with pytest.raises(BitsplitError, match=f"pip install {package}"):
        open_runner(conv_model(), provider)


@needs_qnn
def test_check_fails_when_the_provider_does_not_take_the_whole_graph(tmp_path):
    model = conv_model()
    quantized, _ = quantize(model, calibration_feeds(model, 8))
    onnx.save(model, tmp_path / "float.onnx")
    onnx.save(quantized, tmp_path / "q.onnx")
    np.save(tmp_path / "data.npy", calibration_feeds(model, 1)[0][INPUT])
    result = CliRunner().invoke(check_command, [str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"),
                                                "--data", str(tmp_path / "data.npy"), "--provider", "qnn"])
    assert result.exit_code == 3 and "did not run on qnn" in result.output, result.output


def test_an_openvino_error_gives_its_cause_not_where_it_was_thrown():
    from onnx_bitsplit.providers import cause_line
    error = RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\n"
                         "Exception from src/core/src/pass/matmul.cpp:12:\n"
                         "Check 'scale_dim.compatible(x_dim_at_axis)' failed at src/x.cpp:12\n")
    assert cause_line(error) == "Check 'scale_dim.compatible(x_dim_at_axis)' failed at src/x.cpp:12"
    assert cause_line(RuntimeError("plain")) == "plain"


def test_native_output_during_runs_is_counted_not_passed_through(capfd):
    """The QNN simulator can print a line per element without end: it is counted and sampled."""
    import os
    from onnx_bitsplit.providers import LOG_SAMPLE, Placement, _logged_runner

    class Session:
        def get_outputs(self):
            return [type("Output", (), {"name": "y"})()]

        def run(self, names, feed):
            os.write(2, b"elementwise.h:12 dividing by 0\n" * 1000 + b"other line\n")
            return [feed["x"]]

    placement = Placement("qnn")
    runner = _logged_runner(Session(), placement)
    assert runner.run({"x": 1})[0] == 1 and runner.run({"x": 2})[0] == 2
    assert capfd.readouterr().err == ""
    assert placement.log_lines == 2002 and placement.log_sample == ["elementwise.h:12 dividing by 0", "other line"]
    assert len(placement.log_sample) <= LOG_SAMPLE


def row_bias_gemm():
    """gemm_model() with its first bias a row [1, 24], as jax2tf writes a Dense layer's."""
    from graphs import gemm_model

    model = gemm_model()
    bias = next(t for t in model.graph.initializer if t.name == "b1")
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias).reshape(1, -1), "b1"))
    return model


@needs_openvino
@pytest.mark.parametrize("build", ["bert", "vit", "lstm", "if", "embedding", "row bias"])
def test_openvino_loads_every_kind_of_model(build):
    """Where OpenVINO's own checks are stricter than onnxruntime's (a per-channel bias of shape
    [1, N] against its axis), the file must still load there."""
    import kinds

    model, feeds = {"bert": (kinds.bert_model(), kinds.bert_feeds(8)), "vit": (kinds.vit_model(), kinds.image_feeds(8)),
                    "lstm": (kinds.recurrent_model(), kinds.recurrent_feeds(8)),
                    "if": (kinds.if_model(), None), "embedding": (kinds.embedding_model(), None),
                    "row bias": (row_bias_gemm(), None)}[build]
    feeds = feeds or calibration_feeds(model, 8) if build == "row bias" else feeds or kinds.feeds(model, 8)
    quantized, _ = quantize(model, feeds, QuantConfig(wbits=8))
    runner = open_runner(quantized, "openvino")
    runner.run(feeds[0])
    assert runner.placement.whole, runner.placement.fallbacks


@needs_qnn
@pytest.mark.parametrize("wbits", [8, 4])
def test_qnn_htp_runs_a_vit_block_whole_with_target_qnn(wbits):
    """LayerNormalization, Gelu, Softmax and the attention MatMuls as node units; 16-bit activations,
    as QNN HTP refuses the layers writing the residual stream's 16 bits from 8."""
    import kinds

    quantized, _ = quantize(kinds.vit_model(), kinds.image_feeds(8), QuantConfig(wbits=wbits, target="qnn"))
    runner = open_runner(quantized, "qnn")
    runner.run(kinds.image_feeds(1)[0])
    assert runner.placement.whole, runner.placement.fallbacks


@needs_openvino
def test_check_runs_the_file_on_its_targets_runtime_by_default(tmp_path):
    model = inverted_residual_model()
    quantized, _ = quantize(model, calibration_feeds(model, 8), QuantConfig(input_shapes=STATIC, target="openvino"))
    onnx.save(model, tmp_path / "float.onnx")
    onnx.save(quantized, tmp_path / "q.onnx")
    np.save(tmp_path / "data.npy", np.concatenate([f[INPUT] for f in calibration_feeds(quantized, 4, seed=3)]))
    result = CliRunner().invoke(check_command, [str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"),
                                                "--data", str(tmp_path / "data.npy")])
    assert result.exit_code == 0, result.output
    assert "quantized " in result.output and "(openvino)" in result.output
