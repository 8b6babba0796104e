"""Bounded cost: sampled statistics, tensors past the memory budget on disk, nothing left behind."""

import json
from contextlib import closing
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphs import batch_in_constants_model, conv_model, feeds_for, inverted_residual_model
from interrupts import sigterm_raises_terminated, then_signalled
from onnx_bitsplit import QuantConfig, quantize, quantize_file
from onnx_bitsplit.api import sampled_rows
from onnx_bitsplit.errors import Terminated
from onnx_bitsplit.store import BatchStore


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_store_keeps_arrays_within_its_budget_and_the_rest_on_disk(tmp_path):
    store = BatchStore(budget=1000, work_dir=tmp_path)
    small, large = np.arange(100, dtype=np.float32), np.arange(1000, dtype=np.float32)
    kept, spilled = store.put(small), store.put(large)
    assert kept.path is None and spilled.path.exists() and spilled.shape == (1000,)
    np.testing.assert_array_equal(store.get(spilled), large)
    assert store.resident == 400 and store.spilled_bytes == 4000
    store.drop(spilled)
    store.drop(kept)
    assert not spilled.path.exists() and store.resident == 0
    store.put(large)
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_sampled_rows_are_uniform_seeded_and_in_range():
    counts = [5000, 100, 0, 20000]
    rows = sampled_rows(counts, 4096, seed=3)
    assert sum(map(len, rows)) == 4096
    assert all((r >= 0).all() and (r < c).all() and (np.diff(r) > 0).all() for r, c in zip(rows, counts))
    assert abs(len(rows[3]) / 4096 - 20000 / 25100) < 0.03  # each batch in proportion to its rows
    again = sampled_rows(counts, 4096, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(rows, again))
    assert [len(r) for r in sampled_rows(counts, 10**6, seed=3)] == counts  # under the cap: every row


def test_the_seed_reproduces_a_conversion_and_another_seed_draws_other_samples():
    model, feeds = inverted_residual_model(), feeds_for(inverted_residual_model(), 64)
    config = QuantConfig(batch_size=4, sample_rows=1)  # the fewest rows: 64 per weight column, of 6,400
    first, again = quantize(model, feeds, config)[0], quantize(model, feeds, config)[0]
    other = quantize(model, feeds, QuantConfig(batch_size=4, sample_rows=1, seed=1))[0]
    assert all(np.array_equal(weights(again)[name], value) for name, value in weights(first).items())
    assert not all(np.array_equal(weights(other)[name], value) for name, value in weights(first).items())


def test_a_spilling_conversion_equals_one_in_memory_and_leaves_no_file(tmp_path):
    model = inverted_residual_model()
    feeds = feeds_for(model, 256)
    in_memory, _ = quantize(model, feeds, QuantConfig(batch_size=4))
    spilled, report = quantize(model, feeds, QuantConfig(batch_size=4, max_memory=2**20, work_dir=str(tmp_path)))
    assert report.spilled_bytes > 0 and report.peak_rss_bytes > 0
    assert list(tmp_path.iterdir()) == []
    for name, value in weights(in_memory).items():
        np.testing.assert_array_equal(weights(spilled)[name], value, err_msg=name)


def test_a_batch_read_for_the_last_time_makes_room_for_the_outputs(tmp_path):
    """A segment drops each batch it is the last to read as soon as it has read it: the memory
    goes to its outputs. This chain then fits in a quarter of 2 MiB (about its input and one
    layer's outputs in both networks); dropped after the whole segment, 294,912 bytes spilled."""
    model = conv_model()
    _, report = quantize(model, feeds_for(model, 64), QuantConfig(batch_size=4, max_memory=2 * 2**20,
                                                                  work_dir=str(tmp_path)))
    assert report.spilled_bytes == 0


def test_the_work_folder_is_removed_when_a_conversion_is_interrupted(tmp_path):
    model = inverted_residual_model()
    spilled = []

    def interrupt(phase, done, total, name):  # as Ctrl-C after the first layer
        spilled.extend(tmp_path.glob("*/*.npy"))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(model, feeds_for(model, 256), QuantConfig(batch_size=4, max_memory=2**20, work_dir=str(tmp_path)),
                 progress=interrupt)
    assert spilled
    assert list(tmp_path.iterdir()) == []


def test_when_memory_is_full_the_array_needed_last_goes_to_disk(tmp_path):
    """Arrays needed later than the one put (their `until`) are written out first, the latest
    first; an array needed no sooner than every resident one is written itself."""
    store = BatchStore(budget=2000, work_dir=tmp_path)
    arrays = [np.full(250, value, np.float32) for value in range(4)]  # 1000 bytes each
    late, soon = store.put(arrays[0], until=10), store.put(arrays[1], until=5)
    sooner = store.put(arrays[2], until=3)
    assert late.path is not None and soon.path is None and sooner.path is None
    last = store.put(arrays[3], until=7)
    assert last.path is not None and soon.path is None and store.resident == 2000
    for item, array in zip((late, soon, sooner, last), arrays):
        np.testing.assert_array_equal(store.get(item), array)
    assert store.spilled_bytes == 2000
    store.drop(soon)
    assert store.put(arrays[1], until=1).path is None  # the memory it held is free again
    store.close()


def test_the_stores_bookkeeping_does_not_grow_with_the_arrays_it_has_held():
    store = BatchStore(budget=10**6)
    for until in range(1000):
        store.drop(store.put(np.ones(10), until))
    assert store.resident == 0 and len(store.evictable) <= 2


