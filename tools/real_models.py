"""Convert the OCR models shipped in the `rapidocr-onnxruntime` wheel and compare them with float.

    pip install rapidocr-onnxruntime    # the wheel carries the .onnx files and the pipeline
    python tools/real_models.py [--images DIR] [--calib-count 32]
    python tools/real_models.py --pipeline [--detector-study] [--calib-count 32 --eval-count 60]

--pipeline runs rapidocr's own pipeline (det -> cls -> rec, its default settings) with float, our
and onnxruntime quantize_static's models swapped in, on pages of printed text it renders itself
(seeded; Debian's TrueType fonts, three page sizes, one or two columns, blur, noise and JPEG), and
prints the share of lines read exactly, the character error rate and the share of lines read as the
float pipeline reads them. Models are calibrated as a user of the pipeline would: on what the
float pipeline feeds each of them on --calib-count other pages. --detector-study adds a table of
the candidate causes of a detector's loss, each quantizing only the detector.

Without --pipeline, it compares each model's outputs with its float twin at one input size. The
models are opset 11/12 PaddleOCR exports with un-fused BatchNormalization, HardSigmoid,
ConvTranspose, Resize and Constant-node weights, and dynamic input sizes. Calibration and
evaluation then use synthetic text images (seeded: random words in random sizes, colours and places on
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
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from onnx_bitsplit import ImageFolderReader, QuantConfig, quantize, quantize_file
from onnx_bitsplit.calibration import PRESETS
from onnx_bitsplit.check import compare
from onnx_bitsplit.errors import first_line
from onnx_bitsplit.graph import find_layers, prepare

# name: (file, input size, mean, std) with PaddleOCR's own preprocessing
MODELS = {
    "det": ("ch_PP-OCRv4_det_infer.onnx", (320, 320), (127.5,) * 3, (127.5,) * 3),
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


# --- the whole rapidocr pipeline (det -> cls -> rec) on rendered pages with known lines ---

WORDS = ("invoice total amount date order number customer address street city payment due balance tax "
         "price quantity item description account bank transfer reference page report summary section "
         "chapter table figure result value model version update status delivery shipping return receipt "
         "phone email office meeting monday friday january march october account service product store "
         "north south east west open closed first second third level power water light green blue red").split()
PAGE_SIZES = ((480, 640), (640, 480), (600, 800))  # (height, width)


def page_fonts() -> list[Path]:
    """Regular, bold, serif and mono TrueType fonts from Debian's font packages (fonts-dejavu-core
    at least; fonts-liberation2 and fonts-freefont-ttf add more faces when installed)."""
    fonts = sorted(p for p in Path("/usr/share/fonts").rglob("*.ttf")
                   if not any(skip in p.name for skip in ("ExtraLight", "Oblique", "Italic")))
    if not fonts:
        sys.exit("no TrueType fonts under /usr/share/fonts: apt-get install fonts-dejavu-core")
    return fonts


def text_line(rng) -> str:
    """A few words, some capitalised, some numbers: the kind of line a form or a report holds."""
    words = []
    for _ in range(int(rng.integers(2, 6))):
        kind = rng.random()
        if kind < 0.2:
            words.append(str(int(rng.integers(1, 100000))))
        else:
            word = str(rng.choice(WORDS))
            words.append(word.capitalize() if kind < 0.5 else word.upper() if kind < 0.55 else word)
    return " ".join(words)


def render_pages(folder: Path, count: int, seed: int) -> list[dict]:
    """`count` pages like phone photos of print: three sizes, one or two columns, 3-8 lines each
    (left-aligned at random indents, one font, size and ink per line), then a slight blur, sensor
    noise and JPEG compression. Saved in `folder`; returned with their lines:
    [{"path", "lines": [(text, (left, top, right, bottom)), ...]}]."""
    rng = np.random.default_rng(seed)
    fonts = page_fonts()
    pages = []
    for index in range(count):
        height, width = PAGE_SIZES[index % len(PAGE_SIZES)]
        paper = rng.integers(170, 256, 3)
        image = Image.new("RGB", (width, height), tuple(int(v) for v in paper))
        draw = ImageDraw.Draw(image)
        columns = 2 if width >= 640 and rng.random() < 0.3 else 1
        column_width = width // columns
        lines, top = [], int(rng.integers(10, 50))
        for _ in range(int(rng.integers(3, 9))):
            font = ImageFont.truetype(str(rng.choice(fonts)), int(rng.integers(14, 36)))
            column = int(rng.integers(0, columns))
            text = text_line(rng)
            left = column * column_width + int(rng.integers(10, 60))
            box = draw.textbbox((left, top), text, font=font)
            while box[2] > (column + 1) * column_width - 10 and " " in text:  # shorten to fit the column
                text = text.rsplit(" ", 1)[0]
                box = draw.textbbox((left, top), text, font=font)
            if box[3] > height - 10:
                break
            draw.text((left, top), text, fill=tuple(int(v) for v in rng.integers(0, 110, 3)), font=font)
            lines.append((text, box))
            top = box[3] + int(rng.integers(12, 40))
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.0))))
        noisy = np.asarray(image, np.float32) + rng.normal(0.0, rng.uniform(2.0, 10.0), (height, width, 3))
        path = folder / f"page{index:03d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=int(rng.integers(40, 90)))
        pages.append({"path": path, "lines": lines})
    return pages


def ocr_engine(**model_paths):
    """rapidocr's pipeline with its default settings, with these models ({det,cls,rec}_model_path)."""
    models_folder()  # exits with how to install it
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR(**model_paths)


