"""A solved layer as the file stores it: integers and a scale per output channel, and its bias as
INT32 on the accumulator's grid, input scale x weight scale, which is how integer kernels add it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelError
from .graph import LayerSpec
from .qdq_format import quantize_linear
from .solver import LayerSolution

INT32_BIAS_LIMIT = 2**31 - 2**10  # largest |bias| in units of its grid, with room for float32 rounding


@dataclass(frozen=True)
class WeightQuant:
    """A solved layer: integers in the stored weight's layout, scales along layer.axis, and its
    bias as integers on the grid of input scale x weight scale (None without a bias)."""

    layer: LayerSpec
    bits: int
    q: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None
    bias_scale: np.ndarray | None = None

    def simulated(self) -> dict[str, np.ndarray]:
        """The layer's weight (and bias) by initializer name, as the written model computes with them."""
        layer = self.layer
        matrix = layer.weight_matrix(self.q)  # (g, M/g, N)
        scale = self.scale.reshape(matrix.shape[:2])[..., None]
        params = {layer.weight_name: layer.stored_weight((scale * matrix).astype(np.float32))}
        if self.bias is not None:
            params[layer.bias_name] = (self.bias * self.bias_scale).astype(np.float32)
        return params


def weight_quant(layer: LayerSpec, solution: LayerSolution, bits: int, *, float_bias: np.ndarray | None,
                 bias_correction: bool, input_scale: float) -> WeightQuant:
    """The stored form of a solved layer whose input quantizer has `input_scale`.

    Args:
        float_bias: the layer's float bias (None without one); with bias_correction it is shifted
            by the solve's mean output error first.
    """
    q, alpha = solution.q.reshape(-1, solution.q.shape[-1]), solution.alpha.reshape(-1)
    if not np.isfinite(alpha).all():
        raise ModelError(f"layer '{layer.name}': the solve gave a scale that is not finite")
    bias = bias_scale = None
    if float_bias is not None:
        if bias_correction:
            float_bias = float_bias + solution.bias_shift.reshape(-1)
        if not np.isfinite(float_bias).all():
            raise ModelError(f"layer '{layer.name}': its corrected bias is not finite")
        q, alpha = fit_int32_bias(q, alpha, float_bias, input_scale)
        bias_scale = (np.float32(input_scale) * alpha).astype(np.float32)
        bias = quantize_linear(float_bias, bias_scale, 0, np.int32)
    return WeightQuant(layer, bits, layer.stored_weight(q.reshape(solution.q.shape)), alpha, bias, bias_scale)


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
