"""A layer's statistics: seeded uniform samples of its patch rows, from both streams, blended."""

import numpy as np
import onnx
import pytest

from graphs import calibration_feeds, conv_model, feeds_for, inverted_residual_model, matmul_model
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.capture import NetworkStreams
from onnx_bitsplit.graph import find_layers, prepare
from onnx_bitsplit.rows import RowConverter
from onnx_bitsplit.statistics import layer_statistics, sampled_rows
from onnx_bitsplit.store import BatchStore


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_sampled_rows_are_uniform_seeded_and_in_range():
    counts = [5000, 100, 0, 20000]
    rows = sampled_rows(counts, 4096, seed=3)
    assert sum(map(len, rows)) == 4096
    assert all((r >= 0).all() and (r < c).all() and (np.diff(r) > 0).all() for r, c in zip(rows, counts))
    assert abs(len(rows[3]) / 4096 - 20000 / 25100) < 0.03  # each batch in proportion to its rows
    again = sampled_rows(counts, 4096, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(rows, again))
    assert [len(r) for r in sampled_rows(counts, 10**6, seed=3)] == counts  # under the cap: every row


def test_every_row_of_every_batch_is_folded_in_once():
    """Without a sample, the first layer's Gram matrix is that of all its patch rows, batches of
    several sizes included."""
    model = prepare(conv_model())
    layers, _ = find_layers(model)
    store = BatchStore(2**30)
    feeds = [{"x": np.concatenate([f["x"] for f in calibration_feeds(model, size, seed=size)])} for size in (1, 3, 2)]
    batches = [{name: store.put(value) for name, value in feed.items()} for feed in feeds]
    streams = NetworkStreams(model, layers, batches, store, compensate=False, keep_inputs=True)
    W = weights(model)[layers[0].weight_name]
    solver = layer_statistics(layers[0], streams, 0, W, blend=1.0, sample_rows=None, seed=0, convert=RowConverter())
    patches = np.concatenate([layers[0].patches(feed["x"])[0] for feed in feeds]).astype(np.float64)
    assert solver.count == 6 * 12 * 12 == len(patches)
    np.testing.assert_allclose(solver.G[0], patches.T @ patches, rtol=1e-5, atol=1e-3)


def test_the_seed_reproduces_a_conversion_and_another_seed_draws_other_samples():
    model, feeds = inverted_residual_model(), feeds_for(inverted_residual_model(), 64)
    config = QuantConfig(batch_size=4, sample_rows=1)  # the fewest rows: 64 per weight column, of 6,400
    first, again = quantize(model, feeds, config)[0], quantize(model, feeds, config)[0]
    other = quantize(model, feeds, QuantConfig(batch_size=4, sample_rows=1, seed=1))[0]
    assert all(np.array_equal(weights(again)[name], value) for name, value in weights(first).items())
    assert not all(np.array_equal(weights(other)[name], value) for name, value in weights(first).items())


def test_sampling_rows_changes_the_solution_little_and_is_reproducible(tmp_path):
    model = inverted_residual_model()
    feeds = feeds_for(model, 256)
    every, every_report = quantize(model, feeds, QuantConfig(sample_rows=None))
    sampled, sampled_report = quantize(model, feeds, QuantConfig(sample_rows=256))
    again, _ = quantize(model, feeds, QuantConfig(sample_rows=256))
    assert weights(sampled).keys() == weights(again).keys()
    assert all(np.array_equal(weights(sampled)[n], v) for n, v in weights(again).items())
    changed = [a.rel_error for a in sampled_report.layers] != [a.rel_error for a in every_report.layers]
    assert changed  # the cap was below the rows of these layers: the sample is really smaller
    for full, part in zip(every_report.layers, sampled_report.layers):
        assert part.rel_error < 2 * full.rel_error + 1e-3, full.name


def test_blend_zero_is_solving_on_float_inputs():
    """With compensation_blend=0 the solve sees only float inputs: the same weights as without
    error compensation (one layer, so both streams read the same activation)."""
    model = matmul_model()
    del model.graph.node[2:]  # keep x -> MatMul -> Sigmoid
    model.graph.output[0].name = "s1"
    feeds = calibration_feeds(model, 8)
    blended, _ = quantize(model, feeds, QuantConfig(wbits=3, compensation_blend=0.0, first_last_wbits=None))
    plain, _ = quantize(model, feeds, QuantConfig(wbits=3, error_compensation=False, first_last_wbits=None))
    for a, b in zip(blended.graph.initializer, plain.graph.initializer):
        assert a.name == b.name
        # same statistics up to float rounding (BLAS takes XᵀX and XᵀX~ by different routes)
        np.testing.assert_allclose(onnx.numpy_helper.to_array(a).astype(np.float64),
                                   onnx.numpy_helper.to_array(b).astype(np.float64), rtol=1e-4)
    with pytest.raises(Exception, match="compensation_blend"):
        QuantConfig(compensation_blend=1.5)
