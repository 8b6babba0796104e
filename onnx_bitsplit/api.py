"""quantize(): the conversion, step by step. No math and no proto surgery here."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import onnx

from .act_scale import fake_quant, mse_affine, mse_scale, sample_values
from .calibration import as_feeds, batch_feeds, input_shapes, sample_count
from .capture import NetworkStreams, make_session
from .config import QuantConfig
from .equalize import equalize
from .errors import BitsplitError, ModelError
from .graph import LayerSpec, find_layers, is_non_negative, prepare
from .mixed import LayerCost, allocate_bits, storage_bytes
from .qdq import ActivationQuant, WeightQuant, write_qdq
from .report import LayerReport, Report
from .solver import BitSplitSolver, LayerSolution

PATCH_ELEMENTS = 1 << 22  # patch values built at once per stream: 16 MiB, small enough that
# malloc reuses the buffer instead of mapping (and page-faulting) fresh memory each time

Progress = Callable[[int, int, str], None]
DEPTHWISE = "@depthwise"  # the layer_wbits key that selects every depthwise Conv
BUDGET_BITS = (4, 8)  # INT4 holds 2 to 4 bits at one cost, INT8 5 to 8: a byte budget picks from these
SENSITIVITY_ITERATIONS = 3


def quantize(model: onnx.ModelProto, calibration, config: QuantConfig | None = None, *,
             progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """Quantize a float model to QDQ with Bit-Split and Stitching.

    Args:
        model: the float model; it is not modified.
        calibration: an onnxruntime CalibrationDataReader or any iterable of {input_name: ndarray}.
        config: options. Defaults to QuantConfig() (W4A8, first and last layer W8).
        progress: called as progress(done, total, layer_name) after each layer.

    Returns:
        (the quantized model, the Report of what was done).
    """
    config = config or QuantConfig()
    report = Report()
    with _phase(report, "prepare"):
        prepared = prepare(model)
        layers, report.skipped = find_layers(prepared)
        if not layers:
            raise ModelError("the model has no Conv, Gemm or MatMul with a constant weight to quantize")
    with _phase(report, "calibration"):
        batches = batch_feeds(as_feeds(calibration), input_shapes(prepared),
                              batch_size=config.batch_size, count=config.calib_count)
        report.calibration_samples = sample_count(batches)
    if config.equalization:
        with _phase(report, "equalization"):
            prepared, report.equalized = equalize(prepared, {layer.name for layer in layers}, batches)
            layers, report.skipped = find_layers(prepared)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in prepared.graph.initializer}
    bits = [layer_bits(config, layers, index) for index in range(len(layers))]
    if config.size_budget is not None:
        with _phase(report, "sensitivity"):
            sensitivity = _sensitivities(prepared, layers, batches, weights, config)
            bits, reasons = _budget_bits(model, prepared, layers, weights, sensitivity, config)
    with _phase(report, "capture"):
        streams = NetworkStreams(prepared, layers, batches, compensate=config.error_compensation)
    solved, activations = _solve_layers(prepared, streams, weights, bits, config, report, progress)
    if config.size_budget is not None:
        report.layers = [replace(layer, sensitivity=errors, reason=reason)
                         for layer, errors, reason in zip(report.layers, sensitivity, reasons)]
    with _phase(report, "write"):
        quantized = write_qdq(prepared, solved, activations)
        try:  # the promise is a model onnxruntime runs: keep it even for odd inputs
            make_session(quantized)
        except Exception as exc:
            raise ModelError(f"the quantized model does not load in onnxruntime: {str(exc).strip()[:300]}") from None
    report.float_bytes, report.quant_bytes = model.ByteSize(), quantized.ByteSize()
    return quantized, report


def _solve_layers(model: onnx.ModelProto, streams: NetworkStreams, weights: dict, bits: list[int],
                  config: QuantConfig, report: Report, progress: Progress | None):
    """Layer by layer: quantize its input, gather its statistics, solve, advance both streams.

    Returns:
        (the WeightQuant of every layer, the ActivationQuant of every quantized input).
    """
    layers = streams.layers
    activations: dict[str, ActivationQuant] = {}
    solved = []
    for index, layer in enumerate(layers):
        start = time.perf_counter()
        with _phase(report, "activation scales"):
            if layer.input_name not in activations:
                activations[layer.input_name], report.activations[layer.input_name] = \
                    _quantize_input(model, streams, index, config)
        with _phase(report, "statistics"):
            solver = _accumulate(layer, streams, index, weights[layer.weight_name], config.compensation_blend)
        with _phase(report, "solve"):
            solution = solver.solve(bits[index], iterations=config.iterations, damping=config.damping)
        weight_quant, float_params, quant_params = _layer_quant(layer, solution, weights, bits[index], config)
        with _phase(report, "capture"):
            if index + 1 < len(layers):
                streams.advance(index, float_params=float_params, quant_params=quant_params)
        solved.append(weight_quant)
        groups, rows, inputs = solution.q.shape
        report.layers.append(LayerReport(
            layer.name, layer.op, bits[index], (groups * rows, inputs, groups),
            solution.rel_error, solution.rtn_rel_error, time.perf_counter() - start))
        if progress:
            progress(index + 1, len(layers), layer.name)
    return solved, list(activations.values())


def layer_bits(config: QuantConfig, layers: list[LayerSpec], index: int) -> int:
    """Weight bits of layers[index]: an override by name, pattern or '@depthwise', else first/last,
    else wbits."""
    override = _override(config, layers[index])
    if override is not None:
        return override
    if config.first_last_wbits is not None and index in (0, len(layers) - 1):
        return config.first_last_wbits
    return config.wbits


def _quantize_input(model, streams: NetworkStreams, index: int, config: QuantConfig) -> tuple[ActivationQuant, float]:
    """Choose the layer input's scale on the quantized stream's values and fake-quantize them there,
    so every later layer sees what the deployed model computes.

    Returns:
        (the quantizer, its relative error on the values the scale was chosen on).
    """
    name = streams.layers[index].input_name
    x_tilde, _ = streams.layer_inputs(index)
    values = sample_values(x_tilde)
    signed, zero_point = not is_non_negative(model, name), 0
    if signed and config.asymmetric_activations:
        signed = False
        scale, zero_point = mse_affine(values, config.abits)
    else:
        scale = mse_scale(values, config.abits, signed)
    streams.replace_quantized(name, [fake_quant(b, scale, config.abits, signed, zero_point) for b in x_tilde])
    residual = values - fake_quant(values, scale, config.abits, signed, zero_point)
    return ActivationQuant(name, scale, signed, zero_point), float(residual @ residual / max(values @ values, 1e-30))


def _sensitivities(model, layers: list[LayerSpec], batches, weights: dict, config: QuantConfig) -> list[dict]:
    """Each layer's relative output error at each bit width of BUDGET_BITS, solved on float
    inputs (one float pass, a few iterations per solve); none for layers whose bits layer_wbits fixes."""
    streams = NetworkStreams(model, layers, batches, compensate=False)
    errors = []
    for index, layer in enumerate(layers):
        if _override(config, layer) is not None:
            errors.append({})
        else:
            solver = _accumulate(layer, streams, index, weights[layer.weight_name], blend=1.0)
            errors.append({bits: solver.solve(bits, iterations=SENSITIVITY_ITERATIONS, damping=config.damping).rel_error
                           for bits in BUDGET_BITS})
        params = {name: weights[name] for name in (layer.weight_name, layer.bias_name) if name}
        if index + 1 < len(layers):
            streams.advance(index, float_params=params, quant_params=params)
    return errors


def _budget_bits(model: onnx.ModelProto, prepared: onnx.ModelProto, layers: list[LayerSpec], weights: dict,
                 sensitivity: list[dict], config: QuantConfig) -> tuple[list[int], list[str]]:
    """Bits per layer so the output is within config.size_budget of the float model's size;
    layer_wbits overrides stay fixed. Everything but the weight storage is measured exactly by
    writing the model once with placeholder 4-bit weights."""
    costs, placeholders = [], []
    for index, layer in enumerate(layers):
        count, rows = weights[layer.weight_name].size, layer.weight_shape[layer.axis]
        override = _override(config, layer)
        costs.append(LayerCost(layer.name, count, rows, sensitivity[index] if override is None else {override: 0.0}))
        bias = weights[layer.bias_name] if layer.bias_name else None
        placeholders.append(WeightQuant(layer, 4, np.zeros(layer.weight_shape, np.int8), np.ones(rows, np.float32), bias))
    activations = [ActivationQuant(name, 1.0, True) for name in dict.fromkeys(layer.input_name for layer in layers)]
    overhead = write_qdq(prepared, placeholders, activations).ByteSize() - sum(
        storage_bytes(cost.weights, cost.rows, 4) for cost in costs)
    try:
        return allocate_bits(costs, int(config.size_budget * model.ByteSize()) - overhead)
    except ValueError as exc:
        raise BitsplitError(f"size budget {config.size_budget}: {exc}") from None


def _override(config: QuantConfig, layer: LayerSpec) -> int | None:
    """layer_wbits for this layer: its exact name, else the first matching pattern or '@depthwise'."""
    if layer.name in config.layer_wbits:
        return config.layer_wbits[layer.name]
    for pattern, bits in config.layer_wbits.items():
        if fnmatch.fnmatchcase(layer.name, pattern) or pattern == DEPTHWISE and layer.is_depthwise:
            return bits
    return None


def _accumulate(layer: LayerSpec, streams: NetworkStreams, index: int, W: np.ndarray,
                blend: float) -> BitSplitSolver:
    """A solver holding the layer's statistics over all calibration batches; X~ is the quantized
    stream's input, blended with the float one by `blend`."""
    solver = BitSplitSolver(layer.weight_matrix(W))
    x_tilde, x = streams.layer_inputs(index)
    compensate = x_tilde is not x
    for xt_batch, x_batch in zip(x_tilde, x):
        for rows in _row_chunks(xt_batch, layer):
            xt_rows, x_rows = xt_batch[rows], x_batch[rows]
            if compensate and blend < 1:
                xt_rows = blend * xt_rows + (1 - blend) * x_rows
            solver.add_batch(layer.patches(xt_rows), layer.patches(x_rows) if compensate else None)
    return solver


