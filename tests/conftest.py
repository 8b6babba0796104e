"""Fixtures the test files share: folders holding a model and its data, the command run as users
run it, and the checks that a refused run is one `Error:` line and leaves its folder as it was."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from graphs import INPUT, calibration_feeds, conv_model, damaged, gemm_model
from onnx_bitsplit.cli import main, quantize_command


@dataclass
class Result:
    exit_code: int
    output: str


def _run(*args) -> Result:
    """The command as users run it (main(): the group, `quantize` implied, usage errors one line):
    exit code and stdout + stderr."""
    with CliRunner().isolation() as (_, _, output):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
    return Result(code, output.getvalue().decode())


def _invoke(*args):
    """The quantize command alone, through click's test runner."""
    return CliRunner().invoke(quantize_command, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry of the folder: a regular file by its SHA-256, anything else by its kind."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else
            "folder" if p.is_dir() else "other" for p in sorted(folder.iterdir())}


def _assert_one_line_error(result, text: str, code: int = 1) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error:") and text in lines[0], result.output
    assert "Traceback" not in result.output


def _assert_refused(result, text: str, folder: Path, before: dict[str, str], code: int = 1) -> None:
    """One `Error:` line with `text` and exit code `code`; every input byte for byte, and nothing
    new beside them."""
    _assert_one_line_error(result, text, code)
    assert _snapshot(folder) == before


@pytest.fixture
def run():
    return _run


@pytest.fixture
def invoke():
    return _invoke


@pytest.fixture
def snapshot():
    return _snapshot


@pytest.fixture
def assert_one_line_error():
    return _assert_one_line_error


@pytest.fixture
def assert_refused():
    return _assert_refused


@pytest.fixture
def folder(tmp_path):
    """model.onnx (graphs.conv_model) and calib.npy, 4 samples of its input."""
    onnx.save(conv_model(), tmp_path / "model.onnx")
    np.save(tmp_path / "calib.npy", np.concatenate([f[INPUT] for f in calibration_feeds(conv_model(), 4)]))
    return tmp_path


@pytest.fixture
def model_path(tmp_path):
    """model.onnx: graphs.conv_model."""
    path = tmp_path / "model.onnx"
    onnx.save(conv_model(), path)
    return path


@pytest.fixture
def npy_dir(tmp_path):
    """calib/: 6 .npy files of conv_model's input."""
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, feed in enumerate(calibration_feeds(conv_model(), count=6)):
        np.save(folder / f"{index:02d}.npy", feed[INPUT])
    return folder


@pytest.fixture
def models_and_data(tmp_path):
    """float.onnx (graphs.gemm_model), damaged.onnx (its first weight negated) and data.npy, 30 samples."""
    model = gemm_model()
    onnx.save(model, tmp_path / "float.onnx")
    onnx.save(damaged(model), tmp_path / "damaged.onnx")
    np.save(tmp_path / "data.npy", np.concatenate([f[INPUT] for f in calibration_feeds(model, count=30)]))
    return tmp_path
