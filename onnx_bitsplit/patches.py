"""Layer inputs -> patch matrices (numpy only), one row per output position.

Patches have shape (g, P, N): a row holds exactly the inputs one output value is computed from, in
the order of the flattened weight row, so that the layer output is patches @ Wᵀ per group; the
rows of all samples of a batch are stacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """Conv attributes with pads resolved (auto_pad applied per call).

    Attributes:
        kernel: (kh, kw).
        strides, dilations: (sh, sw), (dh, dw).
        pads: (top, left, bottom, right), or None when auto_pad decides them.
        auto_pad: NOTSET, SAME_UPPER, SAME_LOWER or VALID.
        groups: the Conv's group attribute.
    """

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] | None = (0, 0, 0, 0)
    auto_pad: str = "NOTSET"
    groups: int = 1

    def is_pointwise(self, height: int, width: int) -> bool:
        """A 1x1, stride-1, unpadded Conv: each output position reads one input position."""
        return (self.kernel == (1, 1) and self.strides == (1, 1)
                and self.resolved_pads(height, width) == (0, 0, 0, 0))

    def resolved_pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        if self.auto_pad in ("NOTSET", "VALID"):
            return self.pads if self.auto_pad == "NOTSET" else (0, 0, 0, 0)
        begins, ends = [], []
        for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if self.auto_pad == "SAME_UPPER" else large)
            ends.append(large if self.auto_pad == "SAME_UPPER" else small)
        return begins[0], begins[1], ends[0], ends[1]


def conv_patches(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """NCHW input (B, C, H, W) -> patches (g, B*Ho*Wo, C/g*kh*kw) for a 2-D Conv, rows sample-major.

    The result is a transposed view of a contiguous (g, N, B*Ho*Wo) array, so that a Gram matrix
    is one BLAS product per group over all samples at once (per-sample products are 2-3x slower
    for the short rows of late layers). It is built one kernel tap at a time with plain strided
    copies from a channel-major padded copy of x.
    """
    batch, channels, height, width = x.shape
    g = geometry.groups
    top, left, bottom, right = geometry.resolved_pads(height, width)
    padded = np.zeros((channels, batch, height + top + bottom, width + left + right), x.dtype)
    padded[:, :, top:top + height, left:left + width] = x.transpose(1, 0, 2, 3)
    if geometry.is_pointwise(height, width):
        return padded.reshape(g, channels // g, -1).swapaxes(-1, -2)
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    out_h = (padded.shape[2] - (kh - 1) * dh - 1) // sh + 1
    out_w = (padded.shape[3] - (kw - 1) * dw - 1) // sw + 1
    columns = np.empty((channels, kh, kw, batch, out_h, out_w), x.dtype)
    for i in range(kh):
        for j in range(kw):
            columns[:, i, j] = padded[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh,
                                      j * dw: j * dw + sw * (out_w - 1) + 1: sw]
    return columns.reshape(g, channels // g * kh * kw, -1).swapaxes(-1, -2)


def dense_patches(x: np.ndarray) -> np.ndarray:
    """Gemm/MatMul input (..., K) -> patches (1, P, K): every leading index is one output row."""
    return x.reshape(1, -1, x.shape[-1])
