"""Benchmark: quantize one model several ways on the same calibration images, evaluate every result
on the same held-out images, and run it where users deploy it.

    python tools/bench.py          # the embedded model and its 64 images: 32 calibrate, 32 evaluate
    python tools/bench.py --images ../shared/data/imagenet-sample-dev   # the README tables
    python tools/bench.py --methods float,bitsplit-ec-w4 --calib-count 64

Calibration uses the first --calib-count images of --images (sorted by name; default: 256, or
half of the images when there are fewer than 512) and evaluation the rest; with --calib-last, the last --calib-count images calibrate and the ones before them evaluate
(a second split, to check that a default chosen on the first one holds). Labels come from the file
names (`CCC_wnid_name.jpg` -> int(CCC)). Every model is written with a static batch-1 input
(`--input-shape 1xCxHxW`, what NPUs need; onnxruntime's rows go through its quant_pre_process at
that shape), so every row can be deployed as it is.

Columns: top-1, argmax agreement with the float model, conversion seconds and their ratio to one
float pass over the same calibration images (onnxruntime, batch 1, measured in the same run), the
conversion's peak resident memory (each conversion runs in a fresh process), file size, and per
runtime: onnxruntime CPU batch-1 latency and its integer ops after its optimizer (QLinear*, QGemm;
"float" counts the Conv/Gemm/MatMul left in float), OpenVINO CPU batch-1 latency and how many of
its Convolution/FullyConnected layers run in u8/i8, and whether QNN HTP (onnxruntime-qnn) takes the
whole graph without CPU fallback. Latencies are measured interleaved (every model once per round,
--rounds rounds of --runs runs) and the best median is kept: the machine is shared and noisy.
The markdown table goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_bitsplit import ImageFolderReader, QuantConfig, quantize
from onnx_bitsplit.calibration import PRESETS, labels_from_names
from onnx_bitsplit.errors import BitsplitError
from onnx_bitsplit.graph import find_layers, prepare
from onnx_bitsplit.shapes import input_shapes, set_input_shapes
from onnx_bitsplit.providers import open_runner
from onnx_bitsplit.memory import keep_freed_blocks

ROOT = Path(__file__).resolve().parents[1]
INTEGER_OPS = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize")
FLOAT_LAYERS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


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
    "depthwise-same": dict(depthwise_wbits=None),  # depthwise Convs at the width of the rest
    "all-rows": dict(sample_rows=None),  # statistics over every patch row, not a sample
    "rows128k": dict(sample_rows=131072),
    "iterations5": dict(iterations=5),
    **{f"seed{seed}": dict(seed=seed) for seed in (1, 2, 3)},  # the default with other samples: the noise
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
    _ours("bitsplit-ec-w4-int8", 4, weight_storage="int8"),
    _ours("bitsplit-ec-w3-int8", 3, weight_storage="int8"),
    _ours("bitsplit-ec-w8a16", 8, abits=16),
    _ours("bitsplit-ec-w4a16", 4, abits=16),
]}
DEFAULT_METHODS = ("float,ort-minmax-w8,ort-minmax-w4,rtn-w4,bitsplit-w4,bitsplit-ec-w8,bitsplit-ec-w4,"
                   "bitsplit-ec-w4-int8,bitsplit-ec-w3,bitsplit-ec-w3-int8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "efficientnet-lite0.onnx")
    parser.add_argument("--images", type=Path, default=ROOT / "models" / "calibration",
                        help="images named CCC_anything.jpg (CCC the class)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tf")
    parser.add_argument("--calib-count", type=int, help="[default: 256, or half of the images if fewer than 512]")
    parser.add_argument("--calib-last", action="store_true",
                        help="calibrate on the last --calib-count images, evaluate on the ones before them")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, from: {', '.join(METHODS)}; or the ablations "
                             f"{', '.join(ABLATIONS)}")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds (the best median is kept)")
    parser.add_argument("--runs", type=int, default=20, help="timed batch-1 runs per model and round")
    parser.add_argument("--out", type=Path, default=Path("bench.md"))
    parser.add_argument("--keep", type=Path, help="keep the models in this folder")
    args = parser.parse_args(argv)
    if args.calib_count is None:
        args.calib_count = min(256, len(ImageFolderReader(args.images, "", (1, 1)).paths) // 2)

    model = onnx.load(args.model)
    (input_name, dims), = input_shapes(model).items()
    shape = (1, *dims[1:])
    mean, std = PRESETS[args.preset]

    paths = ImageFolderReader(args.images, input_name, shape[2:]).paths
    split = len(paths) - args.calib_count if args.calib_last else args.calib_count
    first, second = paths[:split], paths[split:]
    calibration_paths, held_out_paths = (second, first) if args.calib_last else (first, second)
    calibration = Calibration(args.images, input_name, shape[2:], mean, std, calibration_paths)
    x = np.concatenate([feed[input_name] for feed in calibration.reader(held_out_paths)])
    labels = np.array(labels_from_names(held_out_paths))
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    static_float = workdir / "float.onnx"
    float_model = onnx.load(args.model)
    set_input_shapes(float_model, {input_name: shape})
    onnx.save(onnx.shape_inference.infer_shapes(float_model), static_float)
    float_predictions = predict(static_float, input_name, x)
    float_pass = timed_pass(static_float, input_name, np.concatenate([f[input_name] for f in calibration.reader()]))

    rows, paths = [], []
    for label in args.methods.split(","):
        method = {**METHODS, **ABLATIONS}[label]
        path = static_float if label == "float" else workdir / f"{label}.onnx"
        seconds, peak = (0.0, 0) if label == "float" else in_fresh_process(
            convert, method, static_float, path, calibration, {input_name: shape})
        predictions = predict(path, input_name, x)
        rows.append({"method": label, "top1": 100 * (predictions == labels).mean(),
                     "agree": 100 * (predictions == float_predictions).mean(), "seconds": seconds,
                     "ratio": seconds / float_pass, "peak_gib": peak / 2**30,
                     "mib": path.stat().st_size / 2**20, **onnxruntime_ops(path, workdir), **deployment(path)})
        paths.append(path)
        print(f"{label}: top-1 {rows[-1]['top1']:.1f}%", file=sys.stderr, flush=True)
    for row, ort_ms, ov_ms in zip(rows, *interleaved_latencies(paths, {input_name: x[:1]}, args.rounds, args.runs)):
        row.update(ort_ms=ort_ms, ov_ms=ov_ms)

    table = markdown(rows, args, len(labels))
    args.out.write_text(table)
    print(table)
    return 0


@dataclass(frozen=True)
class Calibration:
    """What an ImageFolderReader over the calibration images needs (picklable for a child process)."""

    folder: Path
    input_name: str
    size: tuple[int, int]
    mean: tuple
    std: tuple
    paths: list[Path]

    def reader(self, paths: list[Path] | None = None) -> ImageFolderReader:
        reader = ImageFolderReader(self.folder, self.input_name, self.size, mean=self.mean, std=self.std)
        reader.paths = self.paths if paths is None else paths
        return reader


def in_fresh_process(function, *args):
    """(function(*args), the peak resident bytes of the process that ran it): a spawned process,
    so that the peak is the conversion's own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_with_peak, (function, *args))


