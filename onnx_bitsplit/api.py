"""quantize(): the conversion, step by step. No math and no proto surgery here."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx

from .act_scale import fake_quant, minmax_affine, mse_affine, mse_scale, quant_range
from .calibration import as_feeds, batch_feeds, input_shapes, sample_count, single_shape_inputs
from .capture import Batches, NetworkStreams
from .config import QuantConfig, memory_limit
from .equalize import equalize
from .errors import BitsplitError, ModelError
from .graph import LayerSpec, find_layers, prepare
from .layout import ActivationQuant, Layout, TensorQuant, plan_layout
from .modelio import OutputFiles, check_output_paths, load_model, model_files, save_model, weights_path
from .mixed import LayerCost, allocate_bits, storage_bytes
from .providers import make_session
from .qdq import WeightQuant, carry_metadata, write_qdq
from .report import LayerReport, Report, printable
from .rows import RowConverter
from .selection import check_overrides, exclude_layers, layer_bits, override
from .solver import BitSplitSolver, LayerSolution
from .store import BatchStore, peak_rss

PATCH_ELEMENTS = 1 << 22  # patch values built at once per stream: 16 MiB, small enough that
# malloc reuses the buffer instead of mapping (and page-faulting) fresh memory each time
ROWS_PER_WIDTH = 64  # sampled patch rows per weight column at least (an N x N Gram needs rows >> N)

Progress = Callable[[str, int, int, str], None]
BUDGET_BITS = (4, 8)  # INT4 holds 2 to 4 bits at one cost, INT8 5 to 8: a byte budget picks from these
SENSITIVITY_ITERATIONS = 3
INT32_BIAS_LIMIT = 2**31 - 2**10  # largest |bias| in units of its grid, with room for float32 rounding
MIN_RANGE = 1e-4  # the narrowest float range of an activation quantizer


def quantize(model: onnx.ModelProto | str | os.PathLike, calibration, config: QuantConfig | None = None, *,
             progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """Quantize a float model to QDQ with Bit-Split and Stitching.

    Args:
        model: the float model, or its path (external data beside it is read, confined to its
            folder); it is not modified.
        calibration: an onnxruntime CalibrationDataReader or any iterable of {input_name: ndarray}.
        config: options. Defaults to QuantConfig() (W4A8, first and last layer W8).
        progress: called as progress(phase, done, total, layer_name) after each layer of a
            phase ("sensitivity" with a size budget, then "layers"); done and total count work
            (multiply-accumulates of the layers), so a rate gives a true time estimate.

    Returns:
        (the quantized model, the Report of what was done).
    """
    config = config or QuantConfig()
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model, max_bytes=memory_limit(config.max_memory))
    report = Report(activation_bits=config.abits, options=asdict(config))
    phase = _Clock(report.phase_seconds)
    with phase("prepare"):
        prepared = prepare(model, config.input_shapes, max_bytes=memory_limit(config.max_memory))
        layers, report.skipped = find_layers(prepared)
        if not layers:
            raise ModelError("the model has no Conv, Gemm or MatMul with a constant weight to quantize")
        layers, excluded = exclude_layers(layers, config.exclude)
        check_overrides(config, layers)
        report.skipped += excluded
        if not layers:
            raise BitsplitError("--exclude leaves no layer to quantize")
    # the streams' tensors within a quarter of the budget; the rest is for onnxruntime's runs,
    # the model and the statistics (README, Scaling: peak memory against the budget). Freed
    # memory is kept for reuse while the process holds less than half of it.
    budget = memory_limit(config.max_memory)
    with closing(BatchStore(budget // 4, config.work_dir, trim_above=budget // 2)) as store:
        with phase("calibration"):
            shapes, batches = input_shapes(prepared), []
            fed = {name: set() for name in shapes}
            for batch in batch_feeds(as_feeds(calibration), shapes, batch_size=config.batch_size,
                                     count=config.calib_count, join_fixed=True):
                for name, value in batch.items():
                    fed[name].add(value.shape[1:])
                batches.append({name: store.put(value) for name, value in batch.items()})
            report.calibration_samples = sample_count(batches)
            report.warnings += [
                f"input '{printable(name)}' has a dynamic size and was calibrated at one only "
                f"({'x'.join(map(str, shape))}): activation ranges at other sizes are not covered; "
                "calibrate at the sizes it will run at (--input-size, repeatable) or fix it (--input-shape)"
                for name, shape in single_shape_inputs(shapes, fed).items()]
        if config.equalization:
            with phase("equalization"):
                prepared, report.equalized = equalize(prepared, {layer.name for layer in layers}, [
                    {name: store.get(item) for name, item in batch.items()} for batch in batches])
                names = {layer.name for layer in layers}
                layers = [layer for layer in find_layers(prepared)[0] if layer.name in names]
        layout = plan_layout(prepared, layers)
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in prepared.graph.initializer}
        bits = [layer_bits(config, layers, index) for index in range(len(layers))]
        if config.size_budget is not None:
            with phase("sensitivity"):
                sensitivity = _sensitivities(prepared, layers, batches, store, weights, config,
                                             _reporter(progress, "sensitivity", prepared, layers))
                bits, reasons = _budget_bits(model, prepared, layout, layers, weights, sensitivity, config)

        def choose(decision: TensorQuant, values: list[np.ndarray]) -> ActivationQuant:
            with phase("activation_scales"):
                quantizer, report.activations[decision.name] = choose_quantizer(decision, values, config)
            return quantizer

        with phase("capture"):
            streams = NetworkStreams(prepared, layers, batches, store, layout=layout, choose=choose,
                                     compensate=config.error_compensation, seed=config.seed)
        solved = _solve_layers(streams, weights, bits, config, report, phase, _reporter(progress, "layers", prepared, layers))
        if config.size_budget is not None:
            report.layers = [replace(layer, sensitivity=errors, reason=reason)
                             for layer, errors, reason in zip(report.layers, sensitivity, reasons)]
        with phase("write"):
            quantized = write_qdq(prepared, layout, solved, streams.quantizers, weight_storage=config.weight_storage)
            carry_metadata(model, quantized, keep_output_types=not config.input_shapes, stamp={
                "method": "Bit-Split and Stitching (Wang et al., ICML 2020)",
                "layer_bits": json.dumps({layer.name: layer.bits for layer in report.layers}),
                "calibration_samples": str(report.calibration_samples),
                "options": json.dumps({key: value for key, value in asdict(config).items()
                                       if key != "work_dir"}, sort_keys=True)})  # no local paths in a shipped file
            try:  # the promise is a model onnxruntime runs: keep it even for odd inputs
                make_session(quantized)
            except Exception as exc:
                raise ModelError(f"the quantized model does not load in onnxruntime: {str(exc).strip()[:300]}") from None
        report.spilled_bytes = store.spilled_bytes
    report.float_bytes, report.quant_bytes = model.ByteSize(), quantized.ByteSize()
    report.peak_rss_bytes = peak_rss()
    return quantized, report


def quantize_file(input_path: str | os.PathLike, output_path: str | os.PathLike, calibration,
                  config: QuantConfig | None = None, *, report_path: str | os.PathLike | None = None,
                  external_data: bool | None = None, calibration_files: list[Path] = (),
                  progress: Progress | None = None) -> Report:
    """quantize() from file to file, with the command's guarantees (README, Guarantees): every
    output path is checked against the files read (the model, its external data,
    `calibration_files`) and each other before any work; the model's external data must stay in
    its folder; the outputs (model, weights file, JSON report) are written as one transaction.

    Args:
        calibration: as for quantize(), or a function of the loaded model that returns it (when
            the data depend on the model, e.g. its input size).
        report_path: where to write the JSON report; None writes none.
        external_data: store the weights in `<output>.data`; None decides by size (2 GiB).

    Returns:
        The Report, with the sizes of the files and their paths (Report.files).
    """
    config = config or QuantConfig()
    input_path, output_path = Path(input_path), Path(output_path)
    if config.work_dir is None:  # spilled tensors beside the output: the disk it is written to
        config = replace(config, work_dir=str(output_path.parent))
    report_path = Path(report_path) if report_path is not None else None
    if not input_path.is_file():
        raise ModelError(f"input model '{input_path}' does not exist or is not a file")
    inputs = model_files(input_path)
    check_output_paths({"output": output_path, "weights file": weights_path(output_path), "report": report_path},
                       inputs + list(calibration_files))
    float_bytes = sum(path.stat().st_size for path in inputs)
    model = load_model(input_path, max_bytes=memory_limit(config.max_memory))
    if callable(calibration) and not hasattr(calibration, "get_next"):
        calibration = calibration(model)
    quantized, report = quantize(model, calibration, config, progress=progress)
    with OutputFiles() as files:
        data_path = save_model(quantized, output_path, external_data=external_data, files=files)
        report.float_bytes = float_bytes
        report.quant_bytes = files.size(output_path) + (files.size(data_path) if data_path else 0)
        report.files = {"input": str(input_path), "output": str(output_path)}
        report.files.update({"weights": str(data_path)} if data_path else {})
        report.files.update({"report": str(report_path)} if report_path else {})
        if report_path:
            files.write(report_path, report.to_json().encode())
    return report


def _solve_layers(streams: NetworkStreams, weights: dict, bits: list[int], config: QuantConfig,
                  report: Report, phase: "_Clock", progress: Callable[[int], None]) -> list[WeightQuant]:
    """Layer by layer: gather its statistics, solve, advance both streams.

    Returns:
        the WeightQuant of every layer.
    """
    layers = streams.layers
    solved = []
    convert = RowConverter()
    for index, layer in enumerate(layers):
        start = time.perf_counter()
        with phase("statistics"):
            solver = _accumulate(layer, streams, index, weights[layer.weight_name], config.compensation_blend, config,
                                 convert)
        with phase("solve"):
            solution = solver.solve(bits[index], iterations=config.iterations, damping=config.damping)
        input_scale = streams.quantizers[layer.input_name].scale
        weight_quant, float_params, quant_params = _layer_quant(layer, solution, weights, bits[index], config,
                                                                input_scale)
        with phase("capture"):
            streams.advance(index, float_params=float_params, quant_params=quant_params)
        solved.append(weight_quant)
        groups, rows, inputs = solution.q.shape
        report.layers.append(LayerReport(
            layer.name, layer.op, bits[index], (groups * rows, inputs, groups),
            solution.rel_error, solution.rtn_rel_error, time.perf_counter() - start))
        progress(index)
    return solved


def choose_quantizer(decision: TensorQuant, samples: list[np.ndarray], config: QuantConfig) -> tuple[ActivationQuant, float]:
    """The per-tensor quantizer of a tensor, by the MSE criterion on samples of its values
    (act_scale.sample_values, taken batch by batch as the streams run; their extremes included).

    Returns:
        (the quantizer, its relative error ||x - Q(x)||² / ||x||² on the values it was chosen on).
    """
    values = np.concatenate([sample.ravel() for sample in samples])
    if not np.isfinite(values).all():
        raise ModelError(f"tensor '{decision.name}' has NaN or infinite values on the calibration data")
    levels = quant_range(config.abits, signed=False)[1]
    zero_point = 0
    if decision.fixed_range is not None:
        low, high = decision.fixed_range
        scale = (high - low) / (levels + 1)  # 1/256 for [0, 1], as QNN and onnxruntime's quantizer
        zero_point = round(-low / scale)
    elif decision.full_range:
        scale, zero_point = minmax_affine(values, config.abits)
    elif decision.signed:
        scale, zero_point = mse_affine(values, config.abits)
    else:
        scale = mse_scale(values, config.abits, signed=False)
        if decision.upper_bound is not None:  # saturate where the Clip does
            scale = min(scale, decision.upper_bound / levels)
    if scale * levels < MIN_RANGE:  # QNN refuses narrower ranges (a constant or all-zero tensor)
        scale = MIN_RANGE / levels
    residual = values - fake_quant(values, scale, config.abits, False, zero_point)
    error = float(residual @ residual / max(values @ values, 1e-30))
    return ActivationQuant(decision.name, scale, zero_point, config.abits), error


def _sensitivities(model, layers: list[LayerSpec], batches, store: BatchStore, weights: dict, config: QuantConfig,
                   progress: Callable[[int], None]) -> list[dict]:
    """Each layer's relative output error at each bit width of BUDGET_BITS, solved on float
    inputs (one float pass, a few iterations per solve); none for layers whose bits layer_wbits fixes."""
    streams = NetworkStreams(model, layers, batches, store, compensate=False, keep_inputs=True, seed=config.seed)
    convert = RowConverter()
    errors = []
    for index, layer in enumerate(layers):
        if override(config, layer) is not None:
            errors.append({})
        else:
            solver = _accumulate(layer, streams, index, weights[layer.weight_name], 1.0, config, convert)
            errors.append({bits: solver.solve(bits, iterations=SENSITIVITY_ITERATIONS, damping=config.damping).rel_error
                           for bits in BUDGET_BITS})
        params = {name: weights[name] for name in (layer.weight_name, layer.bias_name) if name}
        if index + 1 < len(layers):  # nothing after the last layer is measured
            streams.advance(index, float_params=params, quant_params=params)
        progress(index)
    return errors


def _reporter(progress: Progress | None, phase: str, model: onnx.ModelProto, layers: list[LayerSpec]):
    """progress(index) after layer `index`, reported as work done: each layer weighs its
    multiply-accumulates per sample (weights x output positions; 1 position where unknown)."""
    if progress is None:
        return lambda index: None
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.value_info}
    outputs = {node.name: node.output[0] for node in model.graph.node}
    work = []
    for layer in layers:
        dims = shapes.get(outputs[layer.name], [])
        positions = int(np.prod([d for d in dims[2:] if d > 0])) if layer.geometry and dims else 1
        work.append(int(np.prod(layer.weight_shape)) * positions)
    done = np.cumsum(work)
    return lambda index: progress(phase, int(done[index]), int(done[-1]), layers[index].name)


def _budget_bits(model: onnx.ModelProto, prepared: onnx.ModelProto, layout: Layout, layers: list[LayerSpec],
                 weights: dict, sensitivity: list[dict], config: QuantConfig) -> tuple[list[int], list[str]]:
    """Bits per layer so the output is within config.size_budget of the float model's size;
    layer_wbits overrides stay fixed. Everything but the weight storage is measured exactly by
    writing the model once with placeholder 4-bit weights."""
    costs, placeholders = [], []
    for index, layer in enumerate(layers):
        count, rows = weights[layer.weight_name].size, layer.weight_shape[layer.axis]
        fixed = override(config, layer)
        costs.append(LayerCost(layer.name, count, rows, sensitivity[index] if fixed is None else {fixed: 0.0}))
        ones = np.ones(rows, np.float32)
        bias = np.zeros(rows, np.int32) if layer.bias_name else None
        placeholders.append(WeightQuant(layer, 4, np.zeros(layer.weight_shape, np.int8), ones, bias, ones))
    quantizers = {name: ActivationQuant(name, 1.0) for name in [*layout.tensors, *layout.constants]}
    overhead = write_qdq(prepared, layout, placeholders, quantizers).ByteSize() - sum(
        storage_bytes(cost.weights, cost.rows, 4) for cost in costs)
    try:
        return allocate_bits(costs, int(config.size_budget * model.ByteSize()) - overhead)
    except ValueError as exc:
        raise BitsplitError(f"size budget {config.size_budget}: {exc}") from None


def _accumulate(layer: LayerSpec, streams: NetworkStreams, index: int, W: np.ndarray,
                blend: float, config: QuantConfig, convert: RowConverter) -> BitSplitSolver:
    """A solver holding the layer's statistics over (a seeded sample of, config.sample_rows) the
    patch rows of all calibration batches; X~ is the quantized stream's input, blended with the
    float one by `blend`."""
    solver = BitSplitSolver(layer.weight_matrix(W))
    x_tilde, x = streams.layer_inputs(index)
    compensate = x_tilde is not x
    groups, _, width = solver.W.shape
    # each row of a grouped Conv holds all its groups: the same patch values as sample_rows // groups
    # rows of one group (depthwise Grams are small, and their rows cheap to estimate them from)
    limit = None if config.sample_rows is None else max(config.sample_rows // groups, ROWS_PER_WIDTH * width)
    chunk = max(1, PATCH_ELEMENTS // (groups * width))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for batch, rows in enumerate(sampled_rows([layer.patch_count(shape) for shape in x.shapes], limit,
                                              seed=[index, config.seed])):
        xt_batch, x_batch = x_tilde.stored(batch), x.stored(batch)  # converted after gathering
        for start in range(0, len(rows), chunk):
            piece = rows[start:start + chunk]
            pending.append((layer.patches(xt_batch, piece, x_tilde.zero),
                            layer.patches(x_batch, piece, x.zero) if compensate else None))
            if sum(p[0].shape[1] for p in pending) >= chunk:
                _add_rows(solver, pending, x_tilde, x, blend, convert)
    _add_rows(solver, pending, x_tilde, x, blend, convert)
    return solver


def sampled_rows(counts: list[int], limit: int | None, seed: int | list[int]) -> list[np.ndarray]:
    """Per batch, the patch rows to use: all of them when the batches hold at most `limit` rows in
    all, else `limit` rows drawn uniformly without replacement over all batches (seeded)."""
    total = sum(counts)
    if limit is None or total <= limit:
        return [np.arange(count) for count in counts]
    chosen = np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    bounds = np.searchsorted(chosen, offsets)
    return [chosen[bounds[i]:bounds[i + 1]] - offsets[i] for i in range(len(counts))]


def _add_rows(solver: BitSplitSolver, pending: list[tuple[np.ndarray, np.ndarray | None]], x_tilde: Batches,
              x: Batches, blend: float, convert: RowConverter) -> None:
    """Fold the pending (X~, X) patch blocks, as stored (X None without error compensation), into
    the solver as one product, and empty the list. X~ is blended with X by `blend` (patches are
    linear in the input: blending the rows blends the inputs)."""
    if not pending:
        return
    def joined(blocks):  # along the rows of the contiguous (g, N, R) arrays the patches are views of,
        if len(blocks) == 1:  # before their conversion to float32: fewer bytes to move
            return blocks[0]
        return np.concatenate([block.swapaxes(-1, -2) for block in blocks], axis=2).swapaxes(-1, -2)

    x_rows = None if pending[0][1] is None else joined([p[1] for p in pending])
    solver.add_batch(*convert(joined([p[0] for p in pending]), x_tilde.quantizer, x_rows, blend))
    pending.clear()


def _layer_quant(layer: LayerSpec, solution: LayerSolution, weights: dict, bits: int, config: QuantConfig,
                 input_scale: float):
    """The layer's QDQ plan entry and its parameters in the float and the quantized network.

    The bias is stored as int32 on the grid of input scale x weight scale, the accumulator's own
    scale, as integer kernels add it."""
    q, alpha = solution.q.reshape(-1, solution.q.shape[-1]), solution.alpha.reshape(-1)
    if not np.isfinite(alpha).all():
        raise ModelError(f"layer '{layer.name}': the solve gave a scale that is not finite")
    float_params = {layer.weight_name: weights[layer.weight_name]}
    bias = bias_scale = float_bias = None
    if layer.bias_name:
        float_bias = float_params[layer.bias_name] = weights[layer.bias_name]
        if config.bias_correction:
            float_bias = float_bias + solution.bias_shift.reshape(-1)
        if not np.isfinite(float_bias).all():
            raise ModelError(f"layer '{layer.name}': its corrected bias is not finite")
        q, alpha = fit_int32_bias(q, alpha, float_bias, input_scale)
        bias_scale = (np.float32(input_scale) * alpha).astype(np.float32)
        bias = np.rint(float_bias / bias_scale).astype(np.int32)
    shape = solution.q.shape
    quant_params = {layer.weight_name: layer.stored_weight((alpha[:, None] * q).astype(np.float32).reshape(shape))}
    if bias is not None:
        quant_params[layer.bias_name] = (bias * bias_scale).astype(np.float32)
    weight_quant = WeightQuant(layer, bits, layer.stored_weight(q.reshape(shape)), alpha, bias, bias_scale)
    return weight_quant, float_params, quant_params


def fit_int32_bias(q: np.ndarray, alpha: np.ndarray, bias: np.ndarray, input_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel integers (M, N) and scales (M,) whose bias grid, input_scale x alpha, holds
    `bias` within int32: a channel whose bias is too large for its grid gets a larger scale and
    its integers are rounded onto it (as onnxruntime's quantizer does), the others are unchanged.
    Narrow activation scales (16 bits) and wide weights (8 bits) make the grid fine enough to
    overflow."""
    needed = np.abs(bias.astype(np.float64)) / (np.float64(input_scale) * INT32_BIAS_LIMIT)
    grow = needed > alpha
    if not grow.any():
        return q, alpha
    q, alpha = q.copy(), alpha.copy()
    q[grow] = np.rint(q[grow] * (alpha[grow] / needed[grow])[:, None])
    alpha[grow] = needed[grow]
    return q.astype(np.int8), alpha.astype(np.float32)


class _Clock:
    """Wall time per phase into `seconds`; a phase entered inside another is not counted twice."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.inner: list[float] = []

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self.inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            own = elapsed - self.inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + own
            if self.inner:
                self.inner[-1] += elapsed
