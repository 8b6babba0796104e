"""The `onnx-bitsplit` command: flags -> QuantConfig, files in and out, errors -> exit codes.

    onnx-bitsplit IN.onnx OUT.onnx --calib DIR ...            quantize (the default command)
    onnx-bitsplit check FLOAT.onnx QUANT.onnx --data DIR ...  compare a quantized model with its float one

Exit codes: 0 done; 1 an error (bad input, a failed conversion: one `Error:` line); 2 a usage
error (an unknown option, a bad option value, a missing argument: one `Error:` line); 3 check found
the quantized model below a --min-* gate, or not running whole on --provider; 128 + the signal's
number when interrupted (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP). Nothing is left behind on any of them.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import onnx

from . import __version__
from .api import quantize_file
from .calibration import (ARRAY_SUFFIXES, CROP_FRACTION, DEFAULT_PRESET, DEFAULT_RESIZE, LAYOUTS, PRESETS, RESIZES,
                          ImageFolderReader, NpyReader)
from .check import compare
from .config import TARGET_PROVIDERS, TARGETS, QuantConfig, tensor_limit
from .qdq_format import ACTIVATION_BITS, WEIGHT_STORAGE
from .options import IMAGE_SIZE, INPUT_SHAPE, Bits, ByteSize, ChannelValues, FiniteFloat, Fraction, LayerBits
from .graph import check_tensor_sizes
from .shapes import input_shapes, misfit, named_shapes, set_input_shapes
from .errors import BitsplitError, CalibrationError, OptionsError, Terminated, first_line
from .modelio import file_sha256, load_model, model_files
from .qdq import stamped
from .providers import PROVIDERS
from .progress import progress_for
from .report import error_json, printable
from .memory import keep_freed_blocks

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE = 3  # check: the quantized model is below a --min-* gate
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULTS = QuantConfig()
LABEL_BYTES = 40  # a label in a list: a Python int and its pointer


class CommandError(click.ClickException):
    """Printed as one line, `Error: ...`; text from a model (names with line breaks or control
    characters) cannot break the line."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(printable(" ".join(message.split())))
        self.exit_code = exit_code


