"""A layer's statistics: its patch rows from the two streams, sampled and folded into a solver.

Each layer's Gram matrices are estimated from a seeded uniform sample of its patch rows (output
positions over all calibration batches): config.sample_rows of them, or ROWS_PER_WIDTH per weight
column if that is more. X~ comes from the quantized stream, blended with the float stream's X by
`blend`; patches are linear in the input, so blending the rows blends the inputs.
"""

from __future__ import annotations

import numpy as np

from .capture import Batches, NetworkStreams
from .graph import LayerSpec
from .rows import RowConverter
from .solver import BitSplitSolver

PATCH_ELEMENTS = 1 << 22  # patch values built at once per stream: 16 MiB, small enough that
# malloc reuses the buffer instead of mapping (and page-faulting) fresh memory each time
ROWS_PER_WIDTH = 64  # sampled patch rows per weight column at least (an N x N Gram needs rows >> N)


def layer_statistics(layer: LayerSpec, streams: NetworkStreams, index: int, W: np.ndarray, *, blend: float,
                     sample_rows: int | None, seed: int, convert: RowConverter) -> BitSplitSolver:
    """A solver holding layer `index`'s statistics over (a sample of `sample_rows` of) the patch
    rows of all calibration batches; None samples every row."""
    solver = BitSplitSolver(layer.weight_matrix(W))
    x_tilde, x = streams.layer_inputs(index)
    compensate = x_tilde is not x
    groups, _, width = solver.W.shape
    # each row of a grouped Conv holds all its groups: the same patch values as sample_rows // groups
    # rows of one group (depthwise Grams are small, and their rows cheap to estimate them from)
    limit = None if sample_rows is None else max(sample_rows // groups, ROWS_PER_WIDTH * width)
    chunk = max(1, PATCH_ELEMENTS // (groups * width))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for batch, rows in enumerate(sampled_rows([layer.patch_count(shape) for shape in x.shapes], limit,
                                              seed=[index, seed])):
        xt_batch, x_batch = x_tilde.stored(batch), x.stored(batch)  # converted after gathering
        for start in range(0, len(rows), chunk):
            piece = rows[start:start + chunk]
            pending.append((layer.patches(xt_batch, piece, x_tilde.zero),
                            layer.patches(x_batch, piece, x.zero) if compensate else None))
            if sum(p[0].shape[1] for p in pending) >= chunk:
                _add_rows(solver, pending, x_tilde, blend, convert)
    _add_rows(solver, pending, x_tilde, blend, convert)
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


def _joined(blocks: list[np.ndarray]) -> np.ndarray:
    """Patch blocks joined along their rows, in the contiguous (g, N, R) layout they are views of,
    before their conversion to float32: fewer bytes to move."""
    if len(blocks) == 1:
        return blocks[0]
    return np.concatenate([block.swapaxes(-1, -2) for block in blocks], axis=2).swapaxes(-1, -2)


def _add_rows(solver: BitSplitSolver, pending: list[tuple[np.ndarray, np.ndarray | None]], x_tilde: Batches,
              blend: float, convert: RowConverter) -> None:
    """Fold the pending (X~, X) patch blocks, as stored (X None without error compensation), into
    the solver as one product, and empty the list."""
    if not pending:
        return
    x_rows = None if pending[0][1] is None else _joined([p[1] for p in pending])
    solver.add_batch(*convert(_joined([p[0] for p in pending]), x_tilde.quantizer, x_rows, blend))
    pending.clear()
