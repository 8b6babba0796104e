"""The `onnx-bitsplit` command: flags -> QuantConfig, files in and out, errors -> exit codes.

    onnx-bitsplit IN.onnx OUT.onnx --calib DIR ...            quantize (the default command)
    onnx-bitsplit check FLOAT.onnx QUANT.onnx --data DIR ...  compare a quantized model with its float one

Exit codes: 0 done; 1 an error (bad input, a failed conversion: one `Error:` line); 2 a usage
error (an unknown option, a bad option value, a missing argument: one `Error:` line); 3 check found
the quantized model below a --min-* gate, or not running whole on --provider; 128 + the signal's
number when interrupted (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP). Nothing is left behind on any of them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import click
import onnx

from . import __version__
from .api import quantize_file
from .calibration import (ARRAY_SUFFIXES, CROP_FRACTION, LAYOUTS, PRESETS, ImageFolderReader, NpyReader,
                          labels_from_names)
from .check import compare
from .config import QuantConfig, memory_limit
from .errors import BitsplitError, CalibrationError, Terminated, first_line
from .modelio import load_model
from .providers import PROVIDERS
from .report import printable
from .store import keep_freed_blocks

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE = 3  # check: the quantized model is below a --min-* gate
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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
            raise CommandError(str(exc)) from None
        raise CommandError(f"{type(exc).__name__}: {first_line(exc)}") from None


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got '{text}'") from None
    if len(values) not in (1, 3):
        raise click.BadParameter(f"expected 1 or 3 numbers, got {len(values)}")
    return values * 3 if len(values) == 1 else values


def _layer_bits(pairs: tuple[str, ...]) -> dict[str, int]:
    bits = {}
    for pair in pairs:
        name, _, value = pair.rpartition("=")
        if not name or not value.isdigit():
            raise click.BadParameter(f"expected PATTERN=BITS, got '{pair}'")
        bits[name] = int(value)
    return bits


def data_options(command):
    """How images become input tensors, and the memory limit: shared by both commands, which
    receive them as one dict of keyword arguments (see _reader)."""
    options = [
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tf", show_default=True,
                     help="Image normalisation: tf (x-127)/128, torch ImageNet mean/std, unit x/255, raw x."),
        click.option("--mean", help="Per-channel mean in pixel units (overrides --preset), e.g. 123.7,116.3,103.5."),
        click.option("--std", help="Per-channel std in pixel units (overrides --preset), e.g. 58.4,57.1,57.4."),
        click.option("--input-size", metavar="HxW", multiple=True,
                     help="Image size for models whose input size is dynamic, e.g. 640x640; repeat it for "
                          "several (the images are split evenly among them), as the model will run at."),
        click.option("--layout", type=click.Choice(LAYOUTS),
                     help="Image tensor layout.  [default: from the model's input, channels of 3]"),
        click.option("--bgr", is_flag=True, help="Feed channels in BGR order (--mean/--std in that order too)."),
        click.option("--crop-ratio", type=float, default=CROP_FRACTION, show_default=True,
                     help="Resize the short side to size/RATIO, then center-crop (1 crops only the long side)."),
        click.option("--max-memory", metavar="SIZE", callback=lambda ctx, param, value: _bytes(value),
                     help="Memory budget, e.g. 4G: a conversion keeps the tensors it caches within a quarter "
                          "of it (the rest goes to --work-dir), and any single input (a model's weights, a "
                          "calibration array, a constant it folds) larger than it is refused before it is "
                          "allocated.  [default: 4G, or half the machine's memory if less]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command(context_settings=CONTEXT, epilog="Compare the result with its float model: onnx-bitsplit check --help")
@click.argument("input_path", metavar="IN.onnx", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT.onnx", type=click.Path(path_type=Path))
@click.option("--calib", "calib", required=True, type=click.Path(path_type=Path),
              help="Calibration data: a folder of images, or .npy/.npz input tensors (a file or folder).")
@click.option("--calib-count", default=256, show_default=True, type=int,
              help="Use at most this many calibration samples.")
@data_options
@click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]DIMS",
              help="Static input shape, e.g. 1x3x224x224 (NAME=DIMS for one of several inputs; "
                   "repeatable): the output has it and calibration runs at it. NPUs need static shapes.")
@click.option("--wbits", default=4, show_default=True, type=int, help="Weight bits, 2 to 8.")
@click.option("--abits", default=8, show_default=True, type=int,
              help="Activation bits, per tensor: 8 (uint8), or 16 (uint16, for QNN HTP).")
@click.option("--weight-storage", default="int4", show_default=True, metavar="int4|int8",
              help="int4: weights of 2-4 bits stored as INT4 (smallest; NPUs); int8: the same values in "
                   "INT8, which CPU runtimes run as integer kernels.")
@click.option("--first-last-wbits", default="8", show_default=True,
              help="Weight bits of the first and last layer; 'same' uses --wbits.")
@click.option("--depthwise-wbits", default="8", show_default=True,
              help="Weight bits of depthwise Convs (9 weights a row for 3x3: too few for a 4-bit grid; "
                   "about 1% of the weights); 'same' uses --wbits.")
@click.option("--bits-per-layer", "layer_bits", multiple=True, metavar="PATTERN=BITS",
              help="Weight bits of the layers PATTERN selects: a node name, an fnmatch pattern such as "
                   "'*depthwise*', an operator type such as 'op:Gemm', or '@depthwise'; repeatable.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep the layers PATTERN selects in float (patterns as --bits-per-layer); repeatable.")
@click.option("--size-budget", type=float,
              help="Pick each layer's bits (4 or 8, by measured sensitivity) so the output is at most "
                   "this fraction of the input's size, e.g. 0.18; overrides --wbits/--first-last-wbits.")
@click.option("--error-compensation/--no-error-compensation", default=True, show_default=True,
              help="Solve each layer on inputs from the partially quantized network.")
@click.option("--compensation-blend", default=0.5, show_default=True, type=float,
              help="Weight of the quantized network's inputs in error compensation (0 = float inputs, "
                   "1 = the paper's).")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Shift each bias by the mean output error of its layer.")
@click.option("--equalize/--no-equalize", "equalization", default=False, show_default=True,
              help="Fold per-channel factors into each Conv -> Conv pair so activations and weights "
                   "quantize with less loss (the paper's ECAQ).")
@click.option("--iterations", default=10, show_default=True, type=int,
              help="Most alternations of scales and bit-plane sweeps per layer.")
@click.option("--damping", default=0.3, show_default=True, type=float,
              help="Ridge toward the float weights, as a fraction of the Gram matrix's mean diagonal.")
@click.option("--sample-rows", default=QuantConfig.sample_rows, show_default=True, type=click.IntRange(min=0),
              help="Patch rows (output positions) each layer's statistics are estimated from, sampled "
                   "uniformly; at least 64 per weight column; 0 uses them all.")
@click.option("--seed", default=QuantConfig.seed, show_default=True, type=click.IntRange(min=0),
              help="Seed of the samples drawn (patch rows, activation values): another seed shows how much "
                   "a result owes to them.")
@click.option("--batch-size", type=int,
              help="Calibration samples run at once.  [default: about 4 MiB of input]")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Where tensors past the memory budget go (a temporary folder, removed on exit).  "
                   "[default: the output's folder]")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the versioned JSON report (README) to this file, or '-' for standard output.")
@click.option("--external-data", is_flag=True,
              help="Store the weights in OUT.onnx.data beside the output (automatic above 2 GiB).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--verbose", "-v", is_flag=True, help="On an error, print the full traceback before its line.")
def quantize_command(input_path: Path, output_path: Path, calib: Path, calib_count: int, input_shapes: tuple[str, ...],
                     wbits: int, abits: int, weight_storage: str, first_last_wbits: str, depthwise_wbits: str,
                     layer_bits: tuple[str, ...], exclude: tuple[str, ...], size_budget: float | None, error_compensation: bool, compensation_blend: float,
                     bias_correction: bool, equalization: bool,
                     iterations: int, damping: float, sample_rows: int, seed: int, batch_size: int | None, work_dir: Path | None,
                     report_path: Path | None, external_data: bool, quiet: bool, verbose: bool, **data_options):
    """Quantize a float ONNX model to a low-bit QDQ model with Bit-Split and Stitching."""
    with _one_line_errors(verbose):
        config = QuantConfig(
            wbits=wbits, abits=abits, weight_storage=weight_storage,
            first_last_wbits=None if first_last_wbits == "same" else _int(first_last_wbits),
            depthwise_wbits=None if depthwise_wbits == "same" else _int(depthwise_wbits),
            layer_wbits=_layer_bits(layer_bits), exclude=exclude, size_budget=size_budget, error_compensation=error_compensation,
            compensation_blend=compensation_blend,
            bias_correction=bias_correction, equalization=equalization,
            iterations=iterations, damping=damping, sample_rows=sample_rows or None, seed=seed,
            batch_size=batch_size, calib_count=calib_count, max_memory=data_options["max_memory"],
            work_dir=None if work_dir is None else str(work_dir))
        if input_shapes:
            config = replace(config, input_shapes=_input_shapes(input_path, input_shapes))
        to_stdout = report_path == Path("-")
        keep_freed_blocks()
        report = _quantize_with_progress(
            input_path, output_path, lambda model: _reader(model, calib, calib_count, data_options, config.input_shapes),
            config, quiet, report_path=None if to_stdout else report_path, external_data=external_data or None,
            calibration_files=_data_files(calib))
        if to_stdout:
            _emit(report.to_json())
        if not quiet:
            click.echo(report.summary(), err=True)
            click.echo("wrote " + " and ".join(path for role, path in report.files.items()
                                               if role in ("output", "weights", "report")), err=True)


@click.command(context_settings=CONTEXT)
@click.argument("float_path", metavar="FLOAT.onnx", type=click.Path(path_type=Path))
@click.argument("quant_path", metavar="QUANT.onnx", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Inputs: a folder of images, or .npy/.npz input tensors (a file or folder).")
@click.option("--data-count", "--count", "count", type=int, help="Use at most this many samples.  [default: all]")
@click.option("--batch-size", default=16, show_default=True, type=int,
              help="Samples run at once where the batch axis is dynamic.")
@click.option("--calib", "calib", type=click.Path(path_type=Path),
              help="The calibration data of the quantized model: a warning says how many --data "
                   "samples are among them (agreement on calibration samples is inflated).")
@data_options
@click.option("--labels", "labels_path", type=click.Path(path_type=Path),
              help="Class of each sample, one integer a line in sample order. Without it, image names "
                   "that start with a class number (CCC_name.jpg) give the labels.")
@click.option("--min-agree", callback=lambda ctx, param, value: _fraction(value), metavar="FRACTION",
              help="Exit with 3 if argmax agreement is below this: a fraction such as 0.9, or 90%.")
@click.option("--min-sqnr", type=float, help="Exit with 3 if SQNR is below this many dB.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True,
              help="Run the quantized model on onnxruntime's CPU, on Qualcomm's NPU (QNN HTP, package "
                   "onnxruntime-qnn; no CPU fallback) or on OpenVINO's CPU plugin (package openvino); "
                   "exit with 3 unless the whole graph runs there.")
@click.option("--json", "as_json", is_flag=True, help="Print versioned JSON (README) instead of a table.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but failures and warnings.")
@click.option("--verbose", "-v", is_flag=True, help="On an error, print the full traceback before its line.")
def check_command(float_path: Path, quant_path: Path, data: Path, count: int | None, batch_size: int,
                  calib: Path | None, labels_path: Path | None, min_agree: float | None,
                  min_sqnr: float | None, provider: str, as_json: bool, quiet: bool, verbose: bool, **data_options):
    """Run a float model and its quantized version on the same inputs and compare them: argmax
    agreement, top-1 where labels are known, cosine similarity, SQNR, max error, latency."""
    with _one_line_errors(verbose):
        limit = memory_limit(data_options["max_memory"])
        float_model, quant_model = load_model(float_path, max_bytes=limit), load_model(quant_path, max_bytes=limit)
        reader = _reader(quant_model, data, count, data_options)
        if calib is not None:
            _warn_overlap(data, calib, count)
        labels = _labels(reader, labels_path)
        report = compare(float_model, quant_model, reader, labels=labels, count=count, provider=provider,
                         batch_size=batch_size)
        if not quiet:
            _emit(report.to_json(min_agree=min_agree, min_sqnr=min_sqnr) if as_json else report.table())
    failures = report.failures(min_agree=min_agree, min_sqnr=min_sqnr)
    for failure in failures:
        click.echo(f"FAILED: {failure}", err=True)
    if failures:
        sys.exit(EXIT_GATE)


def _warn_overlap(data: Path, calib: Path, count: int | None) -> None:
    """A warning when check samples are calibration samples (the same bytes, whatever the name)."""
    def digests(paths):
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    samples = sorted(_data_files(data))[:count]
    shared = len(digests(samples) & digests(_data_files(calib)))
    if shared:
        click.echo(f"warning: {shared} of the {len(samples)} --data files are calibration data (--calib): "
                   "agreement on them is inflated", err=True)


def _fraction(text: str | None) -> float | None:
    """'0.9' or '90%' -> 0.9; a number above 1 without '%' is refused (it was meant as a percent)."""
    if text is None:
        return None
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"expected a fraction from 0 to 1 or a percent such as 90%, got '{text}'")
    return value


def _emit(text: str) -> None:
    """Print the result on standard output; a stdout that cannot take it (a full disk, a closed
    pipe) is an error line, and no second failure follows when Python flushes it at exit."""
    try:
        click.echo(text)
        sys.stdout.flush()
    except OSError as exc:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise BitsplitError(f"cannot write to standard output: {exc.strerror or exc}") from None


def _labels(reader, labels_path: Path | None) -> list[int] | None:
    if labels_path is None:
        return labels_from_names(reader.paths) if isinstance(reader, ImageFolderReader) else None
    if not labels_path.is_file():
        raise CalibrationError(f"labels file '{labels_path}' does not exist")
    try:
        return [int(line) for line in labels_path.read_text().split()]
    except (UnicodeDecodeError, ValueError):
        raise CalibrationError(f"labels file '{labels_path}' must hold one integer a line") from None


def _bytes(text: str | None) -> int | None:
    """'512M', '4G', '1.5G' or a number of bytes."""
    if text is None:
        return None
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    number, unit = (text[:-1], units[text[-1].lower()]) if text and text[-1].lower() in units else (text, 1)
    try:
        size = int(float(number) * unit)
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise click.BadParameter(f"expected a size such as 4G or 512M, got '{text}'")
    return size


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise click.BadParameter(f"expected HEIGHTxWIDTH such as 640x640, got '{text}'")
    return int(height), int(width)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"expected a number or 'same', got '{text}'") from None


def _input_shapes(path: Path, texts: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """--input-shape values by input name; a bare DIMS names the model's only input."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise BitsplitError(f"cannot read '{path}' as an ONNX model") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    shapes = {}
    for text in texts:
        name, _, dims = text.rpartition("=")
        if not name:
            if len(inputs) != 1:
                raise click.BadParameter(f"the model has {len(inputs)} inputs: give NAME=DIMS", param_hint="--input-shape")
            name = inputs[0]
        parts = dims.lower().split("x")
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise click.BadParameter(f"expected DIMS such as 1x3x224x224, got '{dims}'", param_hint="--input-shape")
        shapes[name] = tuple(int(p) for p in parts)
    return shapes


