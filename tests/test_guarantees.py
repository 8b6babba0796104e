"""What the command promises, class by class (README, Guarantees): inputs are never touched,
outputs are whole or absent, bad data never reaches a model silently, memory is bounded before it
is allocated, every exit is one line with a documented code."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from graphs import INPUT, calibration_feeds, conv_model, image_model
from interrupts import sigterm_raises_terminated, then_signalled
from onnx_bitsplit.cli import check_command, main
from onnx_bitsplit.errors import Terminated


@dataclass
class Result:
    exit_code: int
    output: str


def run(*args) -> Result:
    """The command as users run it (the group, `quantize` implied): exit code and stdout + stderr."""
    with CliRunner().isolation() as (_, _, output):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
    return Result(code, output.getvalue().decode())


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_refused(result, text, folder, before, code=1):
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert text in lines[0], lines[0]
    assert digest(folder) == before  # every input byte for byte, and nothing new beside them


@pytest.fixture
def folder(tmp_path):
    onnx.save(conv_model(), tmp_path / "model.onnx")
    np.save(tmp_path / "calib.npy", np.concatenate([f[INPUT] for f in calibration_feeds(conv_model(), 4)]))
    return tmp_path


# 1. outputs that alias inputs or each other, in every spelling

@pytest.mark.parametrize("alias", ["same", "dotdot", "symlink", "hardlink"])
def test_output_that_is_the_input_is_refused(folder, alias):
    target = {"same": folder / "model.onnx", "dotdot": folder / ".." / folder.name / "model.onnx",
              "symlink": folder / "link.onnx", "hardlink": folder / "hard.onnx"}[alias]
    if alias == "symlink":
        target.symlink_to(folder / "model.onnx")
    if alias == "hardlink":
        os.link(folder / "model.onnx", target)
    before = digest(folder)
    result = run(folder / "model.onnx", target, "--calib", folder / "calib.npy")
    assert_refused(result, "is the input file", folder, before)


@pytest.mark.parametrize("role", ["--report", "output"])
def test_outputs_on_calibration_data_or_external_data_are_refused(folder, role):
    onnx.save(conv_model(), folder / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    before = digest(folder)
    for victim in ("calib.npy", "ext.bin"):
        args = [folder / "ext.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"]
        args = args + ["--report", folder / victim] if role == "--report" else [args[0], folder / victim, *args[2:]]
        assert_refused(run(*args), "is the input file", folder, before)


def test_report_that_is_the_output_and_output_weights_on_the_input(folder):
    before = digest(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--report", folder / "q.onnx")
    assert_refused(result, "same file as the output", folder, before)
    os.link(folder / "model.onnx", folder / "q.onnx.data")  # the output's weights file would replace the input
    before = digest(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--external-data")
    assert_refused(result, "is the input file", folder, before)


# 2. non-finite data never reaches a model

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_values_are_refused(folder, bad):
    data = np.load(folder / "calib.npy")
    data[2, 1, 3, 3] = bad
    np.save(folder / "calib.npy", data)
    before = digest(folder)
    assert_refused(run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"),
                   "NaN or infinite", folder, before)


def test_zero_std_is_refused(tmp_path):
    onnx.save(image_model(), tmp_path / "rgb.onnx")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "images" / "a.png")
    before = digest(tmp_path)
    result = run(tmp_path / "rgb.onnx", tmp_path / "q.onnx", "--calib", tmp_path / "images", "--std", "0,1,1")
    assert_refused(result, "std non-zero", tmp_path, before)


def test_a_model_computing_nan_is_refused(folder):
    model = conv_model()
    bias = next(t for t in model.graph.initializer if t.name == "b2")
    bias.CopyFrom(numpy_helper.from_array(np.full(16, np.nan, np.float32), "b2"))
    model.graph.node.insert(1, helper.make_node("Mul", ["c1", "nan"], ["c1n"], name="poison"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
    model.graph.node[2].input[0] = "c1n"
    onnx.save(model, folder / "nan.onnx")
    before = digest(folder)
    assert_refused(run(folder / "nan.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"),
                   "NaN or infinite", folder, before)


def test_check_fails_on_non_finite_outputs(folder):
    model = conv_model()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    weight = broken.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(np.full((16, 8, 3, 3), np.nan, np.float32), weight.name))
    onnx.save(broken, folder / "broken.onnx")
    result = CliRunner().invoke(check_command, [str(folder / "model.onnx"), str(folder / "broken.onnx"),
                                                "--data", str(folder / "calib.npy"), "--min-sqnr", "10"])
    assert result.exit_code == 3 and "not finite" in result.output, result.output


# 3. memory: declared sizes are checked before anything is allocated

def test_a_tiny_npz_declaring_a_huge_array_is_refused(folder):
    np.savez_compressed(folder / "bomb.npz", x=np.zeros((64, 8, 512, 512), np.float32))  # 512 MiB, ~500 KB
    before = digest(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "bomb.npz", "--max-memory", "64M")
    assert_refused(result, "over the memory limit", folder, before)


def test_a_constant_that_would_fold_into_gigabytes_is_refused(folder):
    model = conv_model()
    model.graph.node.append(helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="big"))
    model.graph.node.append(helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0, name="sum"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([50000, 50000], np.int64), "big_shape"))
    model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    onnx.save(model, folder / "fold.onnx")
    before = digest(folder)
    result = run(folder / "fold.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--max-memory", "1G")
    assert_refused(result, "over the memory limit", folder, before)


def test_external_data_without_a_length_is_measured_before_reading(folder):
    onnx.save(conv_model(), folder / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    model = onnx.load(folder / "ext.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in list(tensor.external_data):
            if entry.key == "length":
                tensor.external_data.remove(entry)
    onnx.save(model, folder / "ext.onnx")
    with open(folder / "ext.bin", "r+b") as file:
        file.truncate(3 * 2**30)  # sparse: 3 GiB declared, nothing on disk
    before = digest(folder)
    result = run(folder / "ext.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--max-memory", "1G")
    assert_refused(result, "over the memory limit", folder, before)


@pytest.mark.parametrize("size", [(1, 40000), (40000, 1), (3, 30000)])
def test_extreme_image_shapes_decode_into_bounded_memory(tmp_path, size):
    from onnx_bitsplit.calibration import load_image
    Image.new("L", size, 128).save(tmp_path / "strip.png")
    pixels = load_image(tmp_path / "strip.png", (16, 16))
    assert pixels.shape == (3, 16, 16) and np.allclose(pixels, 128)


# 4. leftovers: outputs validated first, written as one transaction

def test_output_that_is_a_folder_or_report_in_a_missing_folder(folder):
    (folder / "out.onnx").mkdir()
    before = digest(folder)
    assert_refused(run(folder / "model.onnx", folder / "out.onnx", "--calib", folder / "calib.npy"),
                   "is a folder", folder, before)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy",
                 "--report", folder / "missing" / "r.json")
    assert_refused(result, "does not exist", folder, before)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt(),
                                     Terminated(signal.SIGTERM), Terminated(signal.SIGHUP)])
def test_a_failure_while_writing_leaves_nothing(folder, monkeypatch, failure):
    from onnx_bitsplit import modelio
    writes = []
    real_open = modelio.OutputFiles.open

    def failing_open(self, path):
        writes.append(path)
        if len(writes) == 2:  # the report, after the model's temporary file is complete
            raise failure
        return real_open(self, path)

    monkeypatch.setattr(modelio.OutputFiles, "open", failing_open)
    before = digest(folder)
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


def wait_until_caught(pid: int, signum: int, timeout: float = 30.0) -> None:
    """Until the process has a handler for `signum` (Linux's /proc; elsewhere a fixed wait)."""
    status, deadline = Path(f"/proc/{pid}/status"), time.monotonic() + timeout
    if not status.exists():
        time.sleep(0.3)
        return
    while time.monotonic() < deadline:
        caught = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
        if int(caught, 16) >> (signum - 1) & 1:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} never installed a handler for signal {signum}")


