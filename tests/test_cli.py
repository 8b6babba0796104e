"""The command line: files in and out, one-line errors, no partial output."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from graphs import calibration_feeds, conv_model, image_model
from onnx_bitsplit.cli import quantize_command as main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_model(), path)
    return path


@pytest.fixture
def npy_dir(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, feed in enumerate(calibration_feeds(conv_model(), count=6)):
        np.save(folder / f"{index:02d}.npy", feed["x"])
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, text):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and text in lines[0], result.output
    assert "Traceback" not in result.output


def test_help_lists_the_options():
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--calib", "--calib-count", "--preset", "--mean", "--std", "--wbits",
                   "--first-last-wbits", "--error-compensation", "--report"):
        assert option in result.output


def test_converts_and_writes_report(tmp_path, model_path, npy_dir):
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


def test_equalize_flag(tmp_path, model_path, npy_dir):
    report = tmp_path / "report.json"
    result = invoke(model_path, tmp_path / "q.onnx", "--calib", npy_dir, "--equalize", "--report", report)
    assert result.exit_code == 0, result.output
    assert "equalized 2 layer pairs" in result.output  # conv1 -> Relu -> conv2 -> Relu -> conv3
    assert [(p["producer"], p["consumer"]) for p in json.loads(report.read_text())["equalized"]] == [
        ("conv1", "conv2"), ("conv2", "conv3")]


def test_image_folder_calibration(tmp_path):
    path = tmp_path / "rgb.onnx"
    onnx.save(image_model(), path)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(images / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(images / "b.png")  # gray, small
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)).save(images / "c.png")  # RGBA
    (images / "notes.txt").write_text("not an image")
    result = invoke(path, tmp_path / "q.onnx", "--calib", images, "--preset", "torch")
    assert result.exit_code == 0, result.output
    assert "from 3 calibration samples" in result.output


def test_unreadable_image(tmp_path):
    path = tmp_path / "rgb.onnx"
    onnx.save(image_model(), path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert_one_line_error(invoke(path, tmp_path / "q.onnx", "--calib", images), "broken.jpg")
    assert not (tmp_path / "q.onnx").exists()


def test_missing_input(tmp_path, npy_dir):
    assert_one_line_error(invoke(tmp_path / "nope.onnx", tmp_path / "q.onnx", "--calib", npy_dir),
                          "does not exist")


def test_not_an_onnx_file(tmp_path, npy_dir):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"this is not a protobuf \xff\xfe")
    assert_one_line_error(invoke(path, tmp_path / "q.onnx", "--calib", npy_dir), "cannot read")
    assert not (tmp_path / "q.onnx").exists()


def test_truncated_model(tmp_path, model_path, npy_dir):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[:200])
    result = invoke(truncated, tmp_path / "q.onnx", "--calib", npy_dir)
    assert_one_line_error(result, "")
    assert not (tmp_path / "q.onnx").exists()


def test_empty_calibration_folder(tmp_path):
    path = tmp_path / "rgb.onnx"
    onnx.save(image_model(), path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke(path, tmp_path / "q.onnx", "--calib", empty), "no images")


def test_calibration_of_the_wrong_shape(tmp_path, model_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((1, 3, 12, 12), np.float32))
    assert_one_line_error(invoke(model_path, tmp_path / "q.onnx", "--calib", folder), "shape")
    assert not (tmp_path / "q.onnx").exists()


def test_output_equal_to_input(model_path, npy_dir):
    before = model_path.read_bytes()
    assert_one_line_error(invoke(model_path, model_path, "--calib", npy_dir), "input")
    assert model_path.read_bytes() == before


def test_missing_output_folder(tmp_path, model_path, npy_dir):
    assert_one_line_error(invoke(model_path, tmp_path / "no" / "q.onnx", "--calib", npy_dir),
                          "does not exist")


def test_bad_bits(tmp_path, model_path, npy_dir):
    assert_one_line_error(invoke(model_path, tmp_path / "q.onnx", "--calib", npy_dir, "--wbits", "9"),
                          "wbits")


def test_dynamic_size_images_need_input_size(tmp_path):
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


def test_several_input_sizes_split_the_images_among_them(tmp_path):
    from onnx_bitsplit.calibration import ImageFolderReader
    (tmp_path / "images").mkdir()
    for index in range(5):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / f"{index}.png")
    reader = ImageFolderReader(tmp_path / "images", "x", [(8, 8), (16, 12)], crop_ratio=1.0)
    assert [feed["x"].shape for feed in reader] == [(1, 3, 8, 8)] * 3 + [(1, 3, 16, 12)] * 2


def test_size_budget_too_small(tmp_path, model_path, npy_dir):
    assert_one_line_error(invoke(model_path, tmp_path / "q.onnx", "--calib", npy_dir, "--size-budget", "0.01"),
                          "size budget")
    assert not (tmp_path / "q.onnx").exists()


def test_activation_bits_other_than_8_are_refused(tmp_path, model_path, npy_dir):
    assert_one_line_error(invoke(model_path, tmp_path / "q.onnx", "--calib", npy_dir, "--abits", "4"), "abits")


def test_input_shape_makes_the_output_static(tmp_path, model_path, npy_dir):
    out = tmp_path / "q.onnx"
    result = invoke(model_path, out, "--calib", npy_dir, "--input-shape", "1x8x12x12", "--quiet")
    assert result.exit_code == 0, result.output
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 8, 12, 12]


@pytest.mark.parametrize("shape,text", [("1x8x12", "does not fit"), ("1x9x12x12", "does not fit"),
                                        ("ax8x12x12", "expected DIMS"), ("y=1x8x12x12", "no input 'y'")])
def test_bad_input_shapes_are_one_line_errors(tmp_path, model_path, npy_dir, shape, text):
    result = invoke(model_path, tmp_path / "q.onnx", "--calib", npy_dir, "--input-shape", shape)
    assert result.exit_code != 0 and not (tmp_path / "q.onnx").exists()
    assert text in result.output and "Traceback" not in result.output, result.output


def test_report_to_stdout_is_versioned_json(tmp_path, model_path, npy_dir, capsys):
    from onnx_bitsplit.cli import main as run_main
    with pytest.raises(SystemExit) as exit_info:
        run_main([str(model_path), str(tmp_path / "q.onnx"), "--calib", str(npy_dir), "--report", "-", "--quiet",
                  "--exclude", "conv2"])
    assert exit_info.value.code == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert report["schema"] == 1 and report["tool"]["version"] and report["options"]["wbits"] == 4
    assert report["files"]["input"] == str(model_path) and report["skipped"] == [{"name": "conv2", "reason": "excluded by 'conv2'"}]
    assert all(" " not in phase for phase in report["phase_seconds"])
    assert {"outputs", "inputs", "groups", "rel_error"} <= set(report["layers"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "model.onnx", "q.onnx"]


def test_image_layout_channel_order_and_crop(tmp_path):
    from onnx_bitsplit.calibration import ImageFolderReader
    (tmp_path / "images").mkdir()
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 10, 20, 30
    pixels[:, :10] = 255  # a white band at the left: outside the center crop unless the crop is wide
    Image.fromarray(pixels).save(tmp_path / "images" / "a.png")
    raw = dict(mean=(0, 0, 0), std=(1, 1, 1))
    nchw = next(iter(ImageFolderReader(tmp_path / "images", "x", (10, 10), **raw)))["x"]
    assert nchw.shape == (1, 3, 10, 10) and nchw[0, :, 5, 5].tolist() == [10, 20, 30]
    nhwc = next(iter(ImageFolderReader(tmp_path / "images", "x", (10, 10), layout="nhwc", bgr=True, **raw)))["x"]
    assert nhwc.shape == (1, 10, 10, 3) and nhwc[0, 5, 5].tolist() == [30, 20, 10]
    wide = next(iter(ImageFolderReader(tmp_path / "images", "x", (10, 20), crop_ratio=1.0, **raw)))["x"]
    assert wide[0, 0, 5, 0] == 10 and wide[0, 0, 5, -1] == 10  # the 2:1 crop of a 2:1 image keeps all but the band


def test_an_nhwc_model_is_calibrated_from_images(tmp_path):
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


def test_sizes_count_the_external_weights_file(tmp_path, model_path, npy_dir, capsys):
    from onnx_bitsplit.cli import main as run_main
    with pytest.raises(SystemExit):
        run_main([str(model_path), str(tmp_path / "q.onnx"), "--calib", str(npy_dir), "--report", "-", "--quiet",
                  "--external-data", "--wbits", "8"])
    sizes = json.loads(capsys.readouterr().out)["sizes"]
    written = (tmp_path / "q.onnx").stat().st_size + (tmp_path / "q.onnx.data").stat().st_size
    assert sizes["quant_bytes"] == written and written > 0.2 * sizes["float_bytes"]
