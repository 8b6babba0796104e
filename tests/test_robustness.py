"""Bad and hostile input: one `Error:` line, a non-zero exit, the input untouched, nothing left
behind. Plus the model kinds users bring."""

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from graphs import INPUT, calibration_feeds, conv_model, image_model
from onnx_bitsplit.cli import quantize_command
from onnx_bitsplit.errors import ModelError
from onnx_bitsplit.modelio import load_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from fuzz import run_fuzz  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(quantize_command, [str(a) for a in args])


def assert_refused(result, text, folder: Path, expected_files):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert text in lines[0], lines[0]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected_files)


@pytest.fixture
def folder(tmp_path):
    onnx.save(conv_model(), tmp_path / "model.onnx")
    np.save(tmp_path / "calib.npy", np.concatenate([f[INPUT] for f in calibration_feeds(conv_model(), 4)]))
    return tmp_path


def test_directory_as_model(folder):
    (folder / "dir.onnx").mkdir()
    result = invoke(folder / "dir.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "not a file", folder, ["model.onnx", "calib.npy", "dir.onnx"])


@pytest.mark.parametrize("damage", ["empty", "flipped", "text"])
def test_damaged_model_files(folder, damage):
    data = (folder / "model.onnx").read_bytes()
    bad = {"empty": b"", "flipped": bytes(b ^ 0xFF for b in data[:64]) + data[64:],
           "text": b"hello, not a model\n"}[damage]
    (folder / "bad.onnx").write_bytes(bad)
    result = invoke(folder / "bad.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "", folder, ["model.onnx", "calib.npy", "bad.onnx"])


def test_model_without_layers(folder):
    graph = helper.make_graph([helper.make_node("Relu", [INPUT], ["y"])], "g",
                              [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])])
    onnx.save(helper.make_model(graph), folder / "relu.onnx")
    result = invoke(folder / "relu.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "no Conv, Gemm or MatMul", folder, ["model.onnx", "calib.npy", "relu.onnx"])


@pytest.mark.parametrize("op", ["QuantizeLinear", "QLinearConv", "ConvInteger", "DynamicQuantizeLinear",
                                "MatMulInteger"])
def test_already_quantized_models_are_refused(folder, op):
    model = conv_model()
    model.graph.node.append(helper.make_node(op, ["y"], ["extra"], name="quantized"))
    onnx.save(model, folder / "quantized.onnx", )
    result = invoke(folder / "quantized.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "already quantized", folder, ["model.onnx", "calib.npy", "quantized.onnx"])


def test_npz_without_the_input_name(folder):
    np.savez(folder / "calib.npz", image=np.zeros((2, 8, 12, 12), np.float32))
    result = invoke(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npz")
    assert_refused(result, "no array named x", folder, ["model.onnx", "calib.npy", "calib.npz"])


def test_npz_of_the_wrong_shape(folder):
    np.savez(folder / "calib.npz", x=np.zeros((2, 8, 5, 5), np.float32))
    result = invoke(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npz")
    assert_refused(result, "shape", folder, ["model.onnx", "calib.npy", "calib.npz"])


def test_missing_calibration_folder(folder):
    onnx.save(image_model(), folder / "rgb.onnx")
    result = invoke(folder / "rgb.onnx", folder / "q.onnx", "--calib", folder / "nowhere")
    assert_refused(result, "does not exist", folder, ["model.onnx", "calib.npy", "rgb.onnx"])


def test_calib_count_zero(folder):
    result = invoke(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--calib-count", "0")
    assert_refused(result, "calib_count", folder, ["model.onnx", "calib.npy"])


def test_output_folder_not_writable(folder):
    result = invoke(folder / "model.onnx", "/proc/q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "not writable", folder, ["model.onnx", "calib.npy"])


def test_interrupt_leaves_nothing(folder, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("onnx_bitsplit.api.quantize", interrupted)
    result = invoke(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert result.exit_code == 130 and result.output.strip() == "Error: interrupted"
    assert sorted(p.name for p in folder.iterdir()) == ["calib.npy", "model.onnx"]


def test_interrupt_while_saving_leaves_nothing(folder, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(conv_model(), folder / "q.onnx")
    assert sorted(p.name for p in folder.iterdir()) == ["calib.npy", "model.onnx"]


def with_external_data(folder: Path, location: str) -> Path:
    """conv_model() whose first weight points at `location`."""
    model = conv_model()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(16 * 8 * 9 * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "hostile.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.bin",
                                      "link.bin", "C:\\\\windows\\\\system.ini"])
def test_external_data_outside_the_model_folder_is_refused(folder, location, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.bin"
    outside.write_bytes(os.urandom(16 * 8 * 9 * 4))
    (folder / "link.bin").symlink_to(outside)
    path = with_external_data(folder, location)
    result = invoke(path, folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "refused", folder, ["model.onnx", "calib.npy", "hostile.onnx", "link.bin"])


def test_external_data_round_trip(folder):
    """A model with its weights beside it loads; --external-data writes them beside the output."""
    model = conv_model()
    onnx.save(model, folder / "external.onnx", save_as_external_data=True, location="external.bin",
              size_threshold=0)
    loaded = load_model(folder / "external.onnx")
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)
    result = invoke(folder / "external.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--external-data")
    assert result.exit_code == 0, result.output
    assert (folder / "q.onnx.data").is_file()
    session = ort.InferenceSession(str(folder / "q.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, calibration_feeds(model, 1)[0])[0].shape == (1, 8, 6, 6)


def test_fuzzed_inputs_paths_and_signals():
    """300 runs of tools/fuzz.py (damaged models and calibration data, aliased outputs, signals)."""
    violations, outcomes = run_fuzz(300, seed=0)
    assert violations == []
    for kind in ("model", "calibration", "signal"):  # both success and refusal occur, so both are checked
        assert 0 in outcomes[kind] and len(outcomes[kind]) > 1, outcomes
    assert set(outcomes["paths"]) == {1}  # every aliased or unwritable output is refused


def test_missing_external_data_file(folder):
    path = with_external_data(folder, "missing.bin")
    with pytest.raises(ModelError, match="refused"):
        load_model(path)
