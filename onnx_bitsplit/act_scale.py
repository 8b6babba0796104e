"""Per-tensor activation quantizers: the MSE-optimal range, searched on a sample of a tensor's
values with each candidate's error summed exactly from sorted prefix sums, and the choice of a
tensor's quantizer from those samples (numpy only).

Every quantizer is unsigned (qdq_format): non-negative tensors get zero point 0 and an MSE-optimal
scale, signed ones an MSE-optimal range with a zero point, graph outputs their whole calibration
range, operators with a bounded output (Sigmoid, Tanh...) exactly that range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelError
from .qdq_format import ActivationQuant, fake_quant, quant_range

if TYPE_CHECKING:
    from .layout import TensorQuant

MAX_SAMPLES = 1 << 16  # values a scale is searched on (sample_values)
SEARCH_OCTAVES = 5.0  # clipping levels tried: from the largest value down to 1/32 of it
SEARCH_POINTS = 41  # ... on a geometric grid (mse_scale), each end on its own for mse_affine:
AFFINE_POINTS = 21
REFINE_POINTS = 9  # then grids this fine around the best, each spanning the previous step twice
REFINEMENTS = 2
EXACT_LEVELS = 1 << 12  # wider quantizers have their rounding noise counted, not summed (_SortedValues)
MIN_RANGE = 1e-4  # the narrowest float range of an activation quantizer: QNN refuses narrower ones
MAX_RANGE = 0.999 * float(np.finfo(np.float32).max)  # the widest: (q - zero point) · scale stays finite
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
        top = (levels - zero_point) * scale if values.max() > values.min() else max(float(values.max()), 0.0)
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
    scale = min(scale, MAX_RANGE / levels)  # finfo.min as a constant: its level must dequantize finite
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


def mse_scale(values: np.ndarray, bits: int, signed: bool) -> float:
    """The scale s minimising ||x - s·clip(round(x/s))||² over the tensor's values: the best of a
    geometric grid of clipping levels between max|x| and max|x|/32, then of finer grids around the
    best (the error is jagged in s: a local search from one start stops in the first dip)."""
    x = _SortedValues(values)
    low, high = quant_range(bits, signed)
    peak = max(-x.lowest, x.highest) if signed else max(x.highest, 0.0)
    if peak == 0:
        return 1.0
    best, step = 1.0, SEARCH_OCTAVES / (SEARCH_POINTS - 1)
    factors = 2.0 ** -np.linspace(0.0, SEARCH_OCTAVES, SEARCH_POINTS)
    for _ in range(REFINEMENTS + 1):
        errors = x.errors(peak * factors / high, np.zeros(factors.size), low, high)
        best = factors[np.argmin(errors)]
        factors = best * 2.0 ** np.linspace(-step, step, REFINE_POINTS)
        step /= (REFINE_POINTS - 1) / 2
    return float(peak * best / high)


def mse_affine(values: np.ndarray, bits: int) -> tuple[float, int]:
    """(scale, zero_point) of the unsigned affine quantizer minimising the MSE over the values.

    The clipping range [lo, hi] (containing 0) is the best of a grid of shrinks of [min, max],
    each end on its own (lo = min·a, hi = max·b), then of finer grids around the best pair.
    """
    x = _SortedValues(values)
    low, high = quant_range(bits, signed=False)
    bottom, top = min(x.lowest, 0.0), max(x.highest, 0.0)
    if top == bottom:
        return 1.0, 0
    shrinks = 2.0 ** -np.linspace(0.0, SEARCH_OCTAVES, AFFINE_POINTS)
    step = SEARCH_OCTAVES / (AFFINE_POINTS - 1)
    a, b = [np.ones(1) if end == 0 else shrinks for end in (bottom, top)]  # a zero end has nothing to shrink
    for _ in range(REFINEMENTS + 1):
        a, b = (grid.ravel() for grid in np.meshgrid(a, b))
        scales, zero_points = _affine(bottom * a, top * b, low, high)
        best = np.argmin(x.errors(scales, zero_points, low, high))
        a, b = [np.ones(1) if end == 0 else factor[best] * 2.0 ** np.linspace(-step, step, REFINE_POINTS)
                for end, factor in ((bottom, a), (top, b))]
        step /= (REFINE_POINTS - 1) / 2
    return float(scales[best]), int(zero_points[best])


def _affine(lowest: np.ndarray, highest: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zero points) of the unsigned quantizers spanning [lowest, highest] (lowest <= 0)."""
    scales = (highest - lowest) / (high - low)
    return scales, np.clip(np.rint(-lowest / scales), low, high)


def minmax_affine(values: np.ndarray, bits: int) -> tuple[float, int]:
    """(scale, zero_point) of the unsigned quantizer spanning [min(x, 0), max(x, 0)]: nothing is clipped."""
    low, high = quant_range(bits, signed=False)
    bottom, top = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if top == bottom:
        return 1.0, 0
    scale = (top - bottom) / high
    return scale, int(np.clip(round(-bottom / scale), low, high))


class _SortedValues:
    """A tensor's values sorted, with prefix sums of x and x²: the squared error of many quantizers
    over all of them at once, each in O(levels · log n).

    A quantizer maps each cell of values between two rounding boundaries to one level v, and a
    cell's error Σ(x - v)² = Σx² - 2vΣx + v²·count comes from the prefix sums. With 16 bits the
    cells are so fine that float64 cannot take those differences: the values inside the range are
    then counted as uniform rounding noise, scale²/12 each (exact to a part in 1e4 at that width),
    and only the clipped ends are summed exactly.
    """

    def __init__(self, values: np.ndarray):
        self.x = np.sort(np.asarray(values, np.float64).ravel())
        self.lowest, self.highest = float(self.x[0]), float(self.x[-1])
        self.sum1 = np.concatenate([[0.0], np.cumsum(self.x)])
        self.sum2 = np.concatenate([[0.0], np.cumsum(self.x * self.x)])

    def errors(self, scales: np.ndarray, zero_points: np.ndarray, low: int, high: int) -> np.ndarray:
        """||x - Q(x)||² for each quantizer (scales[i], zero_points[i]) of codes low..high."""
        scales, zero_points = scales[:, None], zero_points[:, None]
        first, last = np.zeros((scales.size, 1), np.int64), np.full((scales.size, 1), self.x.size)
        if high - low > EXACT_LEVELS:
            ends = (np.array([low, high]) - zero_points) * scales  # the lowest and highest levels
            cuts = np.searchsorted(self.x, ends)
            clipped = self._error(first, cuts[:, :1], ends[:, :1]) + self._error(cuts[:, 1:], last, ends[:, 1:])
            return clipped[:, 0] + (cuts[:, 1] - cuts[:, 0]) * scales[:, 0] ** 2 / 12
        codes = np.arange(low, high + 1)
        cuts = np.searchsorted(self.x, (codes[:-1] + 0.5 - zero_points) * scales)  # the rounding boundaries
        starts, stops = np.concatenate([first, cuts], axis=1), np.concatenate([cuts, last], axis=1)
        return self._error(starts, stops, (codes - zero_points) * scales).sum(axis=1)

    def _error(self, starts: np.ndarray, stops: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Σ(x - level)² over the values of each cell [start, stop) (rounding leaves it >= 0)."""
        count = stops - starts
        sum1, sum2 = self.sum1[stops] - self.sum1[starts], self.sum2[stops] - self.sum2[starts]
        return np.maximum(sum2 - 2 * levels * sum1 + levels * levels * count, 0.0)