def test_sigterm_in_a_real_process_exits_143_and_leaves_nothing(folder):
    before = digest(folder)
    process = subprocess.Popen([sys.executable, "-m", "onnx_bitsplit", str(folder / "model.onnx"), str(folder / "q.onnx"),
                                "--calib", str(folder / "calib.npy")], stderr=subprocess.PIPE, text=True)
    wait_until_caught(process.pid, signal.SIGTERM)  # then onnx and onnxruntime are still being imported
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and stderr.strip() == "Error: terminated by SIGTERM", stderr
    assert digest(folder) == before


# 5. already-quantized models, wherever the quantized operators hide

@pytest.mark.parametrize("where", ["subgraph", "contrib"])
def test_quantized_operators_anywhere_are_refused(folder, where):
    model = conv_model()
    if where == "contrib":
        model.graph.node.append(helper.make_node("MatMulNBits", ["y", "w1"], ["z"], domain="com.microsoft", K=8, N=8,
                                                 bits=4, block_size=16))
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    else:
        branch = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["d"])], "branch", [],
                                   [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)])
        model.graph.node.append(helper.make_node("If", ["cond"], ["d"], then_branch=branch, else_branch=branch))
    onnx.save(model, folder / "q_in.onnx")
    before = digest(folder)
    assert_refused(run(folder / "q_in.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"),
                   "already quantized", folder, before)


