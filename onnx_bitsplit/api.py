"""quantize(): the conversion, step by step. No math and no proto surgery here."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx

from .act_scale import choose_quantizer
from .calibration import as_feeds, batch_feeds, describe, single_shape_inputs
from .capture import Chooser, NetworkStreams
from .config import QuantConfig, memory_limit, tensor_limit
from .equalize import equalize
from .errors import BitsplitError, ModelError, OptionsError
from .graph import LayerSpec, find_layers, layer_work, non_finite_constant, prepare, refuse_unconvertible
from .layout import Layout, plan_layout, wider_layer_outputs
from .memory import peak_rss
from .mixed import budget_bits, measure_sensitivities
from .modelio import (OutputFiles, check_output_paths, file_sha256, load_model, model_files, save_model,
                      weights_path)
from .providers import make_session
from .qdq import bytes_besides_weights, carry_metadata, write_qdq
from .qdq_format import ACTIVATION_BITS
from .report import LayerReport, PhaseClock, Report, outliers, printable
from .rows import RowConverter
from .selection import check_overrides, exclude_layers, layer_bits
from .shapes import dynamic_inputs, input_shapes
from .statistics import layer_statistics
from .store import BatchStore
from .weights import WeightQuant, weight_quant

Progress = Callable[[str, int, int, str], None]
METHOD = "Bit-Split and Stitching (Wang et al., ICML 2020)"
OUTPUT_ERROR_LIMIT = 0.01  # a graph output's quantizer losing more (SQNR < 20 dB) is warned about


def quantize(model: onnx.ModelProto | str | os.PathLike, calibration, config: QuantConfig | None = None, *,
             progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """Quantize a float model to QDQ with Bit-Split and Stitching.

    Args:
        model: the float model, or its path (external data beside it is read, confined to its
            folder); it is not modified.
        calibration: an onnxruntime CalibrationDataReader or any iterable of {input_name: ndarray}.
        config: options. Defaults to QuantConfig() (W4A8, first and last layer W8).
        progress: called as progress(phase, done, total, layer_name) when a phase starts (done
            = total = 0, no name) and after each layer of the layer phases ("sensitivity" with a
            size budget, then "layers"); there done and total count work (multiply-accumulates
            of the layers), so a rate gives a true time estimate.

    Returns:
        (the quantized model, the Report of what was done).
    """
    start = time.perf_counter()
    config = config or QuantConfig()
    memory = memory_limit(config.max_memory)
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model, max_bytes=tensor_limit(config.max_memory))
    clock = PhaseClock(started=None if progress is None else lambda phase: progress(phase, 0, 0, ""))
    with clock("prepare"):
        prepared, layers, skipped, float_nodes = _prepare(model, config)
    with closing(BatchStore.within(memory, config.work_dir)) as store:
        with clock("calibration"):
            batches, samples, warnings = _calibration_batches(calibration, prepared, store, config)
        equalized = []
        if config.equalization:
            with clock("equalization"):
                prepared, layers, equalized = _equalize(prepared, layers, batches, store)
        layout = plan_layout(prepared, layers, float_nodes)
        config, widened = _for_target(config, prepared, layers, layout)
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in prepared.graph.initializer}
        bits = [layer_bits(config, layers, index) for index in range(len(layers))]
        sensitivity = reasons = None
        if config.size_budget is not None:
            with clock("sensitivity"):
                bits, sensitivity, reasons = _budget_bits(model, prepared, layout, layers, batches, store, weights,
                                                          config, progress)
        activations: dict[str, float] = {}
        with clock("capture"):
            streams = NetworkStreams(prepared, layers, batches, store, layout=layout, seed=config.seed,
                                     choose=_chooser(config.abits, clock, activations),
                                     compensate=config.error_compensation)
        with clock("layers"):
            solved, layer_reports = _solve_layers(streams, weights, bits, config, clock,
                                                  _reporter(progress, "layers", prepared, layers))
        with clock("write"):
            quantized = write_qdq(prepared, layout, solved, streams.quantizers, weight_storage=config.weight_storage)
            _stamp(model, quantized, config, layer_reports, samples)
            _check_loads(quantized)
        spilled_bytes = store.spilled_bytes
    warnings += widened + _collapsed_outputs(prepared, activations, config.abits) + outliers(
        layer_reports, activations, config.abits)
    if sensitivity is not None:
        layer_reports = [replace(layer, sensitivity=errors, reason=reason)
                         for layer, errors, reason in zip(layer_reports, sensitivity, reasons)]
    report = Report(layers=layer_reports, skipped=skipped, activations=activations, equalized=equalized,
                    calibration_samples=samples, activation_bits=config.abits,
                    phase_seconds=clock.seconds, float_bytes=model.ByteSize(), quant_bytes=quantized.ByteSize(),
                    peak_rss_bytes=peak_rss(), spilled_bytes=spilled_bytes, options=asdict(config),
                    calibration=describe(calibration), wall_seconds=time.perf_counter() - start, warnings=warnings)
    return quantized, report


def quantize_file(input_path: str | os.PathLike, output_path: str | os.PathLike, calibration,
                  config: QuantConfig | None = None, *, report_path: str | os.PathLike | None = None,
                  report_to: Callable[[str], None] | None = None, external_data: bool | None = None,
                  calibration_files: list[Path] = (), progress: Progress | None = None) -> Report:
    """quantize() from file to file, with the command's guarantees (README, Guarantees): every
    output path is checked against the files read (the model, its external data,
    `calibration_files`) and each other before any work; the model's external data must stay in
    its folder; the outputs (model, weights file, JSON report) are written as one transaction.

    Args:
        calibration: as for quantize(), or a function of the loaded model that returns it (when
            the data depend on the model, e.g. its input size).
        report_path: where to write the JSON report; None writes none.
        report_to: called with the JSON report before the files are renamed into place (e.g. to
            print it): if it raises, nothing is written.
        external_data: store the weights in `<output>.data`; None decides by size (2 GiB).

    Returns:
        The Report, with the sizes of the files and their paths (Report.files).
    """
    start = time.perf_counter()
    config = config or QuantConfig()
    input_path, output_path = Path(input_path), Path(output_path)
    if config.work_dir is None:  # spilled tensors beside the output: the disk it is written to
        config = replace(config, work_dir=str(output_path.parent.resolve()))
    report_path = Path(report_path) if report_path is not None else None
    if not input_path.is_file():
        raise ModelError(f"input model '{input_path}' does not exist or is not a file")
    inputs = model_files(input_path)
    check_output_paths({"output": output_path, "weights file": weights_path(output_path), "report": report_path},
                       inputs + list(calibration_files))
    float_bytes = sum(path.stat().st_size for path in inputs)
    model = load_model(input_path, max_bytes=tensor_limit(config.max_memory))
    refuse_unconvertible(model)  # before the calibration data is read: it may not fit a model that cannot be converted
    if callable(calibration) and not hasattr(calibration, "get_next"):
        calibration = calibration(model)
    quantized, report = quantize(model, calibration, config, progress=progress)
    with OutputFiles() as files:
        data_path = save_model(quantized, output_path, external_data=external_data, files=files)
        written = [output_path, data_path] if data_path else [output_path]
        report.float_bytes = float_bytes
        report.quant_bytes = sum(files.size(path) for path in written)
        report.files = {"input": str(input_path), "output": str(output_path)}
        report.files.update({"weights": str(data_path)} if data_path else {})
        report.files.update({"report": str(report_path)} if report_path else {})
        report.sha256 = {**{str(path): file_sha256(path) for path in inputs},
                         **{str(path): files.sha256(path) for path in written}}
        report.wall_seconds = time.perf_counter() - start
        if report_path:
            files.write(report_path, report.to_json().encode())
        if report_to is not None:
            report_to(report.to_json())
    return report


def _prepare(model: onnx.ModelProto, config: QuantConfig):
    """(the prepared model, its layers to quantize, (name, reason) of the layers kept in float,
    the names of the other nodes --exclude keeps in float)."""
    prepared = prepare(model, config.input_shapes, max_bytes=tensor_limit(config.max_memory))
    if config.target == "qnn" and (dynamic := dynamic_inputs(prepared)):
        raise OptionsError(f"--target qnn needs static shapes: give --input-shape for "
                            f"{', '.join(repr(printable(name)) for name in dynamic)}")
    layers, skipped = find_layers(prepared)
    if not layers:
        inside = [name for name, reason in skipped if reason.startswith("inside ")]
        raise ModelError("the model has no Conv, Gemm or MatMul with a constant weight to quantize" + (
            f" outside control flow: its {len(inside)} layers are inside If/Loop/Scan bodies, kept in float"
            if inside else ""))
    layers, excluded, float_nodes = exclude_layers(prepared, layers, config.exclude)
    check_overrides(config, layers)
    if not layers:
        raise BitsplitError("--exclude leaves no layer to quantize")
    return prepared, layers, skipped + excluded, float_nodes


def _for_target(config: QuantConfig, model: onnx.ModelProto, layers: list[LayerSpec],
                layout: Layout) -> tuple[QuantConfig, list[str]]:
    """(the config for the target's runtime, a warning of what that changed): QNN HTP takes no layer
    writing 16 bits from 8, so a layout with one (a transformer) gets 16-bit activations."""
    wider = wider_layer_outputs(model, layers, layout, config.abits) if config.target == "qnn" else []
    if not wider:
        return config, []
    return replace(config, abits=max(ACTIVATION_BITS)), [
        f"--target qnn: 16-bit activations throughout, as QNN HTP takes no layer writing 16 bits from 8 "
        f"and {len(wider)} layers write a residual stream's 16 bits (e.g. '{printable(wider[0])}')"]


def _calibration_batches(calibration, model: onnx.ModelProto, store: BatchStore, config: QuantConfig):
    """(the calibration batches, each input's arrays in the store; the samples in them; warnings
    about what they cover)."""
    shapes, batches, samples = input_shapes(model), [], 0
    fed = {name: set() for name in shapes}
    for batch, size in batch_feeds(as_feeds(calibration), shapes, batch_size=config.batch_size,
                                   count=config.calib_count):
        for name, value in batch.items():
            fed[name].add(value.shape[1:])
        batches.append({name: store.put(value) for name, value in batch.items()})
        samples += size
    warnings = [
        f"input '{printable(name)}' has a dynamic size and was calibrated at one only "
        f"({'x'.join(map(str, shape))}): activation ranges at other sizes are not covered; "
        "calibrate at the sizes it will run at (--input-size, repeatable) or fix it (--input-shape)"
        for name, shape in single_shape_inputs(shapes, fed).items()]
    return batches, samples, warnings


def _collapsed_outputs(model: onnx.ModelProto, errors: dict[str, float], bits: int) -> list[str]:
    """A warning for each graph output its quantizer loses much of (a near-constant output on a
    coarse grid): the model would pass as converted while what reads it sees noise or a constant."""
    return [f"output '{printable(o.name)}' loses {errors[o.name]:.0%} of its energy to its {bits}-bit quantizer "
            "on the calibration data: check it (onnx-bitsplit check) before use; --abits 16 keeps more of it"
            for o in model.graph.output if errors.get(o.name, 0.0) > OUTPUT_ERROR_LIMIT]


def _equalize(model: onnx.ModelProto, layers: list[LayerSpec], batches, store: BatchStore):
    """(the equalized model, its layers, the pairs equalized)."""
    names = {layer.name for layer in layers}
    equalized, pairs = equalize(model, names, [{name: store.get(item) for name, item in batch.items()}
                                               for batch in batches])
    return equalized, [layer for layer in find_layers(equalized)[0] if layer.name in names], pairs


def _budget_bits(model: onnx.ModelProto, prepared: onnx.ModelProto, layout, layers: list[LayerSpec], batches,
                 store: BatchStore, weights: dict, config: QuantConfig, progress: Progress | None):
    """(bits per layer within config.size_budget of the float model's size, each layer's measured
    errors by bits, the reason for each choice)."""
    sensitivity = measure_sensitivities(prepared, layers, batches, store, weights, config,
                                        _reporter(progress, "sensitivity", prepared, layers))
    weight_budget = int(config.size_budget * model.ByteSize()) - bytes_besides_weights(
        prepared, layout, layers, weight_storage=config.weight_storage)
    bits, reasons = budget_bits(layers, sensitivity, config, weight_budget)
    return bits, sensitivity, reasons


def _chooser(bits: int, clock: PhaseClock, errors: dict[str, float]) -> Chooser:
    """choose_quantizer() timed as the "activation_scales" phase, each tensor's error into `errors`."""
    def choose(decision, samples):
        with clock("activation_scales"):
            quantizer, errors[decision.name] = choose_quantizer(decision, samples, bits)
        return quantizer
    return choose


def _solve_layers(streams: NetworkStreams, weights: dict, bits: list[int], config: QuantConfig,
                  clock: PhaseClock, progress: Callable[[int], None]) -> tuple[list[WeightQuant], list[LayerReport]]:
    """Layer by layer: gather its statistics, solve, advance both streams with the result."""
    solved, reports = [], []
    convert = RowConverter()
    for index, layer in enumerate(streams.layers):
        start = time.perf_counter()
        with clock("statistics"):
            solver = layer_statistics(layer, streams, index, weights[layer.weight_name],
                                      blend=config.compensation_blend, sample_rows=config.sample_rows,
                                      seed=config.seed, convert=convert)
        with clock("solve"):
            solution = solver.solve(bits[index], iterations=config.iterations, damping=config.damping)
        weight = weight_quant(layer, solution, bits[index], float_bias=weights.get(layer.bias_name),
                              bias_correction=config.bias_correction,
                              input_scale=streams.quantizers[layer.input_name].scale)
        with clock("capture"):
            float_params = {name: weights[name] for name in (layer.weight_name, layer.bias_name) if name}
            streams.advance(index, float_params=float_params, quant_params=weight.simulated())
        solved.append(weight)
        groups, rows, inputs = solution.q.shape
        reports.append(LayerReport(layer.name, layer.op, bits[index], (groups * rows, inputs, groups),
                                   solution.rel_error, solution.rtn_rel_error, time.perf_counter() - start))
        progress(index)
    return solved, reports


def _stamp(model: onnx.ModelProto, quantized: onnx.ModelProto, config: QuantConfig, layers: list[LayerReport],
           calibration_samples: int) -> None:
    carry_metadata(model, quantized, keep_output_types=not config.input_shapes, stamp={
        "method": METHOD,
        "target": config.target,
        "layer_bits": json.dumps({layer.name: layer.bits for layer in layers}),
        "calibration_samples": str(calibration_samples),
        "options": json.dumps({key: value for key, value in asdict(config).items()
                               if key != "work_dir"}, sort_keys=True)})  # no local paths in a shipped file


def _check_loads(quantized: onnx.ModelProto) -> None:
    """The promise is a model onnxruntime runs and every float constant of it finite: keep it
    even for odd inputs."""
    name = non_finite_constant(quantized)
    if name is not None:
        raise ModelError(f"the quantized model's constant '{name}' is not finite")
    try:
        make_session(quantized)
    except Exception as exc:
        raise ModelError(f"the quantized model does not load in onnxruntime: {str(exc).strip()[:300]}") from None


def _reporter(progress: Progress | None, phase: str, model: onnx.ModelProto, layers: list[LayerSpec]):
    """progress(index) after layer `index`, reported as work done (graph.layer_work)."""
    if progress is None:
        return lambda index: None
    done = np.cumsum(layer_work(model, layers))
    return lambda index: progress(phase, int(done[index]), int(done[-1]), layers[index].name)