def _with_peak(function, *args):
    import resource
    result = function(*args)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def convert(method: Method, model_path: Path, path: Path, calibration: Calibration, shapes: dict) -> float:
    """Seconds to load, quantize and save (onnxruntime is given the path: it edits a ModelProto
    it is given in place)."""
    keep_freed_blocks()  # as the command does
    start = time.perf_counter()
    if method.config is not None:
        quantized, _ = quantize(onnx.load(model_path), calibration.reader(), replace(method.config, input_shapes=shapes))
        onnx.save(quantized, path)
    else:
        ort_quantize(model_path, path, calibration.reader(), method.ort_bits, method.ort_calibration)
    return time.perf_counter() - start


def timed_pass(path: Path, input_name: str, x: np.ndarray) -> float:
    """Seconds of one onnxruntime pass over x, one sample at a time (the session made beforehand)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    for i in range(len(x)):
        session.run(None, {input_name: x[i:i + 1]})
    return time.perf_counter() - start


def ort_quantize(model_path: Path, path: Path, reader, bits: int, calibration: str) -> None:
    """onnxruntime's quant_pre_process, then quantize_static: QDQ, per-channel weights, uint8
    activations; at 4 bits (INT4 weights) the first and last layer keep 8-bit weights, as ours do."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_suffix(".pre.onnx")
    quant_pre_process(str(model_path), str(prepared))
    overrides = {}
    if bits == 4:
        layers, _ = find_layers(prepare(onnx.load(prepared)))
        overrides = {layers[i].weight_name: [{"quant_type": QuantType.QInt8}] for i in (0, -1)}
    quantize_static(
        str(prepared), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt4 if bits == 4 else QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, calibration),
        extra_options={"TensorQuantOverrides": overrides} if overrides else None)
    prepared.unlink()


