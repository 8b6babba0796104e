"""Convert the OCR models shipped in the `rapidocr-onnxruntime` wheel and compare them with float.

    pip install --no-deps rapidocr-onnxruntime    # the wheel carries the .onnx files
    python tools/real_models.py [--images DIR] [--calib-count 32]

The models are opset 11/12 PaddleOCR exports with un-fused BatchNormalization, HardSigmoid,
ConvTranspose, Resize and Constant-node weights, and dynamic input sizes. Calibration and
evaluation use synthetic text images (seeded: random words in random sizes, colours and places on
light backgrounds), or --images DIR; the first --calib-count for calibration, the next
--eval-count for the comparison. Prints, per model and bit width, the conversion time and
onnx_bitsplit.check figures (cosine, SQNR, argmax agreement over the last axis).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

from onnx_bitsplit import ImageFolderReader, QuantConfig, quantize
from onnx_bitsplit.check import compare

# name: (file, input size, mean, std) with PaddleOCR's own preprocessing
MODELS = {
    "det": ("ch_PP-OCRv4_det_infer.onnx", (320, 320), (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (48, 192), (127.5,) * 3, (127.5,) * 3),
}


def models_folder() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def subset_reader(images: Path, input_name: str, size, mean, std, skip: int, count: int) -> ImageFolderReader:
    """A reader over `count` images of the folder from position `skip` on (sorted by name)."""
    reader = ImageFolderReader(images, input_name, size, mean=mean, std=std)
    reader.paths = reader.paths[skip:skip + count]
    return reader


def text_images(folder: Path, count: int, size=(480, 640), seed: int = 0) -> Path:
    """`count` synthetic document-like images: lines of random words on light backgrounds."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    for index in range(count):
        background = tuple(int(v) for v in rng.integers(190, 256, 3))
        image = Image.new("RGB", (size[1], size[0]), background)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 12))):
            words = " ".join("".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(rng.integers(1, 6)))
            font = ImageFont.load_default(size=int(rng.integers(14, 48)))
            position = (int(rng.integers(0, size[1] // 2)), int(rng.integers(0, size[0] - 20)))
            draw.text(position, words, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
        image.save(folder / f"{index:04d}.png")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="image folder  [default: synthetic text images]")
    parser.add_argument("--calib-count", type=int, default=32)
    parser.add_argument("--eval-count", type=int, default=32)
    parser.add_argument("--models", default="det,cls")
    parser.add_argument("--det-size", default="320x320", help="HxW the detector is calibrated and evaluated at")
    parser.add_argument("--wbits", default="8,4")
    parser.add_argument("--compensation-blend", type=float, default=QuantConfig.compensation_blend)
    parser.add_argument("--equalize", action="store_true")
    args = parser.parse_args()
    folder = models_folder()
    args.images = args.images or text_images(Path(tempfile.mkdtemp(prefix="text-")),
                                             args.calib_count + args.eval_count)
    print("| model | weights | layers (kept in float) | conversion s | cosine | SQNR dB | agreement % |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        file, size, mean, std = MODELS[name]
        size = tuple(int(v) for v in args.det_size.split("x")) if name == "det" else size
        model = onnx.load(folder / file)
        calibration, evaluation = (
            subset_reader(args.images, model.graph.input[0].name, size, mean, std, skip, count)
            for skip, count in ((0, args.calib_count), (args.calib_count, args.eval_count)))
        for wbits in map(int, args.wbits.split(",")):
            start = time.perf_counter()
            quantized, report = quantize(model, calibration,
                                         QuantConfig(wbits=wbits, calib_count=args.calib_count, batch_size=8,
                                                     compensation_blend=args.compensation_blend,
                                                     equalization=args.equalize))
            seconds = time.perf_counter() - start
            result = compare(model, quantized, evaluation).outputs[0]
            print(f"| {name} | W{wbits} | {len(report.layers)} ({len(report.skipped)}) | {seconds:.0f} | "
                  f"{result.cosine:.4f} | {result.sqnr_db:.1f} | {100 * result.agreement:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