class Recorder:
    """Wraps a rapidocr inference session; keeps every input it is run on (the calibration data a
    user of the pipeline has: what the pipeline feeds the model)."""

    def __init__(self, session):
        self.session, self.feeds = session, []

    def __call__(self, batch):
        self.feeds.append({self.session.get_input_names()[0]: np.ascontiguousarray(batch)})
        return self.session(batch)


def pipeline_inputs(pages: list[dict]) -> dict[str, list[dict]]:
    """What the float pipeline feeds each of its models on these pages."""
    engine = ocr_engine()
    recorders = {"det": Recorder(engine.text_det.infer), "cls": Recorder(engine.text_cls.infer),
                 "rec": Recorder(engine.text_rec.session)}
    engine.text_det.infer, engine.text_cls.infer, engine.text_rec.session = (
        recorders["det"], recorders["cls"], recorders["rec"])
    for page in pages:
        engine(str(page["path"]))
    return {name: recorder.feeds for name, recorder in recorders.items()}


def read_lines(engine, page: dict) -> list[str]:
    """The pipeline's text for each known line of the page: the recognised boxes whose centre falls
    in the line's box, left to right."""
    result, _ = engine(str(page["path"]))
    found = [[] for _ in page["lines"]]
    for box, text, _score in result or []:
        x, y = np.mean(np.asarray(box, np.float32), axis=0)
        for index, (_, (left, top, right, bottom)) in enumerate(page["lines"]):
            if left - 8 <= x <= right + 8 and top - 8 <= y <= bottom + 8:
                found[index].append((x, text))
                break
    return [" ".join(text for _, text in sorted(boxes)) for boxes in found]


def read_pages(pages: list[dict], **models: Path) -> list[list[str]]:
    """read_lines() of every page by the pipeline with these models (det=, cls=, rec=) swapped in."""
    engine = ocr_engine(**{f"{name}_model_path": str(path) for name, path in models.items()})
    return [read_lines(engine, page) for page in pages]


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def pipeline_scores(pages: list[dict], read: list[list[str]], float_read: list[list[str]]) -> tuple[float, float, float]:
    """(lines exact %, character error rate %, lines identical to the float pipeline's %), spaces
    ignored (the recogniser's spacing is not what the models are compared on)."""
    squeeze = lambda text: "".join(text.split())  # noqa: E731
    truths = [squeeze(text) for page in pages for text, _ in page["lines"]]
    got = [squeeze(text) for lines in read for text in lines]
    reference = [squeeze(text) for lines in float_read for text in lines]
    exact = np.mean([g == t for g, t in zip(got, truths)])
    errors = sum(edit_distance(g, t) for g, t in zip(got, truths)) / sum(map(len, truths))
    same = np.mean([g == r for g, r in zip(got, reference)])
    return 100 * exact, 100 * errors, 100 * same