def predict(path: Path, input_name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: x[i:i + 1]})[0].argmax(1) for i in range(len(x))])


def onnxruntime_ops(path: Path, workdir: Path) -> dict:
    """Integer ops and the Conv/Gemm/MatMul left in float after onnxruntime's CPU optimizer."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(workdir / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(workdir / "optimized.onnx").graph.node)
    return {"int_ops": sum(c for op, c in ops.items() if op.startswith(INTEGER_OPS)),
            "float_layers": sum(c for op, c in ops.items() if op in FLOAT_LAYERS)}


def deployment(path: Path) -> dict:
    """OpenVINO's integer layers (of all its weighted layers) and whether QNN HTP takes the whole
    graph; '-' where the package is missing."""
    model = onnx.load(path)
    result = {}
    try:
        placement = open_runner(model, "openvino").placement
        layers = sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
        result["ov_int"] = f"{layers - len(placement.fallbacks)}/{layers}"
    except BitsplitError:
        result["ov_int"] = "-"
    try:
        result["qnn"] = "yes" if open_runner(model, "qnn").placement.whole else "no"
    except BitsplitError as exc:
        result["qnn"] = "-" if "pip install" in str(exc) else "no"
    return result


def interleaved_latencies(paths: list[Path], feed: dict, rounds: int, runs: int) -> tuple[list, list]:
    """Batch-1 latency in ms of every model on onnxruntime CPU and on OpenVINO CPU: each round runs
    every model in turn, and each model keeps its best median over the rounds."""
    runners = {"cpu": [open_runner(onnx.load(p), "cpu") for p in paths]}
    try:
        runners["openvino"] = [open_runner(onnx.load(p), "openvino") for p in paths]
    except BitsplitError:
        pass
    best = {name: [float("inf")] * len(paths) for name in runners}
    for _ in range(rounds):
        for name, group in runners.items():
            for index, runner in enumerate(group):
                runner.run(feed)
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    runner.run(feed)
                    times.append(time.perf_counter() - start)
                best[name][index] = min(best[name][index], 1000 * float(np.median(times)))
    return best["cpu"], best.get("openvino", [float("nan")] * len(paths))


def markdown(rows: list[dict], args, evaluated: int) -> str:
    where = ("last", "before") if args.calib_last else ("first", "after")
    lines = [
        f"Model `{args.model.name}`, calibration: {where[0]} {args.calib_count} images of `{args.images.name}`, "
        f"evaluation: the {evaluated} {where[1]} them; batch-1 static input.",
        "",
        "| method | top-1 % | agreement % | conversion s (x float pass) | peak GiB | size MiB | ORT CPU ms "
        "| ORT integer ops (float layers) | OpenVINO ms | OpenVINO int8 layers | QNN HTP whole |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    lines += [f"| {r['method']} | {r['top1']:.1f} | {r['agree']:.1f} | "
              + (f"{r['seconds']:.0f} ({r['ratio']:.0f}x) | {r['peak_gib']:.2f} | " if r["seconds"] else "- | - | ")
              + f"{r['mib']:.2f} | "
              f"{r['ort_ms']:.2f} | {r['int_ops']} ({r['float_layers']}) | {r['ov_ms']:.2f} | {r['ov_int']} | {r['qnn']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
