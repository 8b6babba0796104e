"""Calibration data: image folders and array files read into feeds, checked against the model's
inputs (names, shapes, sizes, finite values) and batched; bad data refused in one line."""

import numpy as np
import onnx
import pytest
from PIL import Image

from graphs import calibration_feeds, dynamic_size_model, feeds_for, gemm_model, image_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.calibration import ImageFolderReader, load_image
from onnx_bitsplit.errors import CalibrationError
from runs import model_sqnr_db


# array files

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_values_are_refused(folder, bad, run, snapshot, assert_refused):
    data = np.load(folder / "calib.npy")
    data[2, 1, 3, 3] = bad
    np.save(folder / "calib.npy", data)
    before = snapshot(folder)
    assert_refused(run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"),
                   "NaN or infinite", folder, before)


def test_a_tiny_npz_declaring_a_huge_array_is_refused(folder, run, snapshot, assert_refused):
    np.savez_compressed(folder / "bomb.npz", x=np.zeros((64, 8, 512, 512), np.float32))  # 512 MiB, ~500 KB
    before = snapshot(folder)
    result = run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "bomb.npz", "--max-memory", "64M")
    assert_refused(result, "over the memory limit", folder, before)


def test_npz_without_the_input_name(folder, invoke, snapshot, assert_refused):
    np.savez(folder / "calib.npz", image=np.zeros((2, 8, 12, 12), np.float32))
    before = snapshot(folder)
    result = invoke(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npz")
    assert_refused(result, "no array named x", folder, before)


def test_npz_of_the_wrong_shape(folder, invoke, snapshot, assert_refused):
    np.savez(folder / "calib.npz", x=np.zeros((2, 8, 5, 5), np.float32))
    before = snapshot(folder)
    result = invoke(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "calib.npz")
    assert_refused(result, "shape", folder, before)


def test_calibration_of_the_wrong_shape(tmp_path, model_path, invoke, assert_one_line_error):
    folder = tmp_path / "wrong"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((1, 3, 12, 12), np.float32))
    assert_one_line_error(invoke(model_path, tmp_path / "q.onnx", "--calib", folder), "shape")
    assert not (tmp_path / "q.onnx").exists()


# image folders

def test_missing_calibration_folder(folder, invoke, snapshot, assert_refused):
    onnx.save(image_model(), folder / "rgb.onnx")
    before = snapshot(folder)
    result = invoke(folder / "rgb.onnx", folder / "q.onnx", "--calib", folder / "nowhere")
    assert_refused(result, "does not exist", folder, before)


def test_empty_calibration_folder(tmp_path, invoke, assert_one_line_error):
    path = tmp_path / "rgb.onnx"
    onnx.save(image_model(), path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke(path, tmp_path / "q.onnx", "--calib", empty), "no images")


def test_image_folder_calibration(tmp_path, invoke):
    """JPEG and PNG, RGB, gray and RGBA, of any size, are read; other files are not."""
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


def test_unreadable_image(tmp_path, invoke, assert_one_line_error):
    path = tmp_path / "rgb.onnx"
    onnx.save(image_model(), path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert_one_line_error(invoke(path, tmp_path / "q.onnx", "--calib", images), "broken.jpg")
    assert not (tmp_path / "q.onnx").exists()


def test_a_zero_std_is_refused_by_the_reader(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "images" / "a.png")
    with pytest.raises(CalibrationError, match="std non-zero"):
        ImageFolderReader(tmp_path / "images", "x", (16, 16), mean=(0, 0, 0), std=(0, 1, 1))


@pytest.mark.parametrize("size", [(1, 40000), (40000, 1), (3, 30000)])
def test_extreme_image_shapes_decode_into_bounded_memory(tmp_path, size):
    Image.new("L", size, 128).save(tmp_path / "strip.png")
    pixels = load_image(tmp_path / "strip.png", (16, 16))
    assert pixels.shape == (3, 16, 16) and np.allclose(pixels, 128)


def test_several_input_sizes_split_the_images_among_them(tmp_path):
    (tmp_path / "images").mkdir()
    for index in range(5):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / f"{index}.png")
    reader = ImageFolderReader(tmp_path / "images", "x", [(8, 8), (16, 12)], crop_ratio=1.0)
    assert [feed["x"].shape for feed in reader] == [(1, 3, 8, 8)] * 3 + [(1, 3, 16, 12)] * 2


def test_image_layout_channel_order_and_crop(tmp_path):
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


# feeds: readers, batches of several sizes, sizes calibrated

def test_calibration_reader_protocol_is_accepted():
    model = gemm_model()
    feeds = calibration_feeds(model, count=5)

    class Reader:  # what users of onnxruntime.quantization.CalibrationDataReader already have
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    _, report = quantize(model, Reader())
    assert report.calibration_samples == 5


def test_dynamic_spatial_size():
    model = dynamic_size_model()
    feeds = feeds_for(model, 12, sizes=[8, 12, 10])  # batches of different sizes cannot be stacked
    quantized, report = quantize(model, feeds, QuantConfig(wbits=8))
    assert report.calibration_samples == 12
    assert model_sqnr_db(model, quantized, feeds_for(model, 4, seed=9, sizes=[16, 6])) > 25
    assert not report.warnings


def test_one_calibration_size_of_a_dynamic_input_is_warned_about():
    model = dynamic_size_model()
    _, report = quantize(model, feeds_for(model, 6, sizes=[10]), QuantConfig(wbits=8))
    assert len(report.warnings) == 1 and "'x'" in report.warnings[0] and "8x10x10" in report.warnings[0]
    assert f"warning: {report.warnings[0]}" in report.summary()
    _, static = quantize(model, feeds_for(model, 6, sizes=[10]), QuantConfig(wbits=8, input_shapes={"x": (1, 8, 10, 10)}))
    assert not static.warnings  # a fixed shape runs at no other
