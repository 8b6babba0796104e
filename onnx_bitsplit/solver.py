"""Bit-Split and Stitching (Wang, Chen, He, Cheng, ICML 2020): the per-layer weight solver.

Pure numpy; it knows nothing about ONNX. Every array carries a leading group axis g (one entry per
Conv group, g = 1 for dense layers), so depthwise layers solve all their channels at once.

Symbols, as in the paper:
    W      (g, M, N)        float weights: M outputs, N inputs per group
    X~     (P, N)           layer inputs taken from the partially quantized network
    X      (P, N)           layer inputs taken from the float network; Y = X Wᵀ is the target
    G      (g, N, N)        X~ᵀX~ / P
    C      (g, N, N)        XᵀX~ / P
    E      (g, M)           ||Y_m||² / P, the target's energy per output
    R      (g, M, N)        W C, the cross term of the response loss
    q      (g, M, N)        stitched integers in [-qmax, qmax], qmax = 2^(b-1) - 1
    B      (b-1, g, M, N)   ternary bit planes in {-1, 0, +1}, q = Σ_i 2^i B_i
    alpha  (g, M)           one scale per output channel

The response loss of output row m, divided by P, is
    L_m = ||Y_m||² - 2 alpha_m R_m·q_m + alpha_m² q_m G q_mᵀ,
minimised by alternating the closed-form alpha_m = R_m·q_m / q_m G q_mᵀ with a coordinate-descent
sweep over each bit plane: one column n at a time, the ternary B_i[:, n] that minimises L for all
rows at once. Each step is an exact minimisation over its variables, so L never rises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 64  # columns per blocked update of H = q G (GPTQ's lazy batch update): wide enough for the BLAS to be efficient
ROW_BLOCK = 4096  # patch rows per Gram product: thin blocks (N = 9 for depthwise) stay in cache
CONVERGED = 1e-5  # stop when a sweep lowers the loss by less than this fraction (later ones gain ~1e-5)


@dataclass(frozen=True)
class LayerSolution:
    """The quantized weights of one layer.

    Attributes:
        q: (g, M, N) int8 stitched integers.
        alpha: (g, M) float32 per-channel scales; the quantized weight is alpha[..., None] * q.
        bias_shift: (g, M) float32 mean output error E[Y - X~ Wqᵀ], to add to the bias.
        rel_error: response loss / ||Y||² after the solve.
        rtn_rel_error: the same for round-to-nearest with the initial (FWA) scales.
        loss_history: damped loss after each half-step (scales, then planes), for inspection.
    """

    q: np.ndarray
    alpha: np.ndarray
    bias_shift: np.ndarray
    rel_error: float
    rtn_rel_error: float
    loss_history: tuple[float, ...]

    def dequantized(self) -> np.ndarray:
        """(g, M, N) float32 weights alpha * q."""
        return (self.alpha[..., None] * self.q).astype(np.float32)


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def fwa_init(W: np.ndarray, qmax: int, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scales minimising ||W - alpha q||² by alternation, from alpha = max|W|/qmax.

    Returns (alpha (g, M), q (g, M, N) float64 integers).
    """
    alpha = np.abs(W).max(axis=-1) / qmax
    alpha = np.where(alpha > 0, alpha, 1.0)  # all-zero rows: any scale, q stays 0
    for _ in range(iterations):
        q = np.clip(np.rint(W / alpha[..., None]), -qmax, qmax)
        qq = (q * q).sum(-1)
        alpha = np.where(qq > 0, (W * q).sum(-1) / np.maximum(qq, 1e-30), alpha)
    q = np.clip(np.rint(W / alpha[..., None]), -qmax, qmax)
    return alpha, q


