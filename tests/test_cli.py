"""The command line: routing (`quantize` implied, `check`), flags into a conversion, one line and a
documented exit code for every failure, signals and interrupts, the fuzzer's rules."""

import hashlib
import json
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from graphs import conv_model, image_model
from onnx_bitsplit.cli import check_command, main
from tools.fuzz import run_fuzz, wait_until_caught


def test_help_lists_the_options(invoke):
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--calib", "--calib-count", "--preset", "--mean", "--std", "--wbits",
                   "--first-last-wbits", "--error-compensation", "--report"):
        assert option in result.output


def test_converts_and_writes_report(tmp_path, model_path, npy_dir, invoke):
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    before = model_path.read_bytes()
    result = invoke(model_path, out, "--calib", npy_dir, "--wbits", "4", "--report", report)
    assert result.exit_code == 0, result.output
    assert "quantized 3 layers" in result.output
    onnx.checker.check_model(onnx.load(out))
    figures = json.loads(report.read_text())
    assert [layer["bits"] for layer in figures["layers"]] == [8, 4, 8]
    assert figures["calibration_samples"] == 6
    assert model_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "model.onnx", "q.onnx", "report.json"]
    reference = tmp_path / "plain"  # written the usual way: the output gets the same permissions
    reference.write_text("")
    assert out.stat().st_mode & 0o777 == report.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_equalize_flag(tmp_path, model_path, npy_dir, invoke):
    report = tmp_path / "report.json"
    result = invoke(model_path, tmp_path / "q.onnx", "--calib", npy_dir, "--equalize", "--report", report)
    assert result.exit_code == 0, result.output
    assert "equalized 2 layer pairs" in result.output  # conv1 -> Relu -> conv2 -> Relu -> conv3
    assert [(p["producer"], p["consumer"]) for p in json.loads(report.read_text())["equalized"]] == [
        ("conv1", "conv2"), ("conv2", "conv3")]


