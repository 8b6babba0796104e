"""The `onnx-bitsplit` command: flags -> QuantConfig, files in and out, errors -> exit codes.

    onnx-bitsplit IN.onnx OUT.onnx --calib DIR ...      quantize (the main job)
    onnx-bitsplit check FLOAT.onnx QUANT.onnx --data DIR  compare a quantized model with its float one
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import click
import onnx

from .api import quantize
from .calibration import ARRAY_SUFFIXES, PRESETS, ImageFolderReader, NpyReader, labels_from_names
from .check import compare
from .config import QuantConfig
from .errors import BitsplitError, CalibrationError, ModelError
from .modelio import load_model, save_model, write_text_atomic
from .providers import PROVIDERS

EXIT_ERROR = 1
EXIT_GATE = 3  # check: the quantized model is below a --min-* gate
EXIT_INTERRUPTED = 130
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CommandError(click.ClickException):
    """Printed as one line, `Error: ...`, with exit code 1; text from a model (names with line
    breaks or control characters) cannot break the line."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else "?" for c in " ".join(message.split())))


@contextmanager
def _one_line_errors():
    """Every failure becomes one `Error: ...` line and a non-zero exit, never a traceback; numeric
    warnings on odd input are not the user's business."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except click.ClickException:
        raise
    except BitsplitError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a library failing on input nobody foresaw: still one line
        lines = str(exc).strip().splitlines()
        raise CommandError(f"{type(exc).__name__}: {lines[0] if lines else 'failed'}") from None


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


def main(argv: list[str] | None = None):
    """Entry point: `check` as the first word selects the check command, anything else quantizes."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "check":
        return check_command.main(args[1:], prog_name="onnx-bitsplit check")
    return quantize_command.main(args, prog_name="onnx-bitsplit")


def image_options(command):
    """--preset, --mean, --std and --input-size, shared by both commands."""
    command = click.option("--input-size", metavar="HxW",
                           help="Image size for models whose input size is dynamic, e.g. 640x640.")(command)
    command = click.option("--std", help="Per-channel std in pixel units (overrides --preset), e.g. 58.4,57.1,57.4.")(command)
    command = click.option("--mean", help="Per-channel mean in pixel units (overrides --preset), e.g. 123.7,116.3,103.5.")(command)
    return click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tf", show_default=True,
                        help="Image normalisation: tf (x-127)/128, torch ImageNet mean/std, unit x/255, raw x.")(command)


@click.command(context_settings=CONTEXT, epilog="Compare the result with its float model: onnx-bitsplit check --help")
@click.argument("input_path", metavar="IN.onnx", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT.onnx", type=click.Path(path_type=Path))
@click.option("--calib", "calib", required=True, type=click.Path(path_type=Path),
              help="Calibration data: a folder of images, or .npy/.npz input tensors (a file or folder).")
@click.option("--calib-count", default=256, show_default=True, type=int,
              help="Use at most this many calibration samples.")
@image_options
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
              help="Weight bits of the layers whose node name matches PATTERN (a name, or fnmatch "
                   "such as '*depthwise*'; '@depthwise' selects every depthwise Conv); repeatable.")
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
@click.option("--batch-size", default=16, show_default=True, type=int,
              help="Calibration samples run at once.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the per-layer figures to this JSON file.")
@click.option("--external-data", is_flag=True,
              help="Store the weights in OUT.onnx.data beside the output (automatic above 2 GiB).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def quantize_command(input_path: Path, output_path: Path, calib: Path, calib_count: int, preset: str,
                     mean: str | None, std: str | None, input_size: str | None, input_shapes: tuple[str, ...],
                     wbits: int, abits: int, weight_storage: str, first_last_wbits: str, depthwise_wbits: str,
                     layer_bits: tuple[str, ...], size_budget: float | None, error_compensation: bool, compensation_blend: float,
                     bias_correction: bool, equalization: bool,
                     iterations: int, damping: float, batch_size: int, report_path: Path | None,
                     external_data: bool, quiet: bool):
    """Quantize a float ONNX model to a low-bit QDQ model with Bit-Split and Stitching."""
    with _one_line_errors():
        config = QuantConfig(
            wbits=wbits, abits=abits, weight_storage=weight_storage,
            first_last_wbits=None if first_last_wbits == "same" else _int(first_last_wbits),
            depthwise_wbits=None if depthwise_wbits == "same" else _int(depthwise_wbits),
            layer_wbits=_layer_bits(layer_bits), size_budget=size_budget, error_compensation=error_compensation,
            compensation_blend=compensation_blend,
            bias_correction=bias_correction, equalization=equalization,
            iterations=iterations, damping=damping,
            batch_size=batch_size, calib_count=calib_count)
        _check_paths(input_path, output_path)
        model = load_model(input_path)
        config = replace(config, input_shapes=_input_shapes(model, input_shapes))
        reader = _reader(model, calib, calib_count, preset, mean, std, input_size, config.input_shapes)
        quantized, report = _quantize_with_progress(model, reader, config, quiet)
        data_path = save_model(quantized, output_path, external_data=external_data or None)
        if report_path:
            write_text_atomic(report_path, report.to_json())
    if not quiet:
        report.float_bytes, report.quant_bytes = input_path.stat().st_size, output_path.stat().st_size
        click.echo(report.summary(), err=True)
        click.echo(f"wrote {output_path}" + (f" and {data_path}" if data_path else ""), err=True)


