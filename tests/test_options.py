"""The command line's value types: each option's value is parsed and range-checked by click, so a
bad one is a usage error (exit 2) whose one line names the option, before any file is read."""

import onnx
import pytest
from PIL import Image

from graphs import image_model
from onnx_bitsplit.cli import check_command, main, quantize_command

# option, a good value, the parameter it sets and what it parses to, a bad value
QUANTIZE_OPTIONS = [
    ("--wbits", "3", "wbits", 3, "9"),  # Bits
    ("--wbits", "2", "wbits", 2, "four"),
    ("--first-last-wbits", "same", "first_last_wbits", None, "1"),  # Bits(same=True)
    ("--depthwise-wbits", "5", "depthwise_wbits", 5, "same8"),
    ("--bits-per-layer", "op:Conv=3", "layer_bits", (("op:Conv", 3),), "conv=99"),  # LayerBits
    ("--bits-per-layer", "a=b=4", "layer_bits", (("a=b", 4),), "=4"),
    ("--max-memory", "512M", "max_memory", 512 * 2**20, "1"),  # ByteSize: at least 1 MiB
    ("--max-memory", "1.5g", "max_memory", 3 * 2**29, "lots"),
    ("--max-memory", "2097152", "max_memory", 2 * 2**20, "-4G"),
    ("--input-size", "24x32", "input_size", ((24, 32),), "axb"),  # HxW
    ("--input-size", "640X480", "input_size", ((640, 480),), "1x2x3"),
    ("--input-shape", "1x8x12x12", "input_shapes", (("", (1, 8, 12, 12)),), "1x0x12x12"),  # [NAME=]DIMS
    ("--input-shape", "images=1x3x224x224", "input_shapes", (("images", (1, 3, 224, 224)),), "images=1x3x"),
    ("--mean", "127.5", "mean", (127.5,) * 3, "nan"),  # ChannelValues
    ("--mean", "123.7,116.3,103.5", "mean", (123.7, 116.3, 103.5), "1,2"),
    ("--std", "58.4,57.1,57.4", "std", (58.4, 57.1, 57.4), "0,1,1"),  # ChannelValues(nonzero=True)
    ("--crop-ratio", "1", "crop_ratio", 1.0, "0"),  # FiniteFloat(0, 1, min_open)
    ("--size-budget", "0.18", "size_budget", 0.18, "0"),
    ("--compensation-blend", "0", "compensation_blend", 0.0, "2"),
    ("--damping", "0.5", "damping", 0.5, "inf"),
    ("--abits", "16", "abits", 16, "4"),  # click.Choice
    ("--weight-storage", "int8", "weight_storage", "int8", "int2"),
    ("--preset", "torch", "preset", "torch", "imagenet"),
    ("--layout", "nhwc", "layout", "nhwc", "chw"),
    ("--iterations", "0", "iterations", 0, "-1"),  # click.IntRange
    ("--batch-size", "8", "batch_size", 8, "0"),
    ("--calib-count", "16", "calib_count", 16, "0"),
    ("--sample-rows", "0", "sample_rows", 0, "-5"),
    ("--seed", "7", "seed", 7, "-1"),
]
CHECK_OPTIONS = [
    ("--min-agree", "90%", "min_agree", 0.9, "ninety"),  # Fraction
    ("--min-agree", "0.95", "min_agree", 0.95, "95"),
    ("--min-sqnr", "20", "min_sqnr", 20.0, "nan"),  # FiniteFloat
    ("--data-count", "5", "count", 5, "0"),
    ("--provider", "openvino", "provider", "openvino", "gpu"),
    ("--max-memory", "4G", "max_memory", 4 * 2**30, "0.5M"),
]


def quantize_args(folder, option, value):
    return [folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", option, value]


def check_args(folder, option, value):
    return ["check", folder / "model.onnx", folder / "model.onnx", "--data", folder / "calib.npy", option, value]


@pytest.mark.parametrize("option,good,param,parsed,bad", QUANTIZE_OPTIONS, ids=lambda v: str(v))
def test_quantize_option_values(folder, option, good, param, parsed, bad, run, snapshot, assert_refused):
    args = [str(a) for a in quantize_args(folder, option, good)]
    assert quantize_command.make_context("quantize", args).params[param] == parsed
    before = snapshot(folder)
    assert_refused(run(*quantize_args(folder, option, bad)), f"Invalid value for '{option}'", folder, before, code=2)


@pytest.mark.parametrize("option,good,param,parsed,bad", CHECK_OPTIONS, ids=lambda v: str(v))
def test_check_option_values(folder, option, good, param, parsed, bad, run, snapshot, assert_refused):
    args = [str(a) for a in check_args(folder, option, good)[1:]]
    assert check_command.make_context("check", args).params[param] == parsed
    before = snapshot(folder)
    assert_refused(run(*check_args(folder, option, bad)), f"Invalid value for '{option}'", folder, before, code=2)


@pytest.mark.parametrize("value", ["90", "1.5", "-0.1", "ninety"])
def test_min_agree_is_a_fraction_or_a_percent(models_and_data, capsys, value):
    d = models_and_data
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(d / "float.onnx"), str(d / "float.onnx"), "--data", str(d / "data.npy"), "--min-agree", value])
    assert exit_info.value.code == 2 and "percent" in capsys.readouterr().err


def test_calib_count_zero(folder, run, snapshot, assert_refused):
    before = snapshot(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--calib-count", "0")
    assert_refused(result, "Invalid value for '--calib-count'", folder, before, code=2)


def test_bad_bits(folder, run, snapshot, assert_refused):
    before = snapshot(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--wbits", "9")
    assert_refused(result, "Invalid value for '--wbits'", folder, before, code=2)


def test_activation_bits_other_than_8_are_refused(folder, run, snapshot, assert_refused):
    before = snapshot(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--abits", "4")
    assert_refused(result, "Invalid value for '--abits'", folder, before, code=2)


def test_zero_std_is_refused(tmp_path, run, snapshot, assert_refused):
    onnx.save(image_model(), tmp_path / "rgb.onnx")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "images" / "a.png")
    before = snapshot(tmp_path)
    result = run(tmp_path / "rgb.onnx", tmp_path / "q.onnx", "--calib", tmp_path / "images", "--std", "0,1,1")
    assert_refused(result, "Invalid value for '--std'", tmp_path, before, code=2)
    assert "non-zero" in result.output
