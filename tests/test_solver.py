"""Solver properties on synthetic data (numpy only), and on a conversion's layers."""

import numpy as np
import pytest

from graphs import calibration_feeds, conv_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.solver import (BLOCK, ROW_BLOCK, BitSplitSolver, _columns, fwa_init, qmax_of, split, stitch,
                                  sweep_plane)


def correlated_inputs(rng, P=3000, N=48, noise=0.0):
    """Inputs with correlated columns, as real activations have, and a noisy 'quantized' copy."""
    x = (rng.normal(size=(P, N)) @ rng.normal(size=(N, N)) / np.sqrt(N)).astype(np.float32)
    x_tilde = x + noise * rng.normal(size=x.shape).astype(np.float32)
    return x_tilde[None], x[None]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_split_gives_ternary_planes_that_stitch_back(rng):
    q = rng.integers(-7, 8, size=(2, 5, 9)).astype(np.float64)
    B = split(q, bits=4)
    assert B.shape == (3, 2, 5, 9)
    assert set(np.unique(B)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(stitch(B), q)


def test_fwa_init_golden():
    # qmax 1: alpha starts at 0.9, q = round([1, -1/3]) = [1, 0], alpha = <W,q>/<q,q> = 0.9
    alpha, q = fwa_init(np.array([[[0.9, -0.3]]]), qmax=1)
    np.testing.assert_allclose(alpha, [[0.9]])
    np.testing.assert_array_equal(q, [[[1, 0]]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_solution_is_in_range_and_loss_never_rises(rng, bits):
    W = rng.normal(size=(1, 16, 48))
    solver = BitSplitSolver(W)
    solver.add_batch(*correlated_inputs(rng, noise=0.1))
    solution = solver.solve(bits, iterations=6)
    assert solution.q.dtype == np.int8
    assert np.abs(solution.q).max() <= qmax_of(bits)
    history = np.array(solution.loss_history)
    assert len(history) >= 3
    assert np.all(np.diff(history) <= 1e-9 * np.abs(history).max())


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_beats_round_to_nearest(rng, noise):
    W = rng.normal(size=(1, 32, 48))
    solver = BitSplitSolver(W)
    x_tilde, x = correlated_inputs(rng, noise=noise)
    solver.add_batch(x_tilde, x)
    solution = solver.solve(3, damping=0.0)
    assert solution.rel_error < 0.8 * solution.rtn_rel_error
    # rel_error is the measured output error, not only the solver's own bookkeeping
    Y = x[0] @ W[0].T
    Yq = x_tilde[0] @ solution.dequantized()[0].T
    np.testing.assert_allclose(((Y - Yq) ** 2).sum() / (Y ** 2).sum(), solution.rel_error, rtol=1e-3)


def test_weights_on_the_grid_come_back_exact(rng):
    q = rng.integers(-7, 8, size=(3, 4, 9))
    q[..., 0] = 7  # every row reaches qmax, so its scale is recoverable
    alpha = rng.uniform(0.01, 0.1, size=(3, 4))
    W = alpha[..., None] * q
    solver = BitSplitSolver(W)
    solver.add_batch(rng.normal(size=(3, 500, 9)).astype(np.float32))
    solution = solver.solve(4)
    np.testing.assert_array_equal(solution.q, q)
    np.testing.assert_allclose(solution.alpha, alpha, rtol=1e-5)
    assert solution.rel_error < 1e-6


def test_statistics_do_not_depend_on_batching(rng):
    W = rng.normal(size=(1, 8, 48))
    x_tilde, x = correlated_inputs(rng, noise=0.1)
    whole, parts = BitSplitSolver(W), BitSplitSolver(W)
    whole.add_batch(x_tilde, x)
    for rows in np.array_split(np.arange(x.shape[1]), 7):
        parts.add_batch(x_tilde[:, rows], x[:, rows])
    # float32 sums in another order differ by rounding relative to the matrix, not to each entry
    for batched, at_once in ((parts.G, whole.G), (parts.C, whole.C)):
        assert np.abs(batched - at_once).max() <= 1e-5 * np.abs(at_once).max()
    np.testing.assert_array_equal(parts.solve(4).q, whole.solve(4).q)


def test_bias_shift_is_the_mean_output_error(rng):
    W = rng.normal(size=(2, 3, 5))
    x = rng.normal(1.0, 1.0, size=(2, 400, 5)).astype(np.float32)
    x_tilde = x + 0.5  # a systematic shift in the quantized network's inputs
    solver = BitSplitSolver(W)
    solver.add_batch(x_tilde, x)
    solution = solver.solve(4)
    Wq = solution.dequantized()
    expected = (x @ W.transpose(0, 2, 1) - x_tilde @ Wq.transpose(0, 2, 1)).mean(axis=1)
    np.testing.assert_allclose(solution.bias_shift, expected, rtol=1e-4, atol=1e-5)


def test_depthwise_groups_solve_independently(rng):
    """A grouped solve equals solving each group alone."""
    W = rng.normal(size=(4, 1, 9))
    x = rng.normal(size=(4, 300, 9)).astype(np.float32)
    grouped = BitSplitSolver(W)
    grouped.add_batch(x)
    together = grouped.solve(3)
    for g in range(4):
        single = BitSplitSolver(W[g:g + 1])
        single.add_batch(x[g:g + 1])
        alone = single.solve(3)
        np.testing.assert_array_equal(together.q[g], alone.q[0])


@pytest.mark.parametrize("outputs", [3, 7])  # output energy from Y itself (M < N) or from XᵀX
def test_statistics_over_many_row_blocks_are_exact(rng, outputs):
    """Grams and output energies summed over ROW_BLOCK-row products equal the float64 products
    of all rows."""
    W = rng.normal(size=(2, outputs, 5))
    x = rng.normal(size=(2, 2 * ROW_BLOCK + 100, 5)).astype(np.float32)
    x_tilde = (x + rng.normal(0, 0.1, x.shape)).astype(np.float32)
    solver = BitSplitSolver(W)
    solver.add_batch(x_tilde, x)
    x64, x_tilde64 = x.astype(np.float64), x_tilde.astype(np.float64)
    assert solver.count == x.shape[1]
    tolerance = dict(rtol=1e-5, atol=1e-6 * x.shape[1])  # float32 products of ~1e4-element sums
    np.testing.assert_allclose(solver.G, x_tilde64.swapaxes(1, 2) @ x_tilde64, **tolerance)
    np.testing.assert_allclose(solver.C, x64.swapaxes(1, 2) @ x_tilde64, **tolerance)
    np.testing.assert_allclose(solver.y_energy, ((x64 @ W.swapaxes(1, 2)) ** 2).sum(axis=1), **tolerance)
    np.testing.assert_allclose(solver.x_sum, x64.sum(axis=1), rtol=1e-5, atol=1e-6 * x.shape[1])


def test_scales_are_positive_even_where_the_best_fit_flips_the_sign(rng):
    """X~ = -X makes the best response Wq = -W: the scales stay positive and q takes the sign."""
    W = rng.normal(size=(1, 4, 6))
    x = rng.normal(size=(1, 300, 6)).astype(np.float32)
    solver = BitSplitSolver(W)
    solver.add_batch(-x, x)
    solution = solver.solve(4, damping=0.0)
    assert (solution.alpha > 0).all()
    assert (np.sign(solution.dequantized()) == -np.sign(W)).mean() > 0.8


def test_plane_sweeps_keep_H_equal_to_qG(rng):
    """The sweeps update H = qG in place, block by block in float32 products: after every plane of
    several sweeps of an 8-bit layer (many changes per column), H is still qG to float32 precision,
    and q is still the stitched planes."""
    M, N, bits = 200, 3 * BLOCK + 5, 8
    x = rng.normal(size=(4000, N)) @ rng.normal(size=(N, N)) / np.sqrt(N)
    G = (x.T @ x / len(x))[None]
    W = rng.normal(size=(1, M, N)) * 0.05
    alpha, q = fwa_init(W, qmax_of(bits))
    qT = _columns(q)
    HT = G @ qT
    targetT = _columns(W @ G) / alpha[:, None, :] + rng.normal(size=qT.shape)  # a target q must move to
    for _ in range(3):
        B = split(qT, bits)
        for i in reversed(range(bits - 1)):
            sweep_plane(B[i], float(2 ** i), qT, HT, targetT, G, G.astype(np.float32))
            exact = G @ qT
            assert np.abs(HT - exact).max() <= 1e-6 * np.abs(exact).max()
        np.testing.assert_array_equal(stitch(B), qT)


def test_bit_split_beats_round_to_nearest_per_layer():
    model = conv_model()
    _, report = quantize(model, calibration_feeds(model), QuantConfig(wbits=3, first_last_wbits=None))
    assert all(layer.rel_error < layer.rtn_rel_error for layer in report.layers)
