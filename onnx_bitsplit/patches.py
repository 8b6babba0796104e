"""Layer inputs -> patch matrices (numpy only), one row per output position.

Patches have shape (g, P, N): a row holds exactly the inputs one output value is computed from, in
the order of the flattened weight row, so that the layer output is patches @ Wᵀ per group; the
rows of all samples of a batch are stacked. Statistics use a sample of the rows, so patches are
gathered for given rows rather than built for all of them.
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

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        top, left, bottom, right = self.resolved_pads(height, width)
        return tuple((size + pad - (k - 1) * d - 1) // s + 1 for size, pad, k, d, s in zip(
            (height, width), (top + bottom, left + right), self.kernel, self.dilations, self.strides))

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


def conv_patches(x: np.ndarray, geometry: ConvGeometry, rows: np.ndarray | None = None,
                 pad_value: float = 0) -> np.ndarray:
    """NCHW input (B, C, H, W) -> patches (g, R, C/g*kh*kw) of a 2-D Conv, for the output
    positions `rows` (sorted flat indices into (B, Ho, Wo), see conv_positions), or all of them;
    taps in the padding read `pad_value` (the zero point, for a tensor stored as integers).

    The result is a transposed view of a contiguous (g, N, R) array, so that a Gram matrix is one
    BLAS product per group. It is gathered for all rows at once: a sparse sample of rows straight
    from x one kernel tap at a time (R·N values read, whatever the image size and however x is
    stored), many rows from a channel-major padded copy of the samples they fall in.
    """
    batch, channels, height, width = x.shape
    top, left, bottom, right = geometry.resolved_pads(height, width)
    out_h, out_w = geometry.output_size(height, width)
    positions = batch * out_h * out_w
    rows = np.arange(positions) if rows is None else np.asarray(rows)
    b, position = np.divmod(rows, out_h * out_w)
    oy, ox = np.divmod(position, out_w)
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    if 4 * len(rows) < positions:
        columns = np.empty((channels, kh * kw, len(rows)), x.dtype)
        # x as (C, B·C·H·W - (C-1)·H·W): channel c's value k is x.flat[c·H·W + k], so a tap of all
        # channels is one fancy index on the second axis, without a (C, R) index array
        flat = x.reshape(-1)
        by_channel = np.lib.stride_tricks.as_strided(
            flat, (channels, flat.size - (channels - 1) * height * width),
            (height * width * flat.itemsize, flat.itemsize), writeable=False)
        for i in range(kh):
            y = oy * sh + i * dh - top
            for j in range(kw):
                x_pos = ox * sw + j * dw - left
                inside = (y >= 0) & (y < height) & (x_pos >= 0) & (x_pos < width)
                tap = by_channel[:, (b * channels * height + np.clip(y, 0, height - 1)) * width
                                 + np.clip(x_pos, 0, width - 1)]
                tap[:, ~inside] = pad_value
                columns[:, i * kw + j] = tap
    else:
        first = b[0] if len(rows) else 0
        x, b = x[first:b[-1] + 1 if len(rows) else 0], b - first
        padded_h, padded_w = height + top + bottom, width + left + right
        if len(x) == 1 and padded_h * padded_w == height * width:  # already channel-major: no copy
            padded = x.reshape(channels, -1)
        else:
            padded = np.full((channels, len(x), padded_h, padded_w), pad_value, x.dtype)
            padded[:, :, top:top + height, left:left + width] = x.transpose(1, 0, 2, 3)
            padded = padded.reshape(channels, -1)
        taps = ((b * padded_h + oy * sh)[None, None] + (np.arange(kh) * dh)[:, None, None]) * padded_w \
            + (ox * sw)[None, None] + (np.arange(kw) * dw)[None, :, None]  # (kh, kw, R)
        columns = np.take(padded, taps.reshape(kh * kw, -1), axis=1)  # (C, kh·kw, R), contiguous
    return columns.reshape(geometry.groups, channels // geometry.groups * kh * kw, len(rows)).swapaxes(-1, -2)


def conv_positions(shape: tuple[int, ...], geometry: ConvGeometry) -> int:
    """Output positions (patch rows) of a Conv on an input of `shape` (B, C, H, W)."""
    out_h, out_w = geometry.output_size(*shape[2:])
    return shape[0] * out_h * out_w


def dense_patches(x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Gemm/MatMul input (..., K) -> patches (1, R, K): every leading index is one output row;
    `rows` selects some of them (flat indices), or all."""
    flat = x.reshape(-1, x.shape[-1])
    return (flat if rows is None else flat[rows])[None]
