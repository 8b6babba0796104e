"""Per-tensor activation quantizers: the MSE-optimal alternating iteration, and the choice of a
tensor's quantizer from samples of its values (numpy only).

Every quantizer is unsigned (qdq_format): non-negative tensors get zero point 0 and an MSE-optimal
scale, signed ones an MSE-optimal range with a zero point, graph outputs their whole calibration
range, operators with a bounded output (Sigmoid, Tanh...) exactly that range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelError
from .qdq_format import ActivationQuant, fake_quant, quant_range, round_to_grid

if TYPE_CHECKING:
    from .layout import TensorQuant

MAX_SAMPLES = 1 << 18  # values a scale is searched on (sample_values)
GRID_POINTS = 21  # starting scales tried by mse_scale ...
GRID_SAMPLES = 1 << 16  # ... each on this many of the values
AFFINE_GRID_POINTS = 9  # shrinks of each end of [min, max] tried by mse_affine
MIN_RANGE = 1e-4  # the narrowest float range of an activation quantizer: QNN refuses narrower ones
# A value this far below a tensor's maximum, on the way into a Softmax, is an attention mask's
# "minus infinity" (finfo.min, -1e4, -inf): exp() of it is 0 whatever the row. The Softmax input's
# quantizer puts its bottom SOFTMAX_SPAN below every other value: a masked position saturated
# there weighs at most exp(-16) = 1e-7 of its row's largest, below half a step of a 16-bit
# probability. The mask added into that input keeps its "minus infinity" as -MASK_DEPTH (not
# -3.4e38: integer kernels requantize by the ratio of the scales), deep enough for the sum to
# fall below the input's bottom and saturate there.
MASK_GAP = 1000.0
MASK_DEPTH = 2 * MASK_GAP
SOFTMAX_SPAN = 16.0


def choose_quantizer(decision: TensorQuant, samples: list[np.ndarray], bits: int) -> tuple[ActivationQuant, float]:
    """The per-tensor quantizer of a tensor, by the MSE criterion on samples of its values
    (sample_values, taken batch by batch as the streams run; their extremes included).

    Args:
        bits: the activation width asked for; the decision's min_bits may widen it.

    Returns:
        (the quantizer, its relative error ||x - Q(x)||² / ||x||² on the values it was chosen on).
    """
    bits = max(bits, decision.min_bits)
    values = np.concatenate([sample.ravel() for sample in samples])
    masked = None
    if (decision.softmax_input or decision.mask_operand) and not np.isnan(values).any():
        values, masked = _unmasked(values)
    if not np.isfinite(values).all():
        raise ModelError(f"tensor '{decision.name}' has NaN or infinite values on the calibration data")
    levels = quant_range(bits, signed=False)[1]
    zero_point = 0
    if masked is not None:  # the bottom below every other value: where the masked positions saturate
        depth = SOFTMAX_SPAN if decision.softmax_input else MASK_DEPTH
        scale, zero_point = mse_affine(values, bits)
        top = (levels - zero_point) * scale
        bottom = min(-zero_point * scale, float(values.min()) - depth)
        scale = (top - bottom) / levels
        zero_point = int(np.clip(round(-bottom / scale), 0, levels))
        values = np.concatenate([values, np.full(masked.size, bottom, values.dtype)])  # as they come out
    elif decision.fixed_range is not None:
        low, high = decision.fixed_range
        scale = (high - low) / (levels + 1)  # 1/256 for [0, 1], as QNN and onnxruntime's quantizer
        zero_point = round(-low / scale)
    elif decision.full_range:
        scale, zero_point = minmax_affine(values, bits)
    elif decision.signed:
        scale, zero_point = mse_affine(values, bits)
    else:
        scale = mse_scale(values, bits, signed=False)
        if decision.upper_bound is not None:  # saturate where the Clip does
            scale = min(scale, decision.upper_bound / levels)
    if scale * levels < MIN_RANGE:  # a constant or all-zero tensor
        scale = MIN_RANGE / levels
    quantizer = ActivationQuant(decision.name, scale, zero_point, bits)
    values = values.astype(np.float64)  # squares of float32 values beyond 1e19 overflow it
    residual = values - fake_quant(values, quantizer)
    return quantizer, float(residual @ residual / max(values @ values, 1e-30))


def _unmasked(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(the values that are not an attention mask's "minus infinity", those that are or None)."""
    masked = values < values[np.isfinite(values)].max(initial=0.0) - MASK_GAP
    if not masked.any():
        return values, None
    return values[~masked], values[masked]