def _data_files(path: Path) -> list[Path]:
    """The files a --calib or --data path reads."""
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    return [path] if path.exists() else []


def _reader(model: onnx.ModelProto, path: Path, count: int | None, options: dict, input_shapes: dict | None = None):
    """An NpyReader for array files, else an ImageFolderReader sized to the model's input (or to
    its --input-shape), laid out as the input is (or as --layout says).

    Args:
        options: the data_options (preset, mean, std, input_size, layout, bgr, crop_ratio, max_memory).
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES or path.is_dir() and any(
            p.suffix.lower() in ARRAY_SUFFIXES for p in path.iterdir()):
        return NpyReader(path, [i.name for i in inputs], max_bytes=memory_limit(options["max_memory"]))
    if len(inputs) != 1:
        raise CalibrationError(f"the model has {len(inputs)} inputs; calibrate it with .npz files keyed by input name")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    dims = list((input_shapes or {}).get(inputs[0].name, dims))
    layout = options["layout"] or ("nhwc" if len(dims) == 4 and dims[3] == 3 and dims[1] != 3 else "nchw")
    channels, height, width = (dims[1], dims[2], dims[3]) if len(dims) == 4 and layout == "nchw" else \
        (dims[3], dims[1], dims[2]) if len(dims) == 4 else (0, 0, 0)
    if channels != 3:
        raise CalibrationError(f"input '{inputs[0].name}' is not a 3-channel {layout.upper()} image; "
                               "calibrate it with .npy/.npz files")
    sizes = [_size(text) for text in options["input_size"]] or [(height, width)]
    if not all(sizes[0]):
        raise CalibrationError(f"input '{inputs[0].name}' has a dynamic size; give one with --input-size HxW")
    preset_mean, preset_std = PRESETS[options["preset"]]
    return ImageFolderReader(path, inputs[0].name, sizes, mean=_floats(options["mean"]) or preset_mean,
                             std=_floats(options["std"]) or preset_std, count=count, layout=layout,
                             bgr=options["bgr"], crop_ratio=options["crop_ratio"])


def _quantize_with_progress(input_path: Path, output_path: Path, calibration, config: QuantConfig, quiet: bool,
                            **options):
    """quantize_file() with a progress bar per phase on stderr when it is a terminal, opened once
    the phase's first layer is done (so an early error prints nothing but its own line); the bars
    count work, so their time estimates hold when layers differ in size."""
    if quiet or not sys.stderr.isatty():
        return quantize_file(input_path, output_path, calibration, config, **options)
    bars = {}

    def progress(phase: str, done: int, total: int, name: str) -> None:
        if phase not in bars:
            for bar in bars.values():
                bar.__exit__(None, None, None)
            bars[phase] = click.progressbar(length=total, label=phase, file=sys.stderr, show_percent=True,
                                            item_show_func=lambda item: item).__enter__()
        bars[phase].update(done - bars[phase].pos, printable(name)[-40:])

    try:
        return quantize_file(input_path, output_path, calibration, config, progress=progress, **options)
    finally:
        if bars:
            list(bars.values())[-1].__exit__(None, None, None)




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
        args = ["quantize", *args]
    try:
        code = cli.main(args, prog_name="onnx-bitsplit", standalone_mode=False)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "onnx-bitsplit"
        _fail(f"{exc.format_message()} (see {command} --help)", EXIT_USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.exceptions.Abort:
        _fail(Terminated.describe(signal.SIGINT), 128 + signal.SIGINT)
    except Terminated as exc:  # a signal while click parses the command line
        _fail(Terminated.describe(exc.signum), 128 + exc.signum)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {printable(' '.join(message.split()))}", err=True)
    sys.exit(code)
