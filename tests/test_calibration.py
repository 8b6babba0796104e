"""Calibration data: image folders and array files read into feeds, checked against the model's
inputs (names, shapes, sizes, finite values) and batched; bad data refused in one line."""

import math

import cv2  # opencv-python-headless, a test dependency: the real pipelines resize with it
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


def test_an_array_declaring_more_than_the_default_budget_allows_is_refused(folder, run, snapshot, assert_refused):
    """The default budget (4 GiB, or half the machine's memory) is enforced as an explicit one: a
    .npy whose header alone declares 2 GiB, half the default budget, is refused before anything
    is read (one tensor may take a quarter)."""
    with open(folder / "bomb.npy", "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False,
                                                    "shape": (2**27, 8, 1, 1)})
    before = snapshot(folder)
    assert_refused(run(folder / "model.onnx", folder / "q.onnx", "--calib", folder / "bomb.npy"),
                   "over the memory limit for one tensor", folder, before)


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


def test_an_image_over_the_pixel_limit_is_refused_even_below_twice_it(tmp_path, monkeypatch):
    """PIL itself refuses only images over twice its limit and warns below: the reader refuses
    everything over it."""
    from PIL import Image as PILImage
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: 1.6 times the limit
    with pytest.raises(CalibrationError, match="over the limit of 1000"):
        load_image(tmp_path / "big.png", (16, 16))


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


# The resize modes against the real pipelines' own preprocessing: their code, verbatim below, running
# on OpenCV as they do: PaddleOCR's text-line classifier and detector (as shipped in
# rapidocr-onnxruntime 1.4.4) and YOLO's letterbox (ultralytics). Our resampling is PIL's bilinear,
# theirs OpenCV's: the geometry and the padding must be the same, the pixels close.



def paddle_cls_resize_norm_img(img, cls_image_shape=(3, 48, 192)):  # rapidocr ch_ppocr_cls/text_cls.py
    img_c, img_h, img_w = cls_image_shape
    h, w = img.shape[:2]
    ratio = w / float(h)
    if math.ceil(img_h * ratio) > img_w:
        resized_w = img_w
    else:
        resized_w = int(math.ceil(img_h * ratio))
    resized_image = cv2.resize(img, (resized_w, img_h))
    resized_image = resized_image.astype("float32")
    resized_image = resized_image.transpose((2, 0, 1)) / 255
    resized_image -= 0.5
    resized_image /= 0.5
    padding_im = np.zeros((img_c, img_h, img_w), dtype=np.float32)
    padding_im[:, :, :resized_w] = resized_image
    return padding_im


def paddle_det_resize(img, limit_side_len=736):  # rapidocr ch_ppocr_det/utils.py, limit_type "max"
    h, w = img.shape[:2]
    if max(h, w) > limit_side_len:
        ratio = float(limit_side_len) / h if h > w else float(limit_side_len) / w
    else:
        ratio = 1.0
    resize_h = int(h * ratio)
    resize_w = int(w * ratio)
    resize_h = int(round(resize_h / 32) * 32)
    resize_w = int(round(resize_w / 32) * 32)
    img = cv2.resize(img, (int(resize_w), int(resize_h)))
    return ((img.astype("float32") / 255.0 - 0.5) / 0.5).transpose((2, 0, 1))


def yolo_letterbox(img, new_shape=(640, 640), color=(114, 114, 114)):  # ultralytics LetterBox
    shape = img.shape[:2]
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    dw /= 2
    dh /= 2
    if shape[::-1] != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255  # BGR -> RGB, CHW, 0..1


@pytest.fixture
def photos(tmp_path):
    """Smooth images (gradients and blobs, as photographs are at the scales compared) of several shapes."""
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(32, 200), (60, 90), (480, 640), (900, 500), (37, 1201)]):
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        channels = [np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 3, (3, 3))]
        image = (127.5 + 120 * np.stack(channels, -1)).astype(np.uint8)
        cv2.imwrite(str(tmp_path / f"{index}.png"), image)
    return tmp_path


def ours(folder, size, **options):
    return [feed["x"][0] for feed in ImageFolderReader(folder, "x", size, **options)]


def assert_close(mine, theirs, tolerance):
    assert mine.shape == theirs.shape
    assert np.abs(mine - theirs).mean() < tolerance


def test_pad_is_paddleocrs_text_line_preprocessing(photos):
    mine = ours(photos, (48, 192), mean=127.5, std=127.5, bgr=True, resize="pad")
    for path, image in zip(sorted(photos.glob("*.png")), mine):
        theirs = paddle_cls_resize_norm_img(cv2.imread(str(path)))
        padded = theirs.any(axis=(0, 1)) == 0
        assert (image[:, :, padded] == 0).all()  # the same width, zeros to the right
        assert_close(image, theirs, 0.01)  # in units of the normalised range [-1, 1]


def test_letterbox_is_yolos(photos):
    mine = ours(photos, (640, 640), preset="unit", resize="letterbox")
    for path, image in zip(sorted(photos.glob("*.png")), mine):
        theirs = yolo_letterbox(cv2.imread(str(path)))
        gray = np.isclose(theirs, 114 / 255).all(axis=0)
        assert np.isclose(image[:, gray], 114 / 255).all()  # the same border
        assert_close(image, theirs, 0.003)


def test_fit_is_paddleocrs_detector_sizing(photos):
    big = [path for path in sorted(photos.glob("*.png")) if max(cv2.imread(str(path)).shape[:2]) > 736]
    for path in big:
        theirs = paddle_det_resize(cv2.imread(str(path)))
        folder = path.parent / f"only_{path.stem}"
        folder.mkdir()
        (folder / path.name).write_bytes(path.read_bytes())
        mine = ours(folder, (736, 736), mean=127.5, std=127.5, bgr=True, resize="fit")[0]
        assert_close(mine, theirs, 0.03)


def test_an_image_size_is_checked_against_the_memory_budget_like_a_static_shape(tmp_path, run):
    """--input-size on a model of dynamic size is refused at once when the tensors it makes the
    model compute would not fit, as the same shape given by --input-shape is."""
    model = image_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        for dim in value.type.tensor_type.shape.dim[2:]:
            dim.dim_param = "size"
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    for option in (["--input-size", "4000x4000"], ["--input-shape", "1x3x4000x4000"]):
        result = run(tmp_path / "model.onnx", tmp_path / "q.onnx", "--calib", tmp_path / "images",
                     "--max-memory", "256M", *option)
        assert result.exit_code == 1 and "over the memory limit for one tensor" in result.output