def sample_values(batches: list[np.ndarray], limit: int = MAX_SAMPLES,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """At most `limit` values drawn evenly from all batches (seeded), plus each batch's extremes."""
    per_batch = max(1, limit // len(batches))
    rng = rng or np.random.default_rng(0)
    parts = []
    for batch in batches:
        flat = batch.ravel()
        picked = flat if flat.size <= per_batch else flat[rng.integers(0, flat.size, per_batch)]
        parts += [picked, np.array([flat.min(), flat.max()], flat.dtype)]
    return np.concatenate(parts)


def mse_scale(values: np.ndarray, bits: int, signed: bool, iterations: int = 30) -> float:
    """The scale s minimising ||x - s·clip(round(x/s))||² over the tensor's values.

    The alternating iteration q = clip(round(x/s)), s = <x,q>/<q,q> lowers the error at every
    step but stops in the first local minimum below its start; so it starts from the best of a
    geometric grid of clipping levels between max|x| and max|x|/32 rather than from max|x| alone.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    low, high = quant_range(bits, signed)
    peak = np.abs(x).max() if signed else max(x.max(), 0.0)
    if peak == 0:
        return 1.0
    grid = peak / high * 2.0 ** -np.linspace(0.0, 5.0, GRID_POINTS)
    coarse = x[:: max(1, x.size // GRID_SAMPLES)]
    scale = min(grid, key=lambda s: _error(coarse, s, low, high))
    return _refined_scale(x, scale, 0, low, high, iterations)


def mse_affine(values: np.ndarray, bits: int, iterations: int = 30) -> tuple[float, int]:
    """(scale, zero_point) of the uint8 affine quantizer minimising the MSE over the values.

    The clipping range [lo, hi] (containing 0) is the best of a grid of shrinks of [min, max],
    each end on its own; then the scale is refined by the alternating iteration at that zero point.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    low, high = quant_range(bits, signed=False)
    bottom, top = min(x.min(), 0.0), max(x.max(), 0.0)
    if top == bottom:
        return 1.0, 0
    coarse = x[:: max(1, x.size // GRID_SAMPLES)]
    shrinks = 2.0 ** -np.linspace(0.0, 4.0, AFFINE_GRID_POINTS)
    candidates = [((top * b - bottom * a) / high, int(np.clip(np.rint(-bottom * a / ((top * b - bottom * a) / high)), low, high)))
                  for a in shrinks for b in shrinks]
    scale, zero_point = min(candidates, key=lambda c: _error(coarse, c[0], low, high, c[1]))
    return _refined_scale(x, scale, zero_point, low, high, iterations), zero_point


def minmax_affine(values: np.ndarray, bits: int) -> tuple[float, int]:
    """(scale, zero_point) of the unsigned quantizer spanning [min(x, 0), max(x, 0)]: nothing is clipped."""
    low, high = quant_range(bits, signed=False)
    bottom, top = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if top == bottom:
        return 1.0, 0
    scale = (top - bottom) / high
    return scale, int(np.clip(round(-bottom / scale), low, high))


def _refined_scale(x: np.ndarray, scale: float, zero_point: int, low: int, high: int, iterations: int) -> float:
    """The alternating iteration q = clip(round(x/s) + z) - z, s = <x,q>/<q,q> from `scale`: each
    step lowers the error, until the scale moves by less than 1e-7 of itself."""
    for _ in range(iterations):
        q = round_to_grid(x, scale, zero_point, low, high) - zero_point
        qq = q @ q
        new_scale = (x @ q) / qq if qq > 0 else scale
        if abs(new_scale - scale) <= 1e-7 * scale:
            break
        scale = new_scale
    return float(scale)


def _error(x: np.ndarray, scale: float, low: int, high: int, zero_point: int = 0) -> float:
    residual = x - (round_to_grid(x, scale, zero_point, low, high) - zero_point) * scale
    return float(residual @ residual)
