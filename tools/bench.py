"""Benchmark: quantize one model several ways on the same calibration images and evaluate every
result on the same held-out images.

    python tools/bench.py                        # EfficientNet-Lite0 from ../shared, all methods
    python tools/bench.py --methods float,bitsplit-ec-w4 --calib-count 64

Calibration uses the first --calib-count images of --images (sorted by name) and evaluation the
rest; with --calib-last, the last --calib-count images calibrate and the ones before them evaluate
(a second split, to check that a default chosen on the first one holds).
Labels come from the file names (`CCC_wnid_name.jpg` -> int(CCC)). Columns: top-1, argmax agreement
with the float model, conversion seconds, output size, onnxruntime CPU latency (median of batch-1
runs). The markdown table goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_bitsplit import ImageFolderReader, QuantConfig, quantize
from onnx_bitsplit.calibration import PRESETS
from onnx_bitsplit.graph import find_layers, prepare

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@dataclass(frozen=True)
class Method:
    """One way to produce a model: ours (a QuantConfig), onnxruntime's, or the float model."""

    label: str
    config: QuantConfig | None = None
    ort_bits: int | None = None
    ort_calibration: str = "MinMax"


def _ours(label: str, wbits: int, **options) -> Method:
    return Method(label, QuantConfig(wbits=wbits, **options))


RTN = dict(iterations=0, error_compensation=False, bias_correction=False)
# One technique changed at a time from the default (Bit-Split + error compensation), at W4 and W3.
TECHNIQUES = {
    "no-bias-correction": dict(bias_correction=False),
    "blend1": dict(compensation_blend=1.0),  # the paper's: quantized-network inputs only
    "blend0.25": dict(compensation_blend=0.25),
    "blend0.75": dict(compensation_blend=0.75),
    "damping0.01": dict(damping=0.01),
    "damping0.1": dict(damping=0.1),
    "damping1": dict(damping=1.0),
    "equalize": dict(equalization=True),
    "depthwise8": dict(layer_wbits={"@depthwise": 8}),
}
ABLATIONS = {m.label: m for m in [_ours(f"ec-w{b}-{name}", b, **options)
                                  for b in (4, 3) for name, options in TECHNIQUES.items()]}
METHODS = {m.label: m for m in [
    Method("float"),
    Method("ort-minmax-w8", ort_bits=8),
    Method("ort-percentile-w8", ort_bits=8, ort_calibration="Percentile"),
    Method("ort-minmax-w4", ort_bits=4),
    Method("ort-percentile-w4", ort_bits=4, ort_calibration="Percentile"),
    *[_ours(f"rtn-w{b}", b, **RTN) for b in (8, 4, 3)],
    *[_ours(f"bitsplit-w{b}", b, error_compensation=False) for b in (8, 4, 3)],
    *[_ours(f"bitsplit-ec-w{b}", b) for b in (8, 4, 3)],
]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet-lite0.onnx")
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "imagenet-sample-dev")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tf")
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--calib-last", action="store_true",
                        help="calibrate on the last --calib-count images, evaluate on the ones before them")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)}; or the ablations "
                             f"{', '.join(ABLATIONS)}")
    parser.add_argument("--out", type=Path, default=Path("bench.md"))
    parser.add_argument("--keep", type=Path, help="keep the quantized models in this folder")
    args = parser.parse_args(argv)

    model = onnx.load(args.model)
    input_name = model.graph.input[0].name
    size = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[2:])
    mean, std = PRESETS[args.preset]

    def reader(calibration: bool):
        r = ImageFolderReader(args.images, input_name, size, mean=mean, std=std)
        split = len(r.paths) - args.calib_count if args.calib_last else args.calib_count
        first, second = r.paths[:split], r.paths[split:]
        r.paths = (second if args.calib_last else first) if calibration else (first if args.calib_last else second)
        return r

    held_out = reader(calibration=False)
    x = np.concatenate([feed[input_name] for feed in held_out])
    labels = np.array([int(p.name[:3]) for p in held_out.paths])
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    float_predictions = predict(args.model, input_name, x)

    rows = []
    for label in args.methods.split(","):
        method = {**METHODS, **ABLATIONS}[label]
        path = args.model if label == "float" else workdir / f"{label}.onnx"
        seconds = 0.0 if label == "float" else convert(method, args.model, path, lambda: reader(calibration=True))
        predictions = predict(path, input_name, x)
        rows.append((label, 100 * (predictions == labels).mean(), 100 * (predictions == float_predictions).mean(),
                     seconds, path.stat().st_size / 2**20, latency_ms(path, input_name, x[:1])))
        print(f"{label}: top-1 {rows[-1][1]:.1f}%", file=sys.stderr, flush=True)

    table = markdown(rows, args, len(labels))
    args.out.write_text(table)
    print(table)
    return 0


def convert(method: Method, model_path: Path, path: Path, calibration) -> float:
    """Seconds to load, quantize and save (onnxruntime is given the path: it edits a ModelProto
    it is given in place)."""
    start = time.perf_counter()
    if method.config is not None:
        quantized, _ = quantize(onnx.load(model_path), calibration(), method.config)
        onnx.save(quantized, path)
    else:
        ort_quantize(model_path, path, calibration(), method.ort_bits, method.ort_calibration)
    return time.perf_counter() - start


def ort_quantize(model_path: Path, path: Path, reader, bits: int, calibration: str) -> None:
    """onnxruntime's quantize_static: QDQ, per-channel weights, uint8 activations; at 4 bits the
    first and last layer keep 8-bit weights, as ours do."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    overrides = {}
    if bits == 4:
        layers, _ = find_layers(prepare(onnx.load(model_path)))
        overrides = {layers[i].weight_name: [{"quant_type": QuantType.QInt8}] for i in (0, -1)}
    quantize_static(
        str(model_path), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt4 if bits == 4 else QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, calibration),
        extra_options={"TensorQuantOverrides": overrides} if overrides else None)


def predict(path: Path, input_name: str, x: np.ndarray, batch: int = 32) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: x[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(x), batch)])


def latency_ms(path: Path, input_name: str, x: np.ndarray, runs: int = 30) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {input_name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {input_name: x})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def markdown(rows, args, evaluated: int) -> str:
    where = ("last", "before") if args.calib_last else ("first", "after")
    lines = [
        f"Model `{args.model.name}`, calibration: {where[0]} {args.calib_count} images of `{args.images.name}`, "
        f"evaluation: the {evaluated} {where[1]} them.",
        "",
        "| method | top-1 % | agreement with float % | conversion s | size MiB | latency ms (batch 1) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {label} | {top1:.1f} | {agree:.1f} | {seconds:.0f} | {size:.2f} | {latency:.1f} |"
              for label, top1, agree, seconds, size, latency in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
