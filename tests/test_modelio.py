"""Files in and out (README, Guarantees): a model is read only from its own folder and within the
memory limit, damaged files are refused, outputs never alias an input or each other, and they are
written whole or not at all, whatever interrupts the writing."""

import os
import signal
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from graphs import calibration_feeds, conv_model
from interrupts import sigterm_raises_terminated, then_signalled
from onnx_bitsplit.errors import ModelError, Terminated
from onnx_bitsplit.modelio import load_model, save_model


# outputs that alias inputs or each other, in every spelling

@pytest.mark.parametrize("alias", ["same", "dotdot", "symlink", "hardlink"])
def test_output_that_is_the_input_is_refused(folder, alias, run, snapshot, assert_refused):
    target = {"same": folder / "model.onnx", "dotdot": folder / ".." / folder.name / "model.onnx",
              "symlink": folder / "link.onnx", "hardlink": folder / "hard.onnx"}[alias]
    if alias == "symlink":
        target.symlink_to(folder / "model.onnx")
    if alias == "hardlink":
        os.link(folder / "model.onnx", target)
    before = snapshot(folder)
    result = run(folder / "model.onnx", target, "--calib", folder / "calib.npy")
    assert_refused(result, "is the input file", folder, before)


@pytest.mark.parametrize("role", ["--report", "output"])
def test_outputs_on_calibration_data_or_external_data_are_refused(folder, role, run, snapshot, assert_refused):
    onnx.save(conv_model(), folder / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    before = snapshot(folder)
    for victim in ("calib.npy", "ext.bin"):
        args = [folder / "ext.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"]
        args = args + ["--report", folder / victim] if role == "--report" else [args[0], folder / victim, *args[2:]]
        assert_refused(run(*args), "is the input file", folder, before)


def test_report_that_is_the_output_and_output_weights_on_the_input(folder, run, snapshot, assert_refused):
    before = snapshot(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--report", folder / "q.onnx")
    assert_refused(result, "same file as the output", folder, before)
    os.link(folder / "model.onnx", folder / "q.onnx.data")  # the output's weights file would replace the input
    before = snapshot(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--external-data")
    assert_refused(result, "is the input file", folder, before)


def test_output_equal_to_input(model_path, npy_dir, invoke, assert_one_line_error):
    before = model_path.read_bytes()
    assert_one_line_error(invoke(model_path, model_path, "--calib", npy_dir), "input")
    assert model_path.read_bytes() == before


# outputs validated first: a folder, a missing or unwritable folder, a special file

def test_output_that_is_a_folder_or_report_in_a_missing_folder(folder, run, snapshot, assert_refused):
    (folder / "out.onnx").mkdir()
    before = snapshot(folder)
    assert_refused(run(folder / "model.onnx", folder / "out.onnx", "--calib", folder / "calib.npy"),
                   "is a folder", folder, before)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy",
                 "--report", folder / "missing" / "r.json")
    assert_refused(result, "does not exist", folder, before)


def test_missing_output_folder(tmp_path, model_path, npy_dir, invoke, assert_one_line_error):
    assert_one_line_error(invoke(model_path, tmp_path / "no" / "q.onnx", "--calib", npy_dir),
                          "does not exist")


def test_output_folder_not_writable(folder, invoke, snapshot, assert_refused):
    before = snapshot(folder)
    result = invoke(folder / "model.onnx", "/proc/q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "not writable", folder, before)


def test_a_fifo_or_device_as_output_is_refused(folder, run):
    os.mkfifo(folder / "pipe.onnx")
    result = run(folder / "model.onnx", folder / "pipe.onnx", "--calib", folder / "calib.npy")
    assert result.exit_code == 1 and "not a regular file" in result.output
    assert (folder / "pipe.onnx").is_fifo()
    result = run(folder / "model.onnx", "/dev/null", "--calib", folder / "calib.npy")
    assert result.exit_code == 1 and "not a regular file" in result.output


# outputs written as one transaction

@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt(),
                                     Terminated(signal.SIGTERM), Terminated(signal.SIGHUP)])
def test_a_failure_while_writing_leaves_nothing(folder, monkeypatch, failure, run, snapshot, assert_refused):
    from onnx_bitsplit import modelio
    writes = []
    real_open = modelio.OutputFiles.open

    def failing_open(self, path):
        writes.append(path)
        if len(writes) == 2:  # the report, after the model's temporary file is complete
            raise failure
        return real_open(self, path)

    monkeypatch.setattr(modelio.OutputFiles, "open", failing_open)
    before = snapshot(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--report", folder / "r.json")
    code = {OSError: 1, KeyboardInterrupt: 130}.get(type(failure), 128 + getattr(failure, "signum", 0))
    assert_refused(result, "", folder, before, code=code)


def test_a_signal_just_after_a_temporary_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """The window tools/fuzz.py once hit: the file exists, OutputFiles has not recorded it yet."""
    from onnx_bitsplit import modelio
    monkeypatch.setattr(modelio.tempfile, "mkstemp", then_signalled(modelio.tempfile.mkstemp))
    with sigterm_raises_terminated(), pytest.raises(Terminated):
        with modelio.OutputFiles() as files:
            files.write(tmp_path / "q.onnx", b"model")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_saving_leaves_nothing(folder, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(conv_model(), folder / "q.onnx")
    assert sorted(p.name for p in folder.iterdir()) == ["calib.npy", "model.onnx"]


# the model read: damaged files, external data confined to its folder and measured first

def test_directory_as_model(folder, invoke, snapshot, assert_refused):
    (folder / "dir.onnx").mkdir()
    before = snapshot(folder)
    result = invoke(folder / "dir.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "not a file", folder, before)


def test_missing_input(tmp_path, npy_dir, invoke, assert_one_line_error):
    assert_one_line_error(invoke(tmp_path / "nope.onnx", tmp_path / "q.onnx", "--calib", npy_dir),
                          "does not exist")


@pytest.mark.parametrize("damage", ["empty", "flipped", "text"])
def test_damaged_model_files(folder, damage, invoke, snapshot, assert_refused):
    data = (folder / "model.onnx").read_bytes()
    bad = {"empty": b"", "flipped": bytes(b ^ 0xFF for b in data[:64]) + data[64:],
           "text": b"hello, not a model\n"}[damage]
    (folder / "bad.onnx").write_bytes(bad)
    before = snapshot(folder)
    result = invoke(folder / "bad.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "", folder, before)


def test_not_an_onnx_file(tmp_path, npy_dir, invoke, assert_one_line_error):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"this is not a protobuf \xff\xfe")
    assert_one_line_error(invoke(path, tmp_path / "q.onnx", "--calib", npy_dir), "cannot read")
    assert not (tmp_path / "q.onnx").exists()


def test_truncated_model(tmp_path, model_path, npy_dir, invoke, assert_one_line_error):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[:200])
    result = invoke(truncated, tmp_path / "q.onnx", "--calib", npy_dir)
    assert_one_line_error(result, "")
    assert not (tmp_path / "q.onnx").exists()


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
def test_external_data_outside_the_model_folder_is_refused(folder, location, tmp_path_factory, invoke, snapshot,
                                                           assert_refused):
    outside = tmp_path_factory.mktemp("outside") / "secret.bin"
    outside.write_bytes(os.urandom(16 * 8 * 9 * 4))
    (folder / "link.bin").symlink_to(outside)
    path = with_external_data(folder, location)
    before = snapshot(folder)
    result = invoke(path, folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "refused", folder, before)


def test_missing_external_data_file(folder):
    path = with_external_data(folder, "missing.bin")
    with pytest.raises(ModelError, match="refused"):
        load_model(path)


def test_external_data_round_trip(folder, invoke):
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


@pytest.mark.slow
def test_external_data_without_a_length_is_measured_before_reading(folder, run, snapshot, assert_refused):
    onnx.save(conv_model(), folder / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    model = onnx.load(folder / "ext.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in list(tensor.external_data):
            if entry.key == "length":
                tensor.external_data.remove(entry)
    onnx.save(model, folder / "ext.onnx")
    with open(folder / "ext.bin", "r+b") as file:
        file.truncate(3 * 2**30)  # sparse: 3 GiB declared, nothing on disk
    before = snapshot(folder)
    result = run(folder / "ext.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--max-memory", "1G")
    assert_refused(result, "over the memory limit", folder, before)


def test_save_model_writes_the_weights_beside_the_model_when_asked(tmp_path):
    """save_model(external_data=True): OUT.onnx and OUT.onnx.data, loadable together."""
    model = conv_model()
    save_model(model, tmp_path / "q.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert (tmp_path / "q.onnx").stat().st_size < (tmp_path / "q.onnx.data").stat().st_size
    loaded = load_model(tmp_path / "q.onnx")
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer] == \
        [onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(model.graph.initializer[0]))
