"""Calibration data: readers in onnxruntime's CalibrationDataReader protocol, and batching.

A reader's get_next() returns one feed dict {input_name: ndarray} or None when done, so any
onnxruntime CalibrationDataReader works unchanged; so does any iterable of feed dicts.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import CalibrationError
from .shapes import AS_GIVEN, DYNAMIC_BATCH, batching

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
ARRAY_SUFFIXES = {".npy", ".npz"}
CROP_FRACTION = 0.875  # resize the short side to size/0.875, then center-crop: ImageNet's eval recipe
LAYOUTS = ("nchw", "nhwc")
RESIZES = ("crop", "letterbox", "pad", "fit")  # how an image is brought to the input's size (load_image)
DEFAULT_RESIZE, DEFAULT_PRESET = "crop", "tf"
LETTERBOX_PIXEL = 114.0  # the gray YOLO's letterbox pads with
FIT_MULTIPLE = 32  # the stride a detector's sides must be a multiple of
# Samples per batch when the batch axis is dynamic and no batch size is given: about this much
# input. A batch's activations (several times its input) then stay in memory that malloc reuses
# rather than maps afresh (and page-faults) for every run.
RUN_INPUT_BYTES = 4 << 20
MAX_BATCH = 64
PRESETS = {
    # x = (pixel - mean) / std, per RGB channel, pixels in [0, 255]
    "tf": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    "torch": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "unit": ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),
    "raw": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


class _FileReader:
    """A CalibrationDataReader over `paths`, one feed a file (_read)."""

    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.paths):
            return None
        self._next += 1
        return self._read(self._next - 1)

    def rewind(self) -> None:
        self._next = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        return iter(self.get_next, None)

    def _read(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


class ImageFolderReader(_FileReader):
    """Images of a folder (sorted by name) as NCHW float32 feeds of batch 1.

    Args:
        folder: directory of jpg/png/bmp/webp images; grayscale and RGBA are converted to RGB.
        input_name: the model input to feed.
        size: (height, width) of the model input, or a list of them for a model of dynamic size:
            the images are then split into that many consecutive runs, one per size, so that
            calibration sees the sizes the model will run at.
        preset: the normalisation x = (pixel - mean) / std by name (PRESETS). Defaults to "tf".
        mean, std: per-channel mean and std in pixel units, in the order of the channels fed
            (BGR with bgr=True); either overrides the preset's.
        count: read at most this many images. Defaults to all.
        layout: "nchw" ([1, 3, H, W] feeds) or "nhwc" ([1, H, W, 3]). Defaults to "nchw".
        bgr: feed the channels in BGR order (OpenCV-trained models). Defaults to False.
        crop_ratio: the center crop's share of the resized short side (ImageNet's 0.875; 1.0
            resizes the short side to the input and crops only the long one). Defaults to 0.875.
        resize: how an image is brought to `size`, one of RESIZES (load_image): "crop" (the
            default), "letterbox" (padded with gray 114, as YOLO), "pad" (text lines: to the
            height, padded on the right with zeros after normalisation, as PaddleOCR) or "fit"
            (the whole image, sides multiples of 32, no padding: detectors of dynamic size).
    """

    def __init__(self, folder: str | Path, input_name: str, size: tuple[int, int] | list[tuple[int, int]], *,
                 preset: str = DEFAULT_PRESET, mean=None, std=None, count: int | None = None, layout: str = "nchw",
                 bgr: bool = False, crop_ratio: float = CROP_FRACTION, resize: str = DEFAULT_RESIZE):
        if resize not in RESIZES:
            raise CalibrationError(f"resize must be one of {', '.join(RESIZES)}, got '{resize}'")
        if preset not in PRESETS:
            raise CalibrationError(f"preset must be one of {', '.join(PRESETS)}, got '{preset}'")
        if layout not in LAYOUTS:
            raise CalibrationError(f"layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
        if not 0.0 < crop_ratio <= 1.0:
            raise CalibrationError(f"crop ratio must be in (0, 1], got {crop_ratio}")
        self.folder, self.preset = Path(folder), preset
        self.paths = image_paths(folder)[:count]
        self.input_name = input_name
        self.sizes = [tuple(s) for s in size] if size and isinstance(size[0], (tuple, list)) else [tuple(size)]
        self.layout, self.bgr, self.crop_ratio, self.resize = layout, bgr, crop_ratio, resize
        mean = PRESETS[preset][0] if mean is None else mean
        std = PRESETS[preset][1] if std is None else std
        self.mean, self.std = _per_channel("mean", mean), _per_channel("std", std)
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all() and (self.std != 0).all()):
            raise CalibrationError(f"mean and std must be finite and std non-zero, got mean {mean}, std {std}")
        self._next = 0

    def labels(self) -> list[int] | None:
        """The class of each image from its file name (labels_from_names), or None."""
        return labels_from_names(self.paths)

    def describe(self) -> dict:
        return {"reader": "images", "folder": str(self.folder), "images": len(self.paths), "preset": self.preset,
                "mean": self.mean.ravel().tolist(), "std": self.std.ravel().tolist(),
                "sizes": [list(size) for size in self.sizes], "layout": self.layout, "bgr": self.bgr,
                "crop_ratio": self.crop_ratio, "resize": self.resize}

    def _read(self, index: int) -> dict[str, np.ndarray]:
        size = self.sizes[index * len(self.sizes) // len(self.paths)]
        # "pad" fills with the mean, zeros once normalised; the pixels are RGB, the mean in the order fed
        fill = (self.mean[::-1] if self.bgr else self.mean).ravel() if self.resize == "pad" else LETTERBOX_PIXEL
        pixels = load_image(self.paths[index], size, self.crop_ratio, resize=self.resize, fill=fill)
        image = (((pixels[::-1] if self.bgr else pixels) - self.mean) / self.std)[None]
        return {self.input_name: np.ascontiguousarray(image.transpose(0, 2, 3, 1) if self.layout == "nhwc" else image)}


class NpyReader(_FileReader):
    """Ready input tensors: .npy files (for the model's only input) or .npz files keyed by input
    name, each file one feed (its batch included).

    Args:
        path: one .npy/.npz file or a folder of them (sorted by name).
        input_names: the model's inputs.
        max_bytes: refuse an array larger than this, from its header, before reading it.
    """

    def __init__(self, path: str | Path, input_names: list[str], *, max_bytes: int | None = None):
        path = Path(path)
        self.paths = [path] if path.is_file() else sorted(
            p for p in _listdir(path) if p.suffix.lower() in ARRAY_SUFFIXES)
        if not self.paths:
            raise CalibrationError(f"no .npy or .npz files in '{path}'")
        self.path = path
        self.input_names = input_names
        self.max_bytes = max_bytes
        self._next = 0

    def describe(self) -> dict:
        return {"reader": "arrays", "path": str(self.path), "files": len(self.paths)}

    def _read(self, index: int) -> dict[str, np.ndarray]:
        path = self.paths[index]
        try:
            if path.suffix.lower() == ".npy":
                if len(self.input_names) != 1:
                    raise CalibrationError(
                        f"'{path.name}': a .npy file feeds a single-input model; use .npz keyed by "
                        f"{', '.join(self.input_names)}")
                with open(path, "rb") as file:
                    self._check_size(path.name, file)
                return {self.input_names[0]: np.load(path, allow_pickle=False)}
            with np.load(path, allow_pickle=False) as archive:
                missing = [n for n in self.input_names if n not in archive.files]
                if missing:
                    raise CalibrationError(f"'{path.name}' has no array named {', '.join(missing)}")
                for name in self.input_names:
                    with archive.zip.open(f"{name}.npy") as member:
                        self._check_size(f"{path.name}:{name}", member)
                return {n: archive[n] for n in self.input_names}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise CalibrationError(f"cannot read '{path.name}': {exc}") from None

    def _check_size(self, what: str, file) -> None:
        """Refuse an array whose header declares more than max_bytes (a small compressed file can)."""
        if self.max_bytes is None:
            return
        version = np.lib.format.read_magic(file)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)(file)
        size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if size > self.max_bytes:
            raise CalibrationError(f"'{what}' holds an array of {size / 2**30:.2f} GiB, over the memory limit for "
                                   f"one tensor, {self.max_bytes / 2**30:.2f} GiB (a quarter of --max-memory)")


def _per_channel(what: str, values) -> np.ndarray:
    """One value, or three (one per channel), as a (3, 1, 1) float32 array."""
    values = np.asarray(values, np.float32).ravel()
    if values.size not in (1, 3):
        raise CalibrationError(f"{what} must be one value or three, got {values.size}")
    return np.resize(values, 3).reshape(3, 1, 1)


def image_paths(folder: str | Path) -> list[Path]:
    paths = sorted(p for p in _listdir(Path(folder)) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise CalibrationError(f"no images (jpg, png, bmp, webp) in '{folder}'")
    return paths


def _listdir(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder '{folder}' does not exist or is not a folder")
    return [p for p in folder.iterdir() if p.is_file()]


def load_image(path: Path, size: tuple[int, int], crop_ratio: float = CROP_FRACTION, *, resize: str = DEFAULT_RESIZE,
               fill=LETTERBOX_PIXEL) -> np.ndarray:
    """An image as (3, height, width) float32 RGB pixels in [0, 255], resized to `size` by one of
    RESIZES:
    - crop: the short side resized to max(size) / crop_ratio, then the center cropped to `size`;
    - letterbox: the whole image scaled to fit `size`, centered, the rest `fill` (YOLO's);
    - pad: scaled to the height, at most the width, placed left, the rest `fill` (text-line
      recognizers and classifiers: PaddleOCR's);
    - fit: the whole image scaled to fit `size`, each side rounded to a multiple of FIT_MULTIPLE,
      no padding: the result's size varies (text detectors of dynamic size: PaddleOCR's).
    `fill` is a pixel value, or one per channel.

    Memory stays bounded by the output, whatever the file declares: JPEGs are decoded at the
    smallest size the decoder offers above the one needed, only the source box needed is
    resized, and images over PIL's decompression-bomb limit are refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.size[0] * image.size[1] > Image.MAX_IMAGE_PIXELS:
                raise CalibrationError(f"image '{path.name}' has {image.size[0]}x{image.size[1]} pixels, over the "
                                       f"limit of {Image.MAX_IMAGE_PIXELS} (a decompression bomb?)")
            target, box, placed, canvas = _geometry(image.size, size, crop_ratio, resize)
            image.draft("RGB", (max(1, math.ceil(image.size[0] * target[0] / (box[2] - box[0]))),
                                max(1, math.ceil(image.size[1] * target[1] / (box[3] - box[1])))))
            box = _geometry(image.size, size, crop_ratio, resize)[1]  # in the pixels decoded: the draft may shrink
            image = image.convert("RGB").resize(target, Image.BILINEAR, box=box)
            pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise CalibrationError(f"cannot read image '{path.name}': {exc}") from None
    if placed is None:
        return pixels
    result = np.empty((3, *canvas), np.float32)
    result[:] = np.asarray(fill, np.float32).reshape(-1, 1, 1)
    top, left = placed
    result[:, top:top + target[1], left:left + target[0]] = pixels
    return result


def _geometry(source: tuple[int, int], size: tuple[int, int], crop_ratio: float, resize: str):
    """Where a (width, height) source goes for `size` (height, width) and a RESIZES mode:
    (the resized (width, height), the source box it comes from, (top, left) of its place on the
    canvas or None without padding, the canvas (height, width))."""
    width, height = source
    out_height, out_width = size
    whole = (0.0, 0.0, float(width), float(height))
    if resize == "crop":
        scale = max(out_height, out_width) / crop_ratio / min(width, height)
        resized = (max(out_width, round(width * scale)), max(out_height, round(height * scale)))
        left, top = (resized[0] - out_width) // 2, (resized[1] - out_height) // 2
        box = (left / scale, top / scale, (left + out_width) / scale, (top + out_height) / scale)
        return (out_width, out_height), box, None, size
    if resize == "letterbox":
        scale = min(out_height / height, out_width / width)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        top = round((out_height - target[1]) / 2 - 0.1)
        left = round((out_width - target[0]) / 2 - 0.1)
        return target, whole, (top, left), size
    if resize == "pad":
        target = (min(out_width, math.ceil(out_height * width / height)), out_height)
        return target, whole, (0, 0), size
    if resize == "fit":
        scale = min(out_height / height, out_width / width)
        target = tuple(max(FIT_MULTIPLE, round(int(side * scale) / FIT_MULTIPLE) * FIT_MULTIPLE)
                       for side in (width, height))
        return target, whole, None, (target[1], target[0])
    raise CalibrationError(f"resize must be one of {', '.join(RESIZES)}, got '{resize}'")


def describe(calibration) -> dict:
    """How a calibration source makes its samples: a reader's own description, else its type."""
    if callable(getattr(calibration, "describe", None)):
        return calibration.describe()
    return {"reader": type(calibration).__name__}


def as_feeds(calibration) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts from a CalibrationDataReader (get_next until None; rewound first where it can
    be, so one reader serves several conversions) or any iterable of dicts."""
    if hasattr(calibration, "get_next"):
        if callable(getattr(calibration, "rewind", None)):
            calibration.rewind()
        return iter(calibration.get_next, None)
    if isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes, dict)):
        return iter(calibration)
    raise CalibrationError("calibration must be a CalibrationDataReader or an iterable of feed dicts")


def single_shape_inputs(shapes: dict[str, list], fed: dict[str, set[tuple]]) -> dict[str, tuple]:
    """Inputs with a dynamic dimension past the batch axis that calibration fed at one shape
    only: name -> that shape (without the batch axis).

    Args:
        shapes: input name -> shape, None for a dynamic dimension (shapes.input_shapes()).
        fed: input name -> the shapes (without the batch axis) calibration fed it.
    """
    return {name: next(iter(fed[name])) for name, shape in shapes.items()
            if None in shape[1:] and len(fed[name]) == 1}


def labels_from_names(paths: list[Path]) -> list[int] | None:
    """Labels from file names that start with a class number, `CCC_anything.jpg` -> CCC; None
    unless every name does."""
    numbers = [p.name.split("_", 1)[0] for p in paths]
    return [int(n) for n in numbers] if numbers and all(n.isdigit() for n in numbers) else None


def batch_feeds(feeds: Iterable[dict[str, np.ndarray]], shapes: dict[str, list], *,
                batch_size: int | None, count: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """At most `count` samples, checked against the model's inputs and regrouped into batches,
    one at a time (a calibration set never has to fit in memory): (batch, its samples).

    How samples group depends on the inputs (shapes.batching): where every input's axis 0 is
    dynamic, samples are joined along it, `batch_size` rows at a time (None: as many as make about
    RUN_INPUT_BYTES of input); where every input fixes the same axis 0, a batch is that many rows
    (a feed of several is split, never joined: the batch may be written into the model's
    constants, and intermediates may not carry it on axis 0); otherwise (a 0-D input, states with
    the batch on axis 1) each feed is one batch, as given, and one sample.

    Args:
        shapes: input name -> shape, None for a dynamic dimension (shapes.input_shapes()).
    """
    mode = batching(shapes)
    if mode == DYNAMIC_BATCH:
        batches = _joined(feeds, shapes, batch_size, count)
    else:
        batches = _as_given(feeds, shapes, mode, count)
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        raise CalibrationError("the calibration data is empty")


def _as_given(feeds, shapes: dict[str, list], mode, count: int):
    """Each feed as a batch (AS_GIVEN), or split into batches of the fixed batch."""
    rows = 1 if mode == AS_GIVEN else mode
    yielded = 0
    for index, feed in enumerate(feeds):
        feed = _checked_feed(feed, shapes, mode, index)
        parts = [feed] if mode == AS_GIVEN else [{name: value[i:i + rows] for name, value in feed.items()}
                                                 for i in range(0, _rows(feed), rows)]
        for part in parts:
            if yielded + rows > max(count, rows):  # at least one batch, of whole batches
                return
            yielded += rows
            yield part, rows


def _joined(feeds, shapes: dict[str, list], batch_size: int | None, count: int):
    """Samples joined along axis 0 into batches of `batch_size` rows (DYNAMIC_BATCH)."""
    rows_per_batch = None
    pending, total, yielded = [], 0, 0

    def limited(batch):  # rows past `count` dropped
        batch = {name: value[:count - yielded] for name, value in batch.items()}
        return batch, _rows(batch)

    for index, feed in enumerate(feeds):
        feed = _checked_feed(feed, shapes, DYNAMIC_BATCH, index)
        if rows_per_batch is None:
            rows_per_batch = batch_size or max(1, min(MAX_BATCH, RUN_INPUT_BYTES // _sample_bytes(feed)))
        if pending and _sample_shapes(pending[0]) != _sample_shapes(feed):  # dynamic sizes: no stacking
            batch = limited(_concatenate(pending))
            yielded += batch[1]
            yield batch
            pending = []
        pending.append(feed)
        total += _rows(feed)
        while sum(map(_rows, pending)) >= rows_per_batch and yielded < count:
            joined = _concatenate(pending)
            batch = limited({name: value[:rows_per_batch] for name, value in joined.items()})
            yielded += batch[1]
            yield batch
            rest = {name: value[rows_per_batch:] for name, value in joined.items()}
            pending = [rest] if _rows(rest) else []
        if total >= count:
            break
    if pending and yielded < count:
        yield limited(_concatenate(pending))


def _sample_bytes(feed: dict[str, np.ndarray]) -> int:
    return max(1, sum(value[:1].nbytes for value in feed.values()))


def _sample_shapes(feed: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    return [value.shape[1:] for value in feed.values()]


def _rows(feed: dict[str, np.ndarray]) -> int:
    return next(iter(feed.values())).shape[0]


def _checked_feed(feed, shapes, mode, index: int) -> dict[str, np.ndarray]:
    """The feed's arrays, checked: every input present, every fixed dimension matching (a fixed
    batch may come as any multiple of itself), the same number of rows in every input where
    samples are joined or split, finite values (one NaN would make every scale and bias NaN)."""
    if not isinstance(feed, dict):
        raise CalibrationError(f"a calibration feed must be a dict of arrays, got {type(feed).__name__}")
    missing = [name for name in shapes if name not in feed]
    if missing:
        raise CalibrationError(f"a calibration feed has no value for input {', '.join(missing)}")
    checked = {}
    for name, shape in shapes.items():
        value = np.asarray(feed[name])
        expected = "x".join(str(d) if isinstance(d, int) else "?" for d in shape) or "a scalar"
        fixed_dims = list(zip(shape, value.shape))[0 if mode == AS_GIVEN else 1:]
        fits = value.ndim == len(shape) and all(not isinstance(want, int) or want == got for want, got in fixed_dims)
        if mode != AS_GIVEN:
            fits = fits and value.ndim > 0 and value.shape[0] > 0 and (
                mode == DYNAMIC_BATCH or value.shape[0] % mode == 0)
        if not fits:
            got = "x".join(map(str, value.shape)) or "a scalar"
            raise CalibrationError(f"input '{name}': calibration array of shape {got}, the model expects {expected}")
        if value.dtype.kind not in "fiub":
            raise CalibrationError(f"input '{name}': calibration array of type {value.dtype} is not numeric")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CalibrationError(f"calibration feed {index}: input '{name}' has NaN or infinite values")
        checked[name] = value
    if mode != AS_GIVEN and len({value.shape[0] for value in checked.values()}) > 1:
        raise CalibrationError("a calibration feed has inputs with different numbers of samples")
    return checked


def _concatenate(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