@contextmanager
def _one_line_errors(verbose: bool = False):
    """Every failure becomes one `Error: ...` line and its exit code, never a traceback (unless
    --verbose asks for it); numeric warnings on odd input are not the user's business."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except click.ClickException:
        raise
    except (KeyboardInterrupt, Terminated) as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        raise CommandError(Terminated.describe(signum), 128 + signum) from None
    except Exception as exc:  # ours name the culprit; a library failing on odd input: still one line
        if verbose:
            traceback.print_exc()
        if isinstance(exc, BitsplitError):
            raise CommandError(str(exc), EXIT_USAGE if isinstance(exc, OptionsError) else EXIT_ERROR) from None
        raise CommandError(f"{type(exc).__name__}: {first_line(exc)}") from None


def image_options(command):
    """How images become input tensors: shared by both commands (ImageOptions)."""
    options = [
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default=DEFAULT_PRESET, show_default=True,
                     help="Image normalisation: tf (x-127)/128, torch ImageNet mean/std, unit x/255, raw x."),
        click.option("--mean", type=ChannelValues(),
                     help="Per-channel mean in pixel units (overrides --preset), e.g. 123.7,116.3,103.5."),
        click.option("--std", type=ChannelValues(nonzero=True),
                     help="Per-channel std in pixel units (overrides --preset), e.g. 58.4,57.1,57.4."),
        click.option("--input-size", type=IMAGE_SIZE, multiple=True,
                     help="Image size for models whose input size is dynamic, e.g. 640x640; repeat it for "
                          "several (the images are split evenly among them), as the model will run at."),
        click.option("--layout", type=click.Choice(LAYOUTS),
                     help="Image tensor layout.  [default: from the model's input, channels of 3]"),
        click.option("--bgr", is_flag=True, help="Feed channels in BGR order (--mean/--std in that order too)."),
        click.option("--resize", type=click.Choice(RESIZES), default=DEFAULT_RESIZE, show_default=True,
                     help="How images are brought to the input's size: crop (resize the short side, center-crop), "
                          "letterbox (fit, pad with gray 114: YOLO), pad (to the height, pad the width with zeros "
                          "after normalisation: OCR text lines), fit (fit, sides multiples of 32, no padding: "
                          "detectors of dynamic size)."),
        click.option("--crop-ratio", type=FiniteFloat(0.0, 1.0, min_open=True), default=CROP_FRACTION,
                     show_default=True,
                     help="Resize the short side to size/RATIO, then center-crop (1 crops only the long side)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command(context_settings=CONTEXT, epilog="Compare the result with its float model: onnx-bitsplit check --help")
@click.argument("input_path", metavar="IN.onnx", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT.onnx", type=click.Path(path_type=Path))
@click.option("--calib", "calib", required=True, type=click.Path(path_type=Path),
              help="Calibration data: a folder of images, or .npy/.npz input tensors (a file or folder).")
@click.option("--calib-count", default=DEFAULTS.calib_count, show_default=True, type=click.IntRange(min=1),
              help="Use at most this many calibration samples.")
@image_options
@click.option("--max-memory", type=ByteSize(),
              help="Memory budget, e.g. 4G: a conversion keeps the tensors it caches within a quarter of "
                   "it (the rest goes to --work-dir), and a model whose weights or any one tensor (a "
                   "calibration array, an activation, a constant it folds) would take more than a quarter "
                   "of it is refused before it is allocated.  [default: 4G, or half the machine's memory if less]")
@click.option("--input-shape", "input_shapes", multiple=True, type=INPUT_SHAPE,
              help="Static input shape, e.g. 1x3x224x224 (NAME=DIMS for one of several inputs; "
                   "repeatable): the output has it and calibration runs at it. NPUs need static shapes.")
@click.option("--wbits", default=DEFAULTS.wbits, show_default=True, type=Bits(), help="Weight bits.")
@click.option("--abits", default=DEFAULTS.abits, show_default=True, type=click.Choice(ACTIVATION_BITS),
              help="Activation bits, per tensor: 8 (uint8), or 16 (uint16, for QNN HTP).")
@click.option("--target", default=DEFAULTS.target, show_default=True, type=click.Choice(TARGETS),
              help="The runtime the file is for: cpu (onnxruntime) and openvino get INT8 weights, their "
                   "integer kernels; qnn needs --input-shape, and 16-bit activations where a layer would "
                   "write 16 bits from 8; generic loads on all of them.")
@click.option("--weight-storage", type=click.Choice(WEIGHT_STORAGE),
              help="int4: weights of 2-4 bits stored as INT4 (smallest; NPUs); int8: the same values in "
                   "INT8, which CPU runtimes run as integer kernels.  [default: int8 for --target cpu and "
                   "openvino, else int4]")
@click.option("--first-last-wbits", default=DEFAULTS.first_last_wbits, show_default=True, type=Bits(same=True),
              help="Weight bits of the first and last layer; 'same' uses --wbits.")
@click.option("--depthwise-wbits", default=DEFAULTS.depthwise_wbits, show_default=True, type=Bits(same=True),
              help="Weight bits of depthwise Convs (9 weights a row for 3x3: too few for a 4-bit grid; "
                   "about 1% of the weights); 'same' uses --wbits.")
@click.option("--bits-per-layer", "layer_bits", multiple=True, type=LayerBits(),
              help="Weight bits of the layers PATTERN selects: a node name, an fnmatch pattern such as "
                   "'*depthwise*', an operator type such as 'op:Gemm', or '@depthwise'; repeatable.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep the nodes PATTERN selects in float (patterns as --bits-per-layer, any operator "
                   "type: op:Softmax); repeatable.")
@click.option("--size-budget", type=FiniteFloat(0.0, 1.0, min_open=True), metavar="FRACTION",
              help="Pick each layer's bits (4 or 8, by measured sensitivity) so the output is at most "
                   "this fraction of the input's size, e.g. 0.18; overrides --wbits/--first-last-wbits.")
@click.option("--error-compensation/--no-error-compensation", default=DEFAULTS.error_compensation,
              show_default=True, help="Solve each layer on inputs from the partially quantized network.")
@click.option("--compensation-blend", default=DEFAULTS.compensation_blend, show_default=True,
              type=FiniteFloat(0.0, 1.0),
              help="Weight of the quantized network's inputs in error compensation (0 = float inputs, "
                   "1 = the paper's).")
@click.option("--bias-correction/--no-bias-correction", default=DEFAULTS.bias_correction, show_default=True,
              help="Shift each bias by the mean output error of its layer.")
@click.option("--equalize/--no-equalize", "equalization", default=DEFAULTS.equalization, show_default=True,
              help="Fold per-channel factors into each Conv -> Conv pair so activations and weights "
                   "quantize with less loss (the paper's ECAQ).")
@click.option("--iterations", default=DEFAULTS.iterations, show_default=True, type=click.IntRange(min=0),
              help="Most alternations of scales and bit-plane sweeps per layer.")
@click.option("--damping", default=DEFAULTS.damping, show_default=True, type=FiniteFloat(0.0, 100.0),
              help="Ridge toward the float weights, as a fraction of the Gram matrix's mean diagonal.")
@click.option("--sample-rows", default=DEFAULTS.sample_rows, show_default=True, type=click.IntRange(min=0),
              help="Patch rows (output positions) each layer's statistics are estimated from, sampled "
                   "uniformly; at least 64 per weight column; 0 uses them all.")
@click.option("--seed", default=DEFAULTS.seed, show_default=True, type=click.IntRange(min=0),
              help="Seed of the samples drawn (patch rows, activation values): another seed shows how much "
                   "a result owes to them.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Calibration samples run at once where the batch axis is dynamic.  "
                   "[default: about 4 MiB of input]")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Where tensors past the memory budget go (a temporary folder, removed on exit).  "
                   "[default: the output's folder]")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the versioned JSON report (docs/json.md) to this file, or '-' for standard output.")
@click.option("--external-data", is_flag=True,
              help="Store the weights in OUT.onnx.data beside the output (automatic above 2 GiB).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--verbose", "-v", is_flag=True, help="On an error, print the full traceback before its line.")
def quantize_command(input_path: Path, output_path: Path, calib: Path, calib_count: int,
                     input_shapes: tuple[tuple[str, tuple[int, ...]], ...], layer_bits: tuple[tuple[str, int], ...],
                     exclude: tuple[str, ...], sample_rows: int, work_dir: Path | None, report_path: Path | None,
                     external_data: bool, quiet: bool, verbose: bool, preset: str, mean, std, input_size, layout: str,
                     bgr: bool, crop_ratio: float, resize: str, max_memory: int | None, **options):
    """Quantize a float ONNX model to a low-bit QDQ model with Bit-Split and Stitching."""
    images = ImageOptions(preset, mean, std, input_size, layout, bgr, crop_ratio, resize)
    to_stdout = report_path == Path("-")
    progress = None if quiet else progress_for()
    try:
        with _one_line_errors(verbose):
            config = QuantConfig(
                layer_wbits=dict(layer_bits), exclude=exclude, sample_rows=sample_rows or None,
                calib_count=calib_count, max_memory=max_memory,
                work_dir=None if work_dir is None else str(work_dir.resolve()),
                input_shapes=_input_shapes(input_path, input_shapes), **options)
            keep_freed_blocks()
            report = quantize_file(
                input_path, output_path,
                lambda model: _reader(model, calib, calib_count, images, max_memory, config.input_shapes),
                config, report_path=None if to_stdout else report_path, report_to=_emit if to_stdout else None,
                external_data=external_data or None, calibration_files=_data_files(calib), progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if not quiet:
        wrote = [path for role, path in report.files.items() if role in ("output", "weights", "report")]
        _note(report.summary() + "\nwrote " + " and ".join(wrote))


@click.command(context_settings=CONTEXT)
@click.argument("float_path", metavar="FLOAT.onnx", type=click.Path(path_type=Path))
@click.argument("quant_path", metavar="QUANT.onnx", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Inputs: a folder of images, or .npy/.npz input tensors (a file or folder).")
@click.option("--data-count", "--count", "count", type=click.IntRange(min=1),
              help="Use at most this many samples.  [default: all]")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Samples run at once where the batch axis is dynamic.")
@click.option("--calib", "calib", type=click.Path(path_type=Path),
              help="The calibration data of the quantized model: a warning says how many --data "
                   "samples are among them (agreement on calibration samples is inflated).")
@image_options
@click.option("--max-memory", type=ByteSize(),
              help="Memory limit, e.g. 4G: a model's weights, a calibration array or a labels file that would "
                   "take more than a quarter of it is refused before it is read.  "
                   "[default: 4G, or half the machine's memory if less]")
@click.option("--labels", "labels_path", type=click.Path(path_type=Path),
              help="Class of each sample, one integer a line in sample order. Without it, image names "
                   "that start with a class number (CCC_name.jpg) give the labels.")
@click.option("--min-agree", type=Fraction(),
              help="Exit with 3 if argmax agreement (outputs shaped as class scores) is below this: a fraction "
                   "such as 0.9, or 90%.")
@click.option("--min-cosine", type=Fraction(), help="Exit with 3 if an output's cosine similarity is below this.")
@click.option("--min-sqnr", type=FiniteFloat(), help="Exit with 3 if SQNR is below this many dB.")
@click.option("--provider", type=click.Choice(PROVIDERS),
              help="Run the quantized model on onnxruntime's CPU, on Qualcomm's NPU (QNN HTP, package "
                   "onnxruntime-qnn; no CPU fallback) or on OpenVINO's CPU plugin (package openvino); "
                   "exit with 3 unless the whole graph runs there.  [default: the file's --target "
                   "(qnn, openvino), else cpu]")
@click.option("--json", "as_json", is_flag=True, help="Print versioned JSON (docs/json.md) instead of a table.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but failures and warnings.")
@click.option("--verbose", "-v", is_flag=True, help="On an error, print the full traceback before its line.")
def check_command(float_path: Path, quant_path: Path, data: Path, count: int | None, batch_size: int,
                  calib: Path | None, max_memory: int | None, labels_path: Path | None, min_agree: float | None,
                  min_cosine: float | None, min_sqnr: float | None, provider: str | None, as_json: bool, quiet: bool,
                  verbose: bool,
                  preset: str, mean, std, input_size, layout: str, bgr: bool, crop_ratio: float, resize: str):
    """Run a float model and its quantized version on the same inputs and compare them: argmax
    agreement, top-1 where labels are known, cosine similarity, SQNR, max error, latency."""
    images = ImageOptions(preset, mean, std, input_size, layout, bgr, crop_ratio, resize)
    with _one_line_errors(verbose):
        limit = tensor_limit(max_memory)
        float_model, quant_model = load_model(float_path, max_bytes=limit), load_model(quant_path, max_bytes=limit)
        provider = provider or TARGET_PROVIDERS.get(stamped(quant_model, "target"), "cpu")
        reader = _reader(quant_model, data, count, images, max_memory)
        if calib is not None:
            _warn_overlap(data, calib, count)
        labels = _labels(labels_path, limit)
        report = compare(float_model, quant_model, reader, labels=labels, count=count, provider=provider,
                         batch_size=batch_size)
        report.files = {"float": str(float_path), "quantized": str(quant_path), "data": str(data)}
        report.sha256 = {str(path): file_sha256(path) for path in model_files(float_path) + model_files(quant_path)}
        gates = {"min_agree": min_agree, "min_cosine": min_cosine, "min_sqnr": min_sqnr}
        if not quiet:
            _emit(report.to_json(**gates) if as_json else report.table())
    failures = report.failures(**gates)
    for failure in failures:
        click.echo(f"FAILED: {failure}", err=True)
    if failures:
        sys.exit(EXIT_GATE)


def _warn_overlap(data: Path, calib: Path, count: int | None) -> None:
    """A warning when check samples are calibration samples (the same bytes, whatever the name)."""
    def digests(paths):
        return {file_sha256(p) for p in paths}

    samples = sorted(_data_files(data))[:count]
    shared = len(digests(samples) & digests(_data_files(calib)))
    if shared:
        click.echo(f"warning: {shared} of the {len(samples)} --data files are calibration data (--calib): "
                   "agreement on them is inflated", err=True)


def _note(text: str) -> None:
    """Text for people on stderr: a stream that cannot take it (closed, a full disk) does not
    fail a run whose results are written."""
    try:
        click.echo(text, err=True)
    except (OSError, ValueError):
        pass


def _emit(text: str) -> None:
    """Print the result on standard output; a stdout that cannot take it (closed, a full disk, a
    closed pipe) is an error, and no second failure follows when Python flushes it at exit."""
    if sys.stdout is None:  # closed before Python started
        raise BitsplitError("cannot write to standard output: it is closed")
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise BitsplitError(f"cannot write to standard output: {getattr(exc, 'strerror', None) or exc}") from None


def _labels(labels_path: Path | None, max_bytes: int) -> list[int] | None:
    """The labels file's classes, one integer a line; None without one (the reader's own then).
    A label takes up to LABEL_BYTES in memory: a file whose labels would not fit `max_bytes` is
    refused before it is read."""
    if labels_path is None:
        return None
    if not labels_path.is_file():
        raise CalibrationError(f"labels file '{labels_path}' does not exist")
    if labels_path.stat().st_size // 2 * LABEL_BYTES > max_bytes:  # two bytes at least a label: a digit, a line end
        raise CalibrationError(f"labels file '{labels_path}' is too large for the memory limit (--max-memory)")
    try:
        return [int(line) for line in labels_path.read_text().split()]
    except (UnicodeDecodeError, ValueError):
        raise CalibrationError(f"labels file '{labels_path}' must hold one integer a line") from None


def _input_shapes(path: Path, shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> dict[str, tuple[int, ...]]:
    """--input-shape values by input name; a value without a name is the model's only input's."""
    if not shapes:
        return {}
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise BitsplitError(f"cannot read '{path}' as an ONNX model") from None
    model_shapes = input_shapes(model)
    try:
        named = named_shapes(list(shapes), list(model_shapes))
    except BitsplitError as exc:
        raise click.BadParameter(str(exc), param_hint="--input-shape") from None
    problem = misfit(named, model_shapes)
    if problem:
        raise click.BadParameter(problem, param_hint="--input-shape")
    return named


def _data_files(path: Path) -> list[Path]:
    """The files a --calib or --data path reads."""
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    return [path] if path.exists() else []


@dataclass(frozen=True)
class ImageOptions:
    """How images become input tensors (image_options): ImageFolderReader's arguments as given."""

    preset: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    sizes: tuple[tuple[int, int], ...]
    layout: str | None
    bgr: bool
    crop_ratio: float
    resize: str