def split(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers (..., N) -> ternary planes (b-1, ..., N); the sign goes into every plane."""
    sign, magnitude = np.sign(q).astype(np.int8), np.abs(q).astype(np.int8)  # |q| <= 127
    shifts = np.arange(bits - 1, dtype=np.int8).reshape(-1, *[1] * q.ndim)
    return (((magnitude >> shifts) & 1) * sign).astype(np.float64)


def stitch(B: np.ndarray) -> np.ndarray:
    """Ternary planes (b-1, ..., N) -> integers Σ_i 2^i B_i."""
    weights = 2.0 ** np.arange(B.shape[0])
    return np.tensordot(weights, B, axes=1)


class BitSplitSolver:
    """Accumulates one layer's statistics batch by batch, then solves its quantized weights.

    Args:
        W: (g, M, N) float weights.
    """

    def __init__(self, W: np.ndarray):
        self.W = np.asarray(W, dtype=np.float64)
        g, M, N = self.W.shape
        self.G = np.zeros((g, N, N))
        self.C = np.zeros((g, N, N))
        self.x_sum = np.zeros((g, N))
        self.x_tilde_sum = np.zeros((g, N))
        self.y_energy = np.zeros((g, M))
        self.count = 0

    def add_batch(self, x_tilde: np.ndarray, x: np.ndarray | None = None) -> None:
        """Fold a batch of patches into the statistics.

        Args:
            x_tilde: (g, P, N) float32 inputs from the partially quantized network.
            x: the same from the float network; None means x = x_tilde (no error compensation).
        """
        x = x_tilde if x is None else x
        gram = _gram(x_tilde, x_tilde)
        self.G += gram
        if x is x_tilde:
            self.C += gram
            self.y_energy += _diagonal_energy(self.W, gram)
        else:
            self.C += _gram(x, x_tilde)
            self.y_energy += self._output_energy(x)
        self.x_sum += x.sum(axis=-2)  # float32 pairwise sums along the rows (contiguous), then float64
        self.x_tilde_sum += x_tilde.sum(axis=-2)
        self.count += x.shape[-2]

    def _output_energy(self, x: np.ndarray) -> np.ndarray:
        """Σ_p Y_pm² for Y = X Wᵀ, by the cheaper route: Y itself when there are fewer outputs
        than inputs (P·N·M), else diag(W XᵀX Wᵀ) (P·N²)."""
        g, M, N = self.W.shape
        if M >= N:
            return _diagonal_energy(self.W, _gram(x, x))
        W_t = self.W.swapaxes(-1, -2).astype(np.float32)
        energy = np.zeros((g, M))
        for rows in _row_blocks(x.shape[1]):
            y = x[:, rows] @ W_t
            energy += np.einsum("gpm,gpm->gm", y, y, dtype=np.float64)
        return energy

    def solve(self, bits: int, *, iterations: int = 10, damping: float = 0.3) -> LayerSolution:
        """Bit-Split and Stitching on the accumulated statistics.

        Args:
            bits: weight bits b; integers lie in [-(2^(b-1) - 1), 2^(b-1) - 1].
            iterations: at most this many alternations of scales and plane sweeps.
            damping: λ as a fraction of mean(diag G); G + λI and C + λI add λ||W - Wq||² to the
                loss, a ridge toward the float weights.
        """
        if self.count == 0:
            raise ValueError("solve() needs at least one add_batch()")
        qmax = qmax_of(bits)
        G, C = self.G / self.count, self.C / self.count
        y_energy = self.y_energy / self.count
        eye = np.eye(G.shape[-1])
        lam = damping * np.einsum("gnn->g", G)[:, None, None] / G.shape[-1]
        G_d, R_d = G + lam * eye, self.W @ (C + lam * eye)

        # The loop runs column-major, (g, N, M), so that every column it touches is contiguous;
        # H = q G is kept with q and updated with it, never recomputed.
        RT, R_dT = _columns(self.W @ C), _columns(R_d)
        alpha, q = fwa_init(self.W, qmax)
        qT = _columns(q)
        rtn_loss = y_energy + row_losses(RT, G @ qT, alpha, qT)
        HT = G_d @ qT
        G_d32 = G_d.astype(np.float32)
        history = []
        for _ in range(iterations):
            alpha = optimal_alpha(R_dT, HT, qT, alpha)
            history.append(row_losses(R_dT, HT, alpha, qT).sum())
            BT = split(qT, bits)
            targetT = R_dT / alpha[:, None, :]
            for i in reversed(range(bits - 1)):
                sweep_plane(BT[i], float(2 ** i), qT, HT, targetT, G_d, G_d32)
            history.append(row_losses(R_dT, HT, alpha, qT).sum())
            if history[-2] - history[-1] <= CONVERGED * abs(history[-2]):
                break
        if iterations:
            alpha = optimal_alpha(R_dT, HT, qT, alpha)
            history.append(row_losses(R_dT, HT, alpha, qT).sum())

        loss = y_energy + row_losses(RT, G @ qT, alpha, qT)
        # runtimes want positive scales: alpha·q is the same with both signs flipped, and a zero
        # scale means a zero row
        qT *= np.where(alpha < 0, -1.0, 1.0)[:, None, :] * (alpha != 0)[:, None, :]
        alpha = np.where(alpha != 0, np.abs(alpha), 1.0)
        q = qT.transpose(0, 2, 1)
        Wq = alpha[..., None] * q
        bias_shift = (np.einsum("gmn,gn->gm", self.W, self.x_sum)
                      - np.einsum("gmn,gn->gm", Wq, self.x_tilde_sum)) / self.count
        total_energy = max(y_energy.sum(), 1e-30)
        return LayerSolution(
            q=q.astype(np.int8),
            alpha=alpha.astype(np.float32),
            bias_shift=bias_shift.astype(np.float32),
            rel_error=float(loss.sum() / total_energy),
            rtn_rel_error=float(rtn_loss.sum() / total_energy),
            loss_history=tuple(float(v) for v in history),
        )


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """aᵀb per group, (g, P, N) x (g, P, K) -> (g, N, K) in float64: float32 BLAS products over
    ROW_BLOCK rows at a time, summed in float64."""
    out = np.zeros((a.shape[0], a.shape[2], b.shape[2]))
    for rows in _row_blocks(a.shape[1]):
        out += a[:, rows].swapaxes(-1, -2) @ b[:, rows]
    return out


def _row_blocks(count: int) -> list[slice]:
    return [slice(start, start + ROW_BLOCK) for start in range(0, count, ROW_BLOCK)]


def _diagonal_energy(W: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """diag(W gram Wᵀ) per group: (g, M)."""
    return np.einsum("gmn,gmn->gm", W @ gram, W)


def _columns(matrix: np.ndarray) -> np.ndarray:
    """(g, M, N) -> a contiguous (g, N, M) copy."""
    return np.ascontiguousarray(matrix.transpose(0, 2, 1))


def optimal_alpha(RT: np.ndarray, HT: np.ndarray, qT: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Closed-form per-row scales alpha_m = R_m·q_m / q_m G q_mᵀ; rows with q_m = 0 keep theirs.

    All of RT, HT = (q G)ᵀ and qT are column-major, (g, N, M).
    """
    numerator = (RT * qT).sum(axis=1)
    denominator = (HT * qT).sum(axis=1)
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1e-300), alpha)


