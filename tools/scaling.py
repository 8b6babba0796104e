"""How conversion cost grows with the calibration set: wall time, its ratio to one float pass over
the same samples, the time per phase, peak memory and what spilled to disk, per sample count.

    python tools/scaling.py                                   # the embedded model, 64/256/1024 samples
    python tools/scaling.py --images ../shared/data/imagenet-sample-dev
    python tools/scaling.py --model det.onnx --images pages/ --input-size 640x640 --counts 256,1024

Samples are the images of --images (sorted by name), then their mirror images, then those of the
next rotation, as many as a count asks. Every conversion runs with default options (W4A8) in a
fresh process, so its peak resident memory is its own; the float pass runs the same samples one
at a time through onnxruntime. The markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort

from onnx_bitsplit import ImageFolderReader, QuantConfig, quantize
from onnx_bitsplit.calibration import PRESETS

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("capture", "statistics", "solve", "activation_scales")


def samples(folder: Path, input_name: str, size: tuple[int, int], preset: str, count: int):
    """`count` feeds: the images, then the same images mirrored, flipped, and both."""
    mean, std = PRESETS[preset]
    reader = ImageFolderReader(folder, input_name, size, mean=mean, std=std)
    images = len(reader.paths)
    for index in range(count):
        if index % images == 0:
            reader.rewind()
        feed = reader.get_next()
        turn = (index // images) % 4
        if turn & 1:
            feed[input_name] = feed[input_name][..., ::-1].copy()
        if turn & 2:
            feed[input_name] = feed[input_name][..., ::-1, :].copy()
        yield feed


def convert(model_path: Path, folder: Path, size, preset: str, count: int) -> dict:
    model = onnx.load(model_path)
    input_name = model.graph.input[0].name
    start = time.perf_counter()
    _, report = quantize(model, samples(folder, input_name, size, preset, count), QuantConfig(calib_count=count))
    return {"seconds": time.perf_counter() - start, "phases": report.phase_seconds,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "spilled": report.spilled_bytes}


def float_pass(model_path: Path, folder: Path, size, preset: str, count: int) -> float:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    feeds = list(samples(folder, input_name, size, preset, min(count, 64)))
    start = time.perf_counter()
    for feed in feeds:
        session.run(None, feed)
    return (time.perf_counter() - start) * count / len(feeds)  # per-sample cost does not depend on the count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "efficientnet-lite0.onnx")
    parser.add_argument("--images", type=Path, default=ROOT / "models" / "calibration")
    parser.add_argument("--input-size", default="224x224", help="HxW the images are resized and cropped to")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tf")
    parser.add_argument("--counts", default="64,256,1024")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.input_size.split("x"))
    print(f"Model `{args.model.name}` at {args.input_size}, samples from `{args.images.name}` (mirrored past its "
          f"{len(ImageFolderReader(args.images, '', size).paths)} images), W4A8 default options.\n")
    print("| samples | conversion s | x float pass | " + " | ".join(PHASES) + " | peak GiB | spilled GiB |")
    print("| ---: " * (5 + len(PHASES)) + "|")
    for count in map(int, args.counts.split(",")):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            result = pool.apply(convert, (args.model, args.images, size, args.preset, count))
        ratio = result["seconds"] / float_pass(args.model, args.images, size, args.preset, count)
        phases = " | ".join(f"{result['phases'].get(name, 0.0):.1f}" for name in PHASES)
        print(f"| {count} | {result['seconds']:.0f} | {ratio:.0f}x | {phases} | {result['peak'] / 2**30:.2f} | "
              f"{result['spilled'] / 2**30:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