def _reader(model: onnx.ModelProto, path: Path, count: int | None, images: ImageOptions, max_memory: int | None,
            static_shapes: dict | None = None):
    """An NpyReader for array files, else an ImageFolderReader sized to the model's input (or to
    its --input-shape), laid out as the input is (or as --layout says)."""
    shapes = input_shapes(model)
    if path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES or path.is_dir() and any(
            p.suffix.lower() in ARRAY_SUFFIXES for p in path.iterdir()):
        return NpyReader(path, list(shapes), max_bytes=tensor_limit(max_memory))
    if len(shapes) != 1:
        raise CalibrationError(f"the model has {len(shapes)} inputs; calibrate it with .npz files keyed by input name")
    name, dims = next(iter(shapes.items()))
    dims = list((static_shapes or {}).get(name, dims))
    layout = images.layout or ("nhwc" if len(dims) == 4 and dims[3] == 3 and dims[1] != 3 else "nchw")
    channels, height, width = (dims[1], dims[2], dims[3]) if len(dims) == 4 and layout == "nchw" else \
        (dims[3], dims[1], dims[2]) if len(dims) == 4 else (0, 0, 0)
    if channels != 3:
        raise CalibrationError(f"input '{name}' is not a 3-channel {layout.upper()} image; "
                               "calibrate it with .npy/.npz files")
    sizes = list(images.sizes) or [(height, width)]
    if not all(sizes[0]):
        raise CalibrationError(f"input '{name}' has a dynamic size; give one with --input-size HxW")
    for size in images.sizes:  # the tensors the model computes at that size must fit the budget too
        shape = (dims[0] or 1, 3, *size) if layout == "nchw" else (dims[0] or 1, *size, 3)
        if misfit({name: shape}, shapes) is None:
            at_size = onnx.ModelProto()
            at_size.CopyFrom(model)
            set_input_shapes(at_size, {name: shape})
            check_tensor_sizes(at_size, tensor_limit(max_memory))
    return ImageFolderReader(path, name, sizes, preset=images.preset, mean=images.mean, std=images.std,
                             count=count, layout=layout, bgr=images.bgr, crop_ratio=images.crop_ratio,
                             resize=images.resize)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="onnx-bitsplit")