# 6. every exit is one line with a documented code

@pytest.mark.parametrize("args,code", [
    ("M O C --no-such-option", 2), ("M O C --wbits four", 2), ("M C", 2), ("M O --calib", 2), ("M O", 2),
    ("M O C --max-memory lots", 2), ("check M", 2), ("M O C --wbits 9", 1), ("M O C --calib-count 0", 1),
])
def test_usage_errors_are_one_line(folder, args, code):
    before = digest(folder)
    words = {"M": folder / "model.onnx", "O": folder / "q.onnx", "C": f"--calib={folder / 'calib.npy'}"}
    assert_refused(run(*[words.get(word, word) for word in args.split()]), "", folder, before, code=code)


def test_version_and_the_quantize_subcommand(folder):
    assert run("--version").output.startswith("onnx-bitsplit, version ")
    result = run("quantize", folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "-q")
    assert result.exit_code == 0 and (folder / "q.onnx").is_file()


# 8. names from the model never reach the terminal raw

def test_control_characters_in_names_are_escaped(folder):
    model = conv_model()
    for node in model.graph.node:
        node.name = f"\x1b[31m{node.name}\x07\r"
    onnx.save(model, folder / "ansi.onnx")
    result = run(folder / "ansi.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--wbits", "4")
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\x07\r") and "\\x1b[31m" in result.output


# 9. special files are never replaced

def test_a_fifo_or_device_as_output_is_refused(folder):
    os.mkfifo(folder / "pipe.onnx")
    result = run(folder / "model.onnx", folder / "pipe.onnx", "--calib", folder / "calib.npy")
    assert result.exit_code == 1 and "not a regular file" in result.output
    assert (folder / "pipe.onnx").is_fifo()
    result = run(folder / "model.onnx", "/dev/null", "--calib", folder / "calib.npy")
    assert result.exit_code == 1 and "not a regular file" in result.output


# 7. work linear in the number of layers: a fixed number of sessions per layer, one graph repair

def chain_model(layers: int) -> onnx.ModelProto:
    """x -> (Conv 1x1 -> Relu) x layers -> y"""
    rng = np.random.default_rng(0)
    nodes, init, name = [], [], INPUT
    for i in range(layers):
        init.append(numpy_helper.from_array(rng.normal(0, 0.4, (8, 8, 1, 1)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [name, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        name = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 8, 4, 4])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 8, 4, 4])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_work_per_layer_is_constant(monkeypatch):
    import onnx_graphsurgeon as gs
    from onnx_bitsplit import QuantConfig, capture, quantize
    counts = {}

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counting(capture, "make_session")
    counting(gs.Graph, "toposort")
    totals = {}
    for layers in (10, 20, 40):
        counts.clear()
        model = chain_model(layers)
        feeds = [{INPUT: np.random.default_rng(i).normal(size=(1, 8, 4, 4)).astype(np.float32)} for i in range(4)]
        quantize(model, feeds, QuantConfig(wbits=8, iterations=1))
        totals[layers] = dict(counts)
    assert totals[40]["make_session"] - totals[20]["make_session"] == 2 * (totals[20]["make_session"] - totals[10]["make_session"])
    assert totals[10]["toposort"] == totals[40]["toposort"]  # the graph is repaired once per edit batch, not per layer


def test_check_json_of_non_finite_outputs_is_strict(folder, capsys):
    model = conv_model()
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(np.full((16, 8, 3, 3), np.nan, np.float32), weight.name))
    onnx.save(model, folder / "nan.onnx")
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(folder / "model.onnx"), str(folder / "nan.onnx"), "--data", str(folder / "calib.npy"), "--json"])
    figures = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert exit_info.value.code == 3 and figures["passed"] is False and figures["outputs"][0]["finite"] is False
