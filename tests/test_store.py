"""The batch store: arrays within a memory budget, the rest on disk, nothing left behind."""

from contextlib import closing
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphs import feeds_for, inverted_residual_model
from interrupts import sigterm_raises_terminated, then_signalled
from onnx_bitsplit import QuantConfig, quantize
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


def test_a_conversions_store_holds_a_quarter_of_its_memory_budget(tmp_path):
    store = BatchStore.within(8 * 2**20, tmp_path)
    assert (store.budget, store.trim_above) == (2 * 2**20, 4 * 2**20)
    kept, spilled = store.put(np.zeros(2**19, np.float32)), store.put(np.zeros(1, np.float32))  # 2 MiB, then a byte more
    assert kept.path is None and spilled.path is not None
    store.close()


def test_a_spilling_conversion_equals_one_in_memory_and_leaves_no_file(tmp_path):
    model = inverted_residual_model()
    feeds = feeds_for(model, 256)
    in_memory, _ = quantize(model, feeds, QuantConfig(batch_size=4))
    spilled, report = quantize(model, feeds, QuantConfig(batch_size=4, max_memory=2**20, work_dir=str(tmp_path)))
    assert report.spilled_bytes > 0 and report.peak_rss_bytes > 0
    assert list(tmp_path.iterdir()) == []
    for name, value in weights(in_memory).items():
        np.testing.assert_array_equal(weights(spilled)[name], value, err_msg=name)


def test_the_work_folder_is_removed_when_a_conversion_is_interrupted(tmp_path):
    model = inverted_residual_model()
    spilled = []

    def interrupt(phase, done, total, name):  # as Ctrl-C after the first layer
        if not total:  # a phase starting (api.quantize's progress protocol since 0c23bcf): no layer done yet
            return
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
    """As for the output files (test_modelio.py): the folder exists, the store has not recorded it yet."""
    from onnx_bitsplit import store as store_module
    monkeypatch.setattr(store_module.tempfile, "mkdtemp", then_signalled(store_module.tempfile.mkdtemp))
    with sigterm_raises_terminated(), pytest.raises(Terminated):
        with closing(BatchStore(0, tmp_path)) as store:
            store.put(np.ones(4))
    assert list(tmp_path.iterdir()) == []


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