@click.command(context_settings=CONTEXT)
@click.argument("float_path", metavar="FLOAT.onnx", type=click.Path(path_type=Path))
@click.argument("quant_path", metavar="QUANT.onnx", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Inputs: a folder of images, or .npy/.npz input tensors (a file or folder).")
@click.option("--count", type=int, help="Use at most this many samples.  [default: all]")
@image_options
@click.option("--labels", "labels_path", type=click.Path(path_type=Path),
              help="Class of each sample, one integer a line in sample order. Without it, image names "
                   "that start with a class number (CCC_name.jpg) give the labels.")
@click.option("--min-agree", type=float, help="Exit with 3 if argmax agreement is below this fraction.")
@click.option("--min-sqnr", type=float, help="Exit with 3 if SQNR is below this many dB.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True,
              help="Run the quantized model on onnxruntime's CPU, on Qualcomm's NPU (QNN HTP, package "
                   "onnxruntime-qnn; no CPU fallback) or on OpenVINO's CPU plugin (package openvino); "
                   "exit with 3 unless the whole graph runs there.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def check_command(float_path: Path, quant_path: Path, data: Path, count: int | None, preset: str,
                  mean: str | None, std: str | None, input_size: str | None, labels_path: Path | None, min_agree: float | None,
                  min_sqnr: float | None, provider: str, as_json: bool):
    """Run a float model and its quantized version on the same inputs and compare them: argmax
    agreement, top-1 where labels are known, cosine similarity, SQNR, max error, latency."""
    with _one_line_errors():
        float_model, quant_model = load_model(float_path), load_model(quant_path)
        reader = _reader(quant_model, data, count, preset, mean, std, input_size)
        labels = _labels(reader, labels_path)
        report = compare(float_model, quant_model, reader, labels=labels, count=count, provider=provider)
    click.echo(report.to_json() if as_json else report.table())
    failures = report.failures(min_agree=min_agree, min_sqnr=min_sqnr)
    for failure in failures:
        click.echo(f"FAILED: {failure}", err=True)
    if failures:
        sys.exit(EXIT_GATE)


def _labels(reader, labels_path: Path | None) -> list[int] | None:
    if labels_path is None:
        return labels_from_names(reader.paths) if isinstance(reader, ImageFolderReader) else None
    if not labels_path.is_file():
        raise CalibrationError(f"labels file '{labels_path}' does not exist")
    try:
        return [int(line) for line in labels_path.read_text().split()]
    except (UnicodeDecodeError, ValueError):
        raise CalibrationError(f"labels file '{labels_path}' must hold one integer a line") from None


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


def _input_shapes(model: onnx.ModelProto, texts: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """--input-shape values by input name; a bare DIMS names the model's only input."""
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


def _check_paths(input_path: Path, output_path: Path) -> None:
    """Fail before any work when the output could not be written or would replace the input."""
    if not input_path.is_file():
        raise ModelError(f"input model '{input_path}' does not exist or is not a file")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise BitsplitError("the output path is the input path; the input is never overwritten")
    folder = output_path.parent
    if not folder.is_dir():
        raise BitsplitError(f"output folder '{folder}' does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise BitsplitError(f"output folder '{folder}' is not writable") from None


def _reader(model: onnx.ModelProto, calib: Path, count: int | None, preset: str, mean: str | None,
            std: str | None, input_size: str | None, input_shapes: dict | None = None):
    """An NpyReader for array files, else an ImageFolderReader sized to the model's input (or to
    its --input-shape)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if calib.is_file() and calib.suffix.lower() in ARRAY_SUFFIXES or calib.is_dir() and any(
            p.suffix.lower() in ARRAY_SUFFIXES for p in calib.iterdir()):
        return NpyReader(calib, [i.name for i in inputs])
    if len(inputs) != 1:
        raise CalibrationError(f"the model has {len(inputs)} inputs; calibrate it with .npz files keyed by input name")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    dims = list((input_shapes or {}).get(inputs[0].name, dims))
    if len(dims) != 4 or dims[1] != 3:
        raise CalibrationError(f"input '{inputs[0].name}' is not a 3-channel NCHW image; "
                               "calibrate it with .npy/.npz files")
    size = _size(input_size) if input_size else (dims[2], dims[3])
    if not all(size):
        raise CalibrationError(f"input '{inputs[0].name}' has a dynamic size; give one with --input-size HxW")
    preset_mean, preset_std = PRESETS[preset]
    return ImageFolderReader(calib, inputs[0].name, size,
                             mean=_floats(mean) or preset_mean, std=_floats(std) or preset_std, count=count)


def _quantize_with_progress(model, reader, config: QuantConfig, quiet: bool):
    """quantize() with a progress bar over layers on stderr, opened once the first layer is done
    (so an early error prints nothing but its own line)."""
    if quiet:
        return quantize(model, reader, config)
    bars = []

    def progress(done: int, total: int, name: str) -> None:
        if not bars:
            bars.append(click.progressbar(length=total, label="layers", file=sys.stderr, show_pos=True,
                                          item_show_func=lambda item: item).__enter__())
        bars[0].update(done - bars[0].pos, name)

    try:
        return quantize(model, reader, config, progress=progress)
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


