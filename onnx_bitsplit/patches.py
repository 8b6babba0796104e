"""Layer inputs -> patch matrices (numpy only), one row per output position.

A patch row holds exactly the inputs one output value is computed from, in the order of the
flattened weight row, so that the layer output is patches @ Wᵀ per group.
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
    """NCHW input (B, C, H, W) -> patches (g, B*Ho*Wo, C/g*kh*kw) for a 2-D Conv."""
    batch, channels, height, width = x.shape
    top, left, bottom, right = geometry.resolved_pads(height, width)
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    windows = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # (B, C, Ho, Wo, kh, kw)
    g = geometry.groups
    _, _, out_h, out_w, _, _ = windows.shape
    windows = windows.reshape(batch, g, channels // g, out_h, out_w, kh, kw)
    patches = windows.transpose(1, 0, 3, 4, 2, 5, 6)
    return np.ascontiguousarray(patches).reshape(g, batch * out_h * out_w, channels // g * kh * kw)


def dense_patches(x: np.ndarray) -> np.ndarray:
    """Gemm/MatMul input (..., K) -> patches (1, P, K): every leading index is one output row."""
    return x.reshape(1, -1, x.shape[-1])