def sweep_plane(planeT: np.ndarray, step: float, qT: np.ndarray, HT: np.ndarray,
                targetT: np.ndarray, G: np.ndarray, G32: np.ndarray) -> None:
    """One coordinate-descent pass over the columns of one bit plane (weight `step` = 2^i),
    updating the plane, q and H = q G in place. All of them are column-major, (g, N, M).

    With the other entries fixed, L_m is a parabola in q[m, n] with its minimum at
        t = q[m, n] + (R[m, n] / alpha_m - H[m, n]) / G[n, n],
    and the best ternary B_i[m, n] is clip(round((t - rest) / 2^i), -1, 1), where rest is q[m, n]
    without plane i. Inside a block of columns that quantity is kept current for the columns
    ahead as columns change; H is brought up to date for all columns by one matrix product per
    block, over the columns and rows that changed, in float32 (`G32`, G's float32 copy: half the
    time of float64; H stays qG to float32 precision).
    """
    N, M = qT.shape[1:]
    # (t - rest) / 2^i = B_i[m, n] + (R[m, n] / alpha_m - H[m, n]) / (G[n, n] 2^i)
    scaled_inverse = 1.0 / (step * np.maximum(np.einsum("gnn->gn", G), 1e-300))
    for start in range(0, N, BLOCK):
        stop = min(start + BLOCK, N)
        # that quantity for the block's columns: a change d in column n moves H[m, k] by
        # G[k, n] d, and so the quantity of column k by -G[k, n] d / (G[k, k] 2^i)
        block_scale = scaled_inverse[:, start:stop, None]
        proposal = planeT[:, start:stop] + (targetT[:, start:stop] - HT[:, start:stop]) * block_scale
        coupling = G[:, start:stop, start:stop] * block_scale
        changed, deltas = [], []
        for n in range(start, stop):
            b = proposal[:, n - start]
            np.rint(b, out=b)
            np.minimum(b, 1.0, out=b)
            np.maximum(b, -1.0, out=b)
            d = b - planeT[:, n]
            changes = np.count_nonzero(d)
            if not changes:  # late sweeps change few entries: skip the updates of those that don't
                continue
            rows = _changed_rows(d) if 4 * changes < M else slice(None)
            d *= step
            planeT[:, n] = b
            qT[:, n] += d
            changed.append(n)
            deltas.append(d)
            ahead = n + 1 - start  # the columns already swept are not read again
            proposal[:, ahead:, rows] -= coupling[:, ahead:, n - start, None] * d[:, None, rows]
        if changed:
            delta = np.stack(deltas, axis=1, dtype=np.float32)
            rows = _changed_rows(delta.any(axis=1))
            HT[:, :, rows] += G32[:, :, changed] @ delta[:, :, rows]


def _changed_rows(d: np.ndarray) -> np.ndarray | slice:
    """The rows m with a nonzero entry in d (g, M) in some group: their indices when they are few
    (after the first sweep most columns change in a few rows of many), else all of them."""
    rows = (d[0] if len(d) == 1 else d.any(axis=0)).nonzero()[0]
    return rows if 4 * len(rows) < d.shape[-1] else slice(None)


def row_losses(RT: np.ndarray, HT: np.ndarray, alpha: np.ndarray, qT: np.ndarray) -> np.ndarray:
    """(g, M) response loss per row without its constant ||Y_m||²: alpha² q_m G q_mᵀ - 2 alpha R_m·q_m."""
    return alpha ** 2 * (HT * qT).sum(axis=1) - 2 * alpha * (RT * qT).sum(axis=1)