def test_dynamic_size_images_need_input_size(tmp_path, invoke, assert_one_line_error):
    model = image_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.save(model, tmp_path / "dynamic.onnx")
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        Image.fromarray(np.full((30, 40, 3), 60 * index, np.uint8)).save(images / f"{index}.png")
    args = [tmp_path / "dynamic.onnx", tmp_path / "q.onnx", "--calib", images]
    assert_one_line_error(invoke(*args), "--input-size")
    result = invoke(*args, "--input-size", "24x32")
    assert result.exit_code == 0, result.output
    assert "warning: input 'x' has a dynamic size and was calibrated at one only (3x24x32)" in result.output
    result = invoke(*args, "--input-size", "24x32", "--input-size", "16x16")
    assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_an_nhwc_model_is_calibrated_from_images(tmp_path, invoke):
    """x [N,8,8,3] -> Transpose -> Conv: the layout comes from the model's input."""
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2], name="to_nchw"),
         onnx.helper.make_node("Conv", ["t", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "nhwc",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8, 8, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [onnx.numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), tmp_path / "nhwc.onnx")
    (tmp_path / "images").mkdir()
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{index}.png")
    result = invoke(tmp_path / "nhwc.onnx", tmp_path / "q.onnx", "--calib", tmp_path / "images", "--bgr", "--quiet")
    assert result.exit_code == 0, result.output


# every exit is one line with a documented code

@pytest.mark.parametrize("args,code", [
    ("M O C --no-such-option", 2), ("M O C --wbits four", 2), ("M C", 2), ("M O --calib", 2), ("M O", 2),
    ("M O C --max-memory lots", 2), ("check M", 2),
    ("M O C --wbits 9", 2), ("M O C --calib-count 0", 2),  # range-checked by click: usage errors
    ("M O C --input-shape 1x8x12", 2), ("M O C --input-shape y=1x8x12x12", 2),  # checked against the model's inputs
])
def test_usage_errors_are_one_line(folder, args, code, run, snapshot, assert_refused):
    before = snapshot(folder)
    words = {"M": folder / "model.onnx", "O": folder / "q.onnx", "C": f"--calib={folder / 'calib.npy'}"}
    assert_refused(run(*[words.get(word, word) for word in args.split()]), "", folder, before, code=code)


def test_a_bare_word_that_names_no_file_is_no_command(folder, run, snapshot, assert_refused):
    before = snapshot(folder)
    result = run("quantise", folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "no such command 'quantise'", folder, before, code=2)


def test_version_and_the_quantize_subcommand(folder, run):
    assert run("--version").output.startswith("onnx-bitsplit, version ")
    result = run("quantize", folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "-q")
    assert result.exit_code == 0 and (folder / "q.onnx").is_file()


def test_control_characters_in_names_are_escaped(folder, run):
    """Names from the model never reach the terminal raw."""
    model = conv_model()
    for node in model.graph.node:
        node.name = f"\x1b[31m{node.name}\x07\r"
    onnx.save(model, folder / "ansi.onnx")
    result = run(folder / "ansi.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--wbits", "4")
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\x07\r") and "\\x1b[31m" in result.output


def test_interrupt_leaves_nothing(folder, monkeypatch, invoke):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("onnx_bitsplit.api.quantize", interrupted)
    result = invoke(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert result.exit_code == 130 and result.output.strip() == "Error: interrupted"
    assert sorted(p.name for p in folder.iterdir()) == ["calib.npy", "model.onnx"]


def test_sigterm_in_a_real_process_exits_143_and_leaves_nothing(folder, snapshot):
    before = snapshot(folder)
    process = subprocess.Popen([sys.executable, "-m", "onnx_bitsplit", str(folder / "model.onnx"), str(folder / "q.onnx"),
                                "--calib", str(folder / "calib.npy")], stderr=subprocess.PIPE, text=True)
    assert wait_until_caught(process.pid, signal.SIGTERM)  # then onnx and onnxruntime are still being imported
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and stderr.strip() == "Error: terminated by SIGTERM", stderr
    assert snapshot(folder) == before


@pytest.mark.slow
def test_fuzzed_inputs_paths_and_signals():
    """300 runs of tools/fuzz.py (damaged models and calibration data, aliased outputs, signals,
    option values)."""
    violations, outcomes = run_fuzz(300, seed=0)
    assert violations == []
    for kind in ("model", "calibration", "signal", "options"):  # both success and refusal occur: both are checked
        assert 0 in outcomes[kind] and len(outcomes[kind]) > 1, outcomes
    assert 2 in outcomes["options"]
    assert set(outcomes["paths"]) == {1}  # every aliased or unwritable output is refused


# the check command: its gate, its JSON on standard output, its warning

@pytest.mark.parametrize("gate,exit_code", [("0.5", 0), ("0.99", 3)])
def test_cli_gates_on_agreement(models_and_data, gate, exit_code):
    d = models_and_data
    quantized = d / ("float.onnx" if gate == "0.5" else "damaged.onnx")
    result = CliRunner().invoke(check_command, [str(d / "float.onnx"), str(quantized), "--data",
                                                str(d / "data.npy"), "--min-agree", gate])
    assert result.exit_code == exit_code, result.output
    assert "agree" in result.output


def test_a_labels_file_too_large_for_the_budget_is_refused_unread(models_and_data):
    d = models_and_data
    with open(d / "labels.txt", "wb") as file:  # sparse: 512 MiB that take no disk
        file.truncate(512 * 2**20)
    result = CliRunner().invoke(check_command, [str(d / "float.onnx"), str(d / "float.onnx"), "--data",
                                                str(d / "data.npy"), "--labels", str(d / "labels.txt"),
                                                "--max-memory", "1G"])
    assert result.exit_code == 1 and "too large for the memory limit" in result.output


def test_cli_json_and_routing(models_and_data, capsys):
    d = models_and_data
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(d / "float.onnx"), str(d / "float.onnx"), "--data", str(d / "data.npy"), "--json"])
    assert exit_info.value.code == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["samples"] == 30 and figures["outputs"][0]["agreement"] == 1.0


def test_overlap_with_the_calibration_data_is_warned(models_and_data, capsys):
    d = models_and_data
    with pytest.raises(SystemExit):
        main(["check", str(d / "float.onnx"), str(d / "float.onnx"), "--data", str(d / "data.npy"),
              "--calib", str(d / "data.npy"), "--batch-size", "7"])
    captured = capsys.readouterr()
    assert "1 of the 1 --data files are calibration data" in captured.err
    assert "30 samples in batches of 7" in captured.out


def test_a_failed_run_reporting_to_stdout_prints_a_json_error(folder):
    """A pipeline parsing `--report -` gets a JSON object on every failure: a usage error (2), a
    conversion error (1)."""
    cases = [(["--wbits", "9"], 2, "--wbits"), (["--calib-count", "3"], 1, "")]
    onnx.save(conv_model(), folder / "model.onnx")
    for extra, code, text in cases:
        result = subprocess.run([sys.executable, "-m", "onnx_bitsplit", folder / "model.onnx", folder / "q.onnx",
                                 "--calib", folder / "missing.npy", "--report", "-", *extra],
                                capture_output=True, text=True)
        record = json.loads(result.stdout)
        assert result.returncode == code and record["error"]["exit_code"] == code
        assert text in record["error"]["message"] and record["tool"]["name"] == "onnx-bitsplit"
        assert result.stderr.count("Error:") == 1 and not (folder / "q.onnx").exists()


def test_the_report_records_what_a_build_needs(folder):
    result = subprocess.run([sys.executable, "-m", "onnx_bitsplit", folder / "model.onnx", folder / "q.onnx",
                             "--calib", folder / "calib.npy", "--report", "-", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["tool"]["versions"]) == {"onnx", "onnxruntime", "numpy"}
    assert report["sha256"] == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
                                for path in (folder / "model.onnx", folder / "q.onnx")}
    assert report["calibration"] == {"reader": "arrays", "path": str(folder / "calib.npy"), "files": 1}
    assert report["wall_seconds"] >= sum(report["phase_seconds"].values()) > 0
    assert report["options"]["work_dir"] == str(folder.resolve())


def test_the_report_records_how_images_were_made(tmp_path):
    model, images = tmp_path / "model.onnx", tmp_path / "images"
    onnx.save(image_model(), model)
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (40, 30), (index * 50, 90, 20)).save(images / f"{index}.png")
    result = subprocess.run([sys.executable, "-m", "onnx_bitsplit", model, tmp_path / "q.onnx", "--calib", images,
                             "--preset", "torch", "--bgr", "--resize", "letterbox", "--report", "-", "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calibration = json.loads(result.stdout)["calibration"]
    assert calibration["reader"] == "images" and calibration["images"] == 3 and calibration["preset"] == "torch"
    assert calibration["bgr"] and calibration["resize"] == "letterbox" and calibration["sizes"] == [[16, 16]]
    assert calibration["mean"] == pytest.approx([123.675, 116.28, 103.53])


@pytest.mark.parametrize("closed", ["stderr", "stdout"])
def test_a_closed_stream_decides_by_what_it_carries(folder, closed):
    """stderr carries progress and the summary: closed, the conversion still succeeds. stdout
    carries the `--report -` record, part of the transaction: closed, nothing is written."""
    command = [sys.executable, "-m", "onnx_bitsplit", folder / "model.onnx", folder / "q.onnx",
               "--calib", folder / "calib.npy", *(["--report", "-"] if closed == "stdout" else [])]
    result = subprocess.run(" ".join(map(str, command)) + (" 2>&-" if closed == "stderr" else " >&-"),
                            shell=True, capture_output=closed == "stderr" and False)
    if closed == "stderr":
        assert result.returncode == 0 and (folder / "q.onnx").is_file()
    else:
        assert result.returncode == 1 and not (folder / "q.onnx").exists()


def test_the_model_is_judged_before_its_calibration_data(folder, assert_refused, snapshot, run):
    """An already-quantized model is refused as such, not for calibration data it cannot take."""
    model = conv_model()
    model.graph.node.append(onnx.helper.make_node("QuantizeLinear", ["y", "s"], ["y_q"]))
    onnx.save(model, folder / "quantized.onnx")
    (folder / "images").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "images" / "a.png")  # not 3-channel data for this model
    before = snapshot(folder)
    result = run(folder / "quantized.onnx", folder / "q.onnx", "--calib", folder / "images")
    assert_refused(result, "already quantized", folder, before)