def cli():
    """Low-bit QDQ ONNX models by Bit-Split and Stitching post-training quantization.

    `onnx-bitsplit IN.onnx OUT.onnx --calib DIR` quantizes: `quantize` is the default command.
    Exit codes: 0 done, 1 error, 2 usage error, 3 check gate failed, 128 + signal number when
    interrupted (130 Ctrl-C, 143 SIGTERM).
    """


cli.add_command(quantize_command, "quantize")
cli.add_command(check_command, "check")


def main(argv: list[str] | None = None) -> None:
    """Run the command line; `quantize` is implied unless the first word names a command or asks
    for help or the version. Usage errors are one line too, with exit code 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] not in cli.commands and args[0] not in ("-h", "--help", "--version"):
        if _looks_like_a_command(args[0]):
            _fail(f"no such command '{args[0]}' (commands: {', '.join(cli.commands)}; see onnx-bitsplit --help)",
                  EXIT_USAGE)
        args = ["quantize", *args]
    record = args[:1] == ["quantize"] and _reports_to_stdout(args)
    try:
        code = cli.main(args, prog_name="onnx-bitsplit", standalone_mode=False)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "onnx-bitsplit"
        _fail(f"{exc.format_message()} (see {command} --help)", EXIT_USAGE, record)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code, record)
    except click.exceptions.Abort:
        _fail(Terminated.describe(signal.SIGINT), 128 + signal.SIGINT, record)
    except Terminated as exc:  # a signal while click parses the command line
        _fail(Terminated.describe(exc.signum), 128 + exc.signum, record)
    sys.exit(code if isinstance(code, int) else 0)


def _reports_to_stdout(args: list[str]) -> bool:
    """Whether the command line asks for the JSON report on standard output (--report -)."""
    return "--report=-" in args or any(a == "--report" and b == "-" for a, b in zip(args, args[1:]))


def _looks_like_a_command(word: str) -> bool:
    """A bare word that names no file: a mistyped command rather than a model path."""
    return word.isidentifier() and not Path(word).exists()


def _fail(message: str, code: int, record: bool = False) -> None:
    """Exit with `code` after one `Error:` line on stderr and, with `record`, the error's JSON
    record on stdout (what a pipeline parsing --report - reads)."""
    message = printable(" ".join(message.split()))
    _note(f"Error: {message}")
    if record:
        try:
            click.echo(error_json(message, code))
        except (OSError, ValueError):
            pass
    sys.exit(code)
