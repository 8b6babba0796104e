"""Per-tensor activation scales: the MSE-optimal alternating iteration (numpy only)."""

from __future__ import annotations

import numpy as np

MAX_SAMPLES = 1 << 18  # values a scale is searched on (sample_values)
GRID_POINTS = 21  # starting scales tried by mse_scale ...
GRID_SAMPLES = 1 << 16  # ... each on this many of the values


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of QuantizeLinear with zero point 0: int8 [-128, 127], uint8 [0, 255]."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def fake_quant(x: np.ndarray, scale: float, bits: int, signed: bool) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) with zero point 0; rounding half to even, as ONNX."""
    low, high = quant_range(bits, signed)
    return (np.clip(np.rint(x / np.float32(scale)), low, high) * np.float32(scale)).astype(np.float32)


def sample_values(batches: list[np.ndarray], limit: int = MAX_SAMPLES) -> np.ndarray:
    """At most `limit` values drawn evenly from all batches (seeded), plus each batch's extremes."""
    per_batch = max(1, limit // len(batches))
    rng = np.random.default_rng(0)
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
    for _ in range(iterations):
        q = np.clip(np.rint(x / scale), low, high)
        qq = q @ q
        new_scale = (x @ q) / qq if qq > 0 else scale
        if abs(new_scale - scale) <= 1e-7 * scale:
            break
        scale = new_scale
    return float(scale)


def _error(x: np.ndarray, scale: float, low: int, high: int) -> float:
    residual = x - np.clip(np.rint(x / scale), low, high) * scale
    return float(residual @ residual)
