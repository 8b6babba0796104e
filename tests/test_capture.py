"""The float and the partially quantized network, run side by side: what each stream computes and
keeps, and when a cached tensor's batches are dropped."""

import numpy as np
import onnx

from graphs import conv_model, feeds_for
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.act_scale import choose_quantizer
from onnx_bitsplit.capture import CachedTensor, NetworkStreams
from onnx_bitsplit.graph import find_layers, prepare
from onnx_bitsplit.layout import plan_layout
from onnx_bitsplit.qdq_format import fake_quant
from onnx_bitsplit.store import BatchStore


def streams_past_the_first_layer():
    """NetworkStreams on conv_model, advanced past its first layer with its float weights."""
    model = prepare(conv_model())
    layers, _ = find_layers(model)
    store = BatchStore(2**30)
    batches = [{name: store.put(value) for name, value in feed.items()} for feed in feeds_for(model, 8, sizes=[12])]
    streams = NetworkStreams(model, layers, batches, store, layout=plan_layout(model, layers), compensate=True,
                             keep_inputs=True,  # the tests read the inputs again
                             choose=lambda decision, values: choose_quantizer(decision, values, 8)[0])
    params = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
              if t.name in (layers[0].weight_name, layers[0].bias_name)}
    streams.advance(0, float_params=params, quant_params=params)
    return streams, layers, batches, params


def test_the_quantized_stream_quantizes_only_where_the_layout_says():
    """With float weights, the quantized stream's layer input is the float one through its
    quantizer: onnxruntime must not fuse the simulation's Q/DQ around float weights into integer
    kernels of its own (it quantizes the weights itself then)."""
    streams, layers, batches, params = streams_past_the_first_layer()
    x_tilde, _ = streams.layer_inputs(1)
    q_in, q_mid = streams.quantizers[layers[0].input_name], streams.quantizers[layers[1].input_name]
    W, b = params[layers[0].weight_name], params[layers[0].bias_name]
    for quantized, stored in zip(x_tilde, batches):
        x_in = fake_quant(streams.store.get(stored[layers[0].input_name]), q_in)
        patches = layers[0].patches(x_in)[0]
        y = np.maximum(patches @ W.reshape(len(W), -1).T + b, 0).reshape(1, 12, 12, -1).transpose(0, 3, 1, 2)
        expected = fake_quant(y, q_mid)
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


def test_a_batch_read_for_the_last_time_makes_room_for_the_outputs(tmp_path):
    """A segment drops each batch it is the last to read as soon as it has read it: the memory
    goes to its outputs. This chain then fits in a quarter of 2 MiB (about its input and one
    layer's outputs in both networks); dropped after the whole segment, 294,912 bytes spilled."""
    model = conv_model()
    _, report = quantize(model, feeds_for(model, 64), QuantConfig(batch_size=4, max_memory=2 * 2**20,
                                                                  work_dir=str(tmp_path)))
    assert report.spilled_bytes == 0


def cached(store: BatchStore, count: int, **options) -> CachedTensor:
    return CachedTensor([store.put(np.full(10, index, np.float32), until=5) for index in range(count)], **options)


def test_a_shared_entry_is_dropped_when_both_readers_release_it():
    """A tensor in both caches (read as float by both streams) is one entry: the first stream
    done with it leaves it to the other."""
    store = BatchStore(2**20)
    entry = cached(store, 3, readers=2)
    entry.release(store)
    assert all(item is not None for item in entry.items) and store.resident == 120
    np.testing.assert_array_equal(store.get(entry.items[2]), np.full(10, 2, np.float32))
    entry.release(store)
    assert entry.items == [None, None, None] and store.resident == 0


def test_a_batch_is_dropped_alone_and_once():
    store = BatchStore(2**20)
    entry = cached(store, 3)
    entry.drop_batch(store, 1)
    entry.drop_batch(store, 1)
    assert entry.items[1] is None and entry.items[0] is not None and store.resident == 80
    entry.release(store)
    assert entry.items == [None, None, None] and store.resident == 0


def test_a_kept_entry_is_never_dropped():
    """The calibration inputs, kept for a later pass over them (keep_inputs)."""
    store = BatchStore(2**20)
    entry = cached(store, 2, readers=2, kept=True)
    entry.drop_batch(store, 0)
    entry.release(store)
    entry.release(store)
    assert all(item is not None for item in entry.items) and store.resident == 80
    np.testing.assert_array_equal(store.get(entry.items[0]), np.zeros(10, np.float32))


def test_the_inputs_of_a_float_pass_kept_for_a_later_one_stay_readable():
    """keep_inputs: after every segment has run, the calibration batches are all still there."""
    model = prepare(conv_model())
    layers, _ = find_layers(model)
    store = BatchStore(2**30)
    feeds = feeds_for(model, 4, sizes=[12])
    batches = [{name: store.put(value) for name, value in feed.items()} for feed in feeds]
    streams = NetworkStreams(model, layers, batches, store, compensate=False, keep_inputs=True)
    for index, layer in enumerate(layers):
        params = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                  if t.name in (layer.weight_name, layer.bias_name)}
        streams.advance(index, float_params=params, quant_params=params)
    for batch, feed in zip(batches, feeds):
        np.testing.assert_array_equal(store.get(batch["x"]), feed["x"])