def _layer_quant(layer: LayerSpec, solution: LayerSolution, weights: dict, bits: int, config: QuantConfig):
    """The layer's QDQ plan entry and its parameters in the float and the quantized network."""
    float_params = {layer.weight_name: weights[layer.weight_name]}
    quant_params = {layer.weight_name: layer.stored_weight(solution.dequantized())}
    bias = None
    if layer.bias_name:
        bias = weights[layer.bias_name]
        float_params[layer.bias_name] = bias
        if config.bias_correction:
            bias = (bias + layer.bias_gain * solution.bias_shift.reshape(-1)).astype(np.float32)
        quant_params[layer.bias_name] = bias
    weight_quant = WeightQuant(layer, bits, layer.stored_weight(solution.q), solution.alpha.reshape(-1), bias)
    return weight_quant, float_params, quant_params


def _row_chunks(batch: np.ndarray, layer: LayerSpec) -> list[slice]:
    """Slices of the batch's samples whose patches fit in PATCH_ELEMENTS."""
    per_sample = batch[0].size
    if layer.geometry:
        kh, kw = layer.geometry.kernel
        sh, sw = layer.geometry.strides
        per_sample = per_sample * kh * kw // (sh * sw) + 1
    rows = max(1, PATCH_ELEMENTS // per_sample)
    return [slice(i, i + rows) for i in range(0, batch.shape[0], rows)]


@contextmanager
def _phase(report: Report, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        report.phase_seconds[name] = report.phase_seconds.get(name, 0.0) + time.perf_counter() - start