def test_a_signal_just_after_the_work_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """As for the output files (test_guarantees.py): the folder exists, the store has not recorded it yet."""
    from onnx_bitsplit import store as store_module
    monkeypatch.setattr(store_module.tempfile, "mkdtemp", then_signalled(store_module.tempfile.mkdtemp))
    with sigterm_raises_terminated(), pytest.raises(Terminated):
        with closing(BatchStore(0, tmp_path)) as store:
            store.put(np.ones(4))
    assert list(tmp_path.iterdir()) == []


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


def test_the_command_spills_beside_its_output_by_default(tmp_path):
    model_path, out = tmp_path / "model.onnx", tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    model = inverted_residual_model()
    onnx.save(model, model_path)
    report = quantize_file(model_path, out, feeds_for(model, 256), QuantConfig(max_memory=2**20, batch_size=4))
    assert report.spilled_bytes > 0 and report.options["work_dir"] == str(out.parent)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]
    stamped = {p.key: p.value for p in onnx.load(out).metadata_props}["onnx-bitsplit.options"]
    assert "work_dir" not in json.loads(stamped) and str(tmp_path) not in stamped  # no local path in a shipped file


def test_a_full_disk_while_spilling_is_one_line_naming_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    from onnx_bitsplit import store as store_module
    from onnx_bitsplit.errors import BitsplitError

    def save_on_a_full_disk(path, array):
        Path(path).write_bytes(b"\x93NUMPY")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.np, "save", save_on_a_full_disk)
    model = inverted_residual_model()
    with pytest.raises(BitsplitError, match=r"cannot write tensors past the memory budget to '.*onnx-bitsplit-.*': "
                                            r"No space left on device \(.*--work-dir"):
        quantize(model, feeds_for(model, 256), QuantConfig(batch_size=4, max_memory=2**20, work_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("build", [batch_in_constants_model, lambda: fixed_batch(inverted_residual_model())])
def test_a_fixed_batch_model_runs_several_samples_at_once_only_where_that_is_exact(build):
    model = build()
    feeds = feeds_for(model, 24)
    one_at_a_time, _ = quantize(model, feeds, QuantConfig(batch_size=1))
    joined, _ = quantize(model, feeds, QuantConfig(batch_size=8))
    expected, got = run(one_at_a_time, feeds), run(joined, feeds)
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()  # a few rounding flips; mixed: 80%


def run(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def fixed_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return model


def streams_past_the_first_layer():
    """NetworkStreams on conv_model, advanced past its first layer with its float weights."""
    from onnx_bitsplit.api import choose_quantizer
    from onnx_bitsplit.capture import NetworkStreams
    from onnx_bitsplit.graph import find_layers, prepare
    from onnx_bitsplit.layout import plan_layout

    model = prepare(conv_model())
    layers, _ = find_layers(model)
    store = BatchStore(2**30)
    batches = [{name: store.put(value) for name, value in feed.items()} for feed in feeds_for(model, 8, sizes=[12])]
    streams = NetworkStreams(model, layers, batches, store, layout=plan_layout(model, layers), compensate=True,
                             keep_inputs=True,  # the tests read the inputs again
                             choose=lambda decision, values: choose_quantizer(decision, values, QuantConfig())[0])
    params = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
              if t.name in (layers[0].weight_name, layers[0].bias_name)}
    streams.advance(0, float_params=params, quant_params=params)
    return streams, layers, batches, params


def test_the_quantized_stream_quantizes_only_where_the_layout_says(tmp_path):
    """With float weights, the quantized stream's layer input is the float one through its
    quantizer: onnxruntime must not fuse the simulation's Q/DQ around float weights into integer
    kernels of its own (it quantizes the weights itself then)."""
    from onnx_bitsplit.act_scale import fake_quant

    streams, layers, batches, params = streams_past_the_first_layer()
    x_tilde, _ = streams.layer_inputs(1)
    q_in, q_mid = streams.quantizers[layers[0].input_name], streams.quantizers[layers[1].input_name]
    W, b = params[layers[0].weight_name], params[layers[0].bias_name]
    for quantized, stored in zip(x_tilde, batches):
        x_in = fake_quant(streams.store.get(stored[layers[0].input_name]), q_in.scale, 8, False, q_in.zero_point)
        patches = layers[0].patches(x_in)[0]
        y = np.maximum(patches @ W.reshape(len(W), -1).T + b, 0).reshape(1, 12, 12, -1).transpose(0, 3, 1, 2)
        expected = fake_quant(y, q_mid.scale, 8, False, q_mid.zero_point)
        assert np.abs(quantized - expected).max() <= 1.01 * q_mid.scale  # one step at most (sums in another order)
        assert np.mean(quantized != expected) < 0.01


def test_the_streams_keep_their_own_copies_not_onnxruntimes_outputs():
    """An array onnxruntime returns lives in its session's memory and keeps it resident (0.5 GiB
    more peak on 48 samples of a 640x640 detector); the float stream stores float16, the quantized
    one integers."""
    streams, _, _, _ = streams_past_the_first_layer()
    x_tilde, x = streams.layer_inputs(1)
    for batches, dtype in ((x, np.float16), (x_tilde, np.uint8)):
        for index in range(len(batches)):
            stored = batches.stored(index)
            assert stored.flags.owndata and stored.dtype == dtype


def test_peak_memory_is_the_conversions_own_not_its_launchers():
    """getrusage's peak survives exec: a conversion started by a large process would report it."""
    import subprocess
    import sys
    ballast = np.ones(1 << 27)  # 1 GiB, touched
    child = subprocess.run([sys.executable, "-c", "from onnx_bitsplit.store import peak_rss; print(peak_rss())"],
                           capture_output=True, text=True, check=True)
    assert ballast.sum() > 0 and 0 < int(child.stdout) < 2**29