PIPELINE_MODELS = {"det": "ch_PP-OCRv4_det_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                   "rec": "ch_PP-OCRv4_rec_infer.onnx"}


class FeedReader:
    """Recorded feeds as an onnxruntime CalibrationDataReader (both tools take it)."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self._next = feeds, 0

    def get_next(self):
        self._next += 1
        return self.feeds[self._next - 1] if self._next <= len(self.feeds) else None

    def rewind(self):
        self._next = 0


def quantized_ours(name: str, wbits: int, feeds: list[dict], folder: Path, args) -> Path:
    path = folder / f"{name}-ours-w{wbits}.onnx"
    if not path.exists():
        config = QuantConfig(wbits=wbits, calib_count=sum(len(next(iter(f.values()))) for f in feeds),
                             compensation_blend=args.compensation_blend, equalization=args.equalize)
        start = time.perf_counter()
        quantize_file(models_folder() / PIPELINE_MODELS[name], path, FeedReader(feeds), config)
        print(f"  ours W{wbits} {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return path


def quantized_onnxruntime(name: str, wbits: int, feeds: list[dict], folder: Path) -> Path | None:
    """onnxruntime's quantize_static with its defaults (QDQ, per-tensor), the opset raised to what
    it needs (17; 21 for INT4 weights). None where it cannot convert the model."""
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = folder / f"{name}-onnxruntime-w{wbits}.onnx"
    if not path.exists():
        raised = folder / f"{name}-opset.onnx"
        try:
            onnx.save(version_converter.convert_version(onnx.load(models_folder() / PIPELINE_MODELS[name]),
                                                        21 if wbits == 4 else 17), raised)
            quantize_static(raised, path, FeedReader(feeds), quant_format=QuantFormat.QDQ,
                            weight_type=QuantType.QInt4 if wbits == 4 else QuantType.QInt8)
        except Exception as exc:  # a peer tool's failure is a row of the table, not the end of the run
            print(f"  onnxruntime W{wbits} {name}: {first_line(exc)}", file=sys.stderr)
            return None
    return path


DET_NORMALISATION = dict(mean=(127.5,) * 3, std=(127.5,) * 3, crop_ratio=1.0)  # rapidocr's: mean 0.5, std 0.5


def detector_candidates(folder: Path, feeds: list[dict]) -> dict[str, tuple]:
    """The candidate causes of a detector's loss in the pipeline, each as the calibration and the
    options that test it: label -> (calibration, QuantConfig fields)."""
    pages = lambda sizes: ImageFolderReader(folder, "x", sizes, **DET_NORMALISATION)  # noqa: E731
    last = find_layers(prepare(onnx.load(models_folder() / PIPELINE_MODELS["det"])))[0][-1].name
    return {
        "320x320 pages (one size, not the pipeline's)": (pages((320, 320)), {}),
        "736x992 pages (one of the pipeline's two sizes)": (pages((736, 992)), {}),
        "--input-size 736x992 --input-size 992x736": (pages([(736, 992), (992, 736)]), {}),
        "the pipeline's own inputs": (FeedReader(feeds), {}),
        "the pipeline's own inputs, solved on float inputs (--compensation-blend 0)": (
            FeedReader(feeds), {"compensation_blend": 0.0}),
        f"the pipeline's own inputs, last layer ({last}) in float": (FeedReader(feeds), {"exclude": [last]}),
        "320x320 pages, ImageNet's mean and std (not the pipeline's)": (
            ImageFolderReader(folder, "x", (320, 320), mean=PRESETS["torch"][0], std=PRESETS["torch"][1],
                              crop_ratio=1.0), {}),
    }


def run_detector_study(args, folder: Path, pages: list[dict], float_read: list[list[str]], feeds) -> None:
    """Only the detector quantized, once per candidate cause of its loss (docs/rapidocr.md)."""
    print("\n| detector calibration and options | weights | lines exact % | CER % | lines as float % |")
    print("| --- | --- | ---: | ---: | ---: |")
    for index, (label, (calibration, options)) in enumerate(
            detector_candidates(folder / "calib", feeds).items()):
        for wbits in map(int, args.wbits.split(",")):
            path = folder / f"det-candidate{index}-w{wbits}.onnx"
            config = QuantConfig(wbits=wbits, **options)
            if not path.exists():
                quantize_file(models_folder() / PIPELINE_MODELS["det"], path, calibration, config)
            exact, errors, same = pipeline_scores(pages, read_pages(pages, det=path), float_read)
            print(f"| {label} | W{wbits} | {exact:.1f} | {errors:.1f} | {same:.1f} |", flush=True)


def run_pipeline(args) -> int:
    folder = args.out or Path(tempfile.mkdtemp(prefix="ocr-"))
    (folder / "calib").mkdir(parents=True, exist_ok=True)
    (folder / "eval").mkdir(exist_ok=True)
    calibration_pages = render_pages(folder / "calib", args.calib_count, seed=1)
    pages = render_pages(folder / "eval", args.eval_count, seed=2)
    feeds = pipeline_inputs(calibration_pages)
    print(f"{len(pages)} pages, {sum(len(p['lines']) for p in pages)} lines; calibration: "
          + ", ".join(f"{name} {sum(len(feed[next(iter(feed))]) for feed in runs)} samples in {len(runs)} runs"
                      for name, runs in feeds.items()), flush=True)
    float_read = read_pages(pages)
    rows = [("float", {})]
    for wbits in map(int, args.wbits.split(",")):
        for tool in ("ours", "onnxruntime"):
            rows += [(f"{tool} W{wbits}A8, all three", {name: (tool, wbits) for name in PIPELINE_MODELS}),
                     (f"only the detector: {tool} W{wbits}A8", {"det": (tool, wbits)}),
                     (f"only the recognizer: {tool} W{wbits}A8", {"rec": (tool, wbits)})]
    print("| setting | lines exact % | CER % | lines as float % |")
    print("| --- | ---: | ---: | ---: |")
    for label, swapped in rows:
        paths = {}
        for name, (tool, wbits) in swapped.items():
            paths[name] = (quantized_ours(name, wbits, feeds[name], folder, args) if tool == "ours"
                           else quantized_onnxruntime(name, wbits, feeds[name], folder))
        if any(path is None for path in paths.values()):
            print(f"| {label} | n/a | n/a | n/a |", flush=True)
            continue
        exact, errors, same = pipeline_scores(pages, read_pages(pages, **paths), float_read)
        print(f"| {label} | {exact:.1f} | {errors:.1f} | {same:.1f} |", flush=True)
    if args.detector_study:
        run_detector_study(args, folder, pages, float_read, feeds["det"])
    return 0


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
    parser.add_argument("--pipeline", action="store_true",
                        help="run rapidocr's whole pipeline on rendered pages (--calib-count/--eval-count pages)")
    parser.add_argument("--detector-study", action="store_true",
                        help="with --pipeline: also quantize only the detector once per candidate cause of loss")
    parser.add_argument("--out", type=Path, help="folder for pages and models (--pipeline); models already in it are reused, so give "
                             "a fresh one for other options  [default: a new temporary folder]")
    args = parser.parse_args()
    if args.pipeline:
        return run_pipeline(args)
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
