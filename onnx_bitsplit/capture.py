"""The float network and the partially quantized network, run side by side one segment at a time.

The prepared graph is cut before each quantized layer (segments.py): segment k holds the nodes
from layer k up to (not including) layer k+1. Each stream keeps a cache of the tensors at the cut
(the frontier) for every calibration batch, in a BatchStore (in memory up to a budget, the rest on
disk), and advances it by running the segment: the float stream with the float weights, the
quantized stream with the solved ones and a QuantizeLinear/DequantizeLinear pair on every tensor
the layout quantizes (layout.py), so that it computes what the written model computes. No pass
ever restarts from the input. The quantized stream keeps its quantized tensors as their 8- or
16-bit integers (what QuantizeLinear gives, a quarter or half of the bytes); the float stream keeps
them as float16.

A tensor's quantizer is chosen when the float stream first produces it, from a sample of its float
values (act_scale.sample_values, taken batch by batch), before the quantized stream runs the nodes
that read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import onnx
from onnx import numpy_helper

from .act_scale import MAX_SAMPLES, sample_values
from .graph import LayerSpec
from .layout import Layout, TensorQuant
from .qdq_format import ActivationQuant, dequantize_linear, fake_quant, quantize_linear
from .segments import Segment, SegmentBuilder, last_uses, run_segment, segment_session
from .store import BatchStore, Stored

Chooser = Callable[[TensorQuant, list[np.ndarray]], ActivationQuant]


class Batches(Sequence):
    """One tensor's calibration batches, read from the store on access; with a quantizer, the
    batches are stored as its integers and read dequantized."""

    def __init__(self, store: BatchStore, items: list[Stored], quantizer: ActivationQuant | None = None):
        self.store, self.items, self.quantizer = store, items, quantizer

    def __getitem__(self, index: int) -> np.ndarray:
        """The batch as float32 (integers dequantized, as DequantizeLinear); the statistics
        convert only the patch rows they take from a batch, in rows.py."""
        stored = self.stored(index)
        if self.quantizer is None:
            return _float32(stored)
        return dequantize_linear(stored, self.quantizer.scale, self.quantizer.zero_point)

    def stored(self, index: int) -> np.ndarray:
        """The batch as stored (integers, float16 or float32; mapped from disk if spilled): to take
        a few values from without converting all of them."""
        return self.store.get(self.items[index])

    @property
    def zero(self) -> float:
        """What 0 is stored as."""
        return 0 if self.quantizer is None else self.quantizer.zero_point

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [item.shape for item in self.items]


class CachedTensor:
    """One tensor's batches in the store, and how many streams still read them.

    A tensor the quantized stream does not quantize (a calibration input it reads as float) is one
    entry in both caches, dropped when the last of them releases it; an entry that is `kept` (the
    calibration inputs, for a later pass) is never dropped.
    """

    def __init__(self, items: list[Stored], *, readers: int = 1, kept: bool = False):
        self.items: list[Stored | None] = items
        self.readers = readers
        self.kept = kept

    def drop_batch(self, store: BatchStore, index: int) -> None:
        """Forget one batch (a dropped batch is None in `items`)."""
        if not self.kept and self.items[index] is not None:
            store.drop(self.items[index])
            self.items[index] = None

    def release(self, store: BatchStore) -> None:
        """One reader is done with the tensor: the last one drops its batches."""
        self.readers -= 1
        if self.readers == 0:
            for index in range(len(self.items)):
                self.drop_batch(store, index)


class NetworkStreams:
    """Two caches of frontier tensors, float and quantized, advanced layer by layer.

    Args:
        model: a prepared model (graph.prepare), topologically sorted.
        layers: its quantized layers, in graph order.
        batches: calibration feeds, one dict per batch, their arrays already in `store`.
        store: where the streams' tensors are kept.
        layout: the tensors to quantize; None runs the float network only (no quantizers).
        choose: picks a tensor's quantizer from its float values (required with a layout).
        compensate: keep a separate quantized stream (error compensation); without it the
            quantized stream is the float stream and quantizers are only chosen.
        keep_inputs: leave the calibration batches in the store (for a later pass over them);
            otherwise they are dropped after their last use, like every other tensor.
        seed: of the value samples the quantizers are chosen on.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[LayerSpec], batches: list[dict[str, Stored]],
                 store: BatchStore, *, layout: Layout | None = None, choose: Chooser | None = None,
                 compensate: bool, keep_inputs: bool = False, seed: int = 0):
        self.layers = layers
        self.layout = layout or Layout()
        self.choose = choose
        self.seed = [0, seed]  # [0, 0] draws what 0 draws (numpy's SeedSequence pads with zeros)
        self.compensate = compensate and layout is not None
        self.last_use = last_uses(model)
        self.node_count = len(model.graph.node)
        position = {node.name: index for index, node in enumerate(model.graph.node)}
        self.starts = [position[layer.name] for layer in layers]
        self.batch_count = len(batches)
        self.samples_per_batch = max(1, MAX_SAMPLES // self.batch_count)  # for choosing quantizers
        self.builder = SegmentBuilder(model, self.layout, self.last_use, self._cached_dtype)
        self.quantizers: dict[str, ActivationQuant] = {}
        self.store = store
        readers = 2 if self.compensate else 1
        self.float_cache: dict[str, CachedTensor] = {
            name: CachedTensor([batch[name] for batch in batches], readers=readers, kept=keep_inputs)
            for name in batches[0]}
        self.quant_cache = dict(self.float_cache) if self.compensate else self.float_cache
        self.quantized_constants = self._quantize_constants(model)
        self._quantize_graph_inputs()
        self._run_segment(0, self.starts[0], {}, {})

    def layer_inputs(self, index: int) -> tuple[Batches, Batches]:
        """(x_tilde, x): the input batches of layer `index` in the quantized and float streams
        (the same object without error compensation)."""
        name = self.layers[index].input_name
        x = Batches(self.store, self.float_cache[name].items)
        if not self.compensate:
            return x, x
        return Batches(self.store, self.quant_cache[name].items, self.quantizers.get(name)), x

    def advance(self, index: int, *, float_params: dict[str, np.ndarray],
                quant_params: dict[str, np.ndarray]) -> None:
        """Run segment `index` (layer `index` up to the next layer, or to the end) on both streams;
        after the last layer only the float stream runs, to choose the quantizers there.

        Args:
            float_params, quant_params: the layer's weight (and bias) by initializer name.
        """
        last = index + 1 == len(self.layers)
        stop = self.node_count if last else self.starts[index + 1]
        self._run_segment(self.starts[index], stop, float_params, None if last else quant_params)

    def _quantize_constants(self, model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
        """Quantizers of the constant data inputs; their values on those quantizers' grids, by name."""
        initializers = {t.name: t for t in model.graph.initializer}
        quantized = {}
        for name, decision in self.layout.constants.items():
            values = numpy_helper.to_array(initializers[name])
            quantizer = self.quantizers[name] = self.choose(decision, [sample_values([values])])
            quantized[name] = numpy_helper.from_array(fake_quant(values, quantizer), name)
        return quantized

    def _quantize_graph_inputs(self) -> None:
        for decision in self.layout.produced_in(-1, 0):
            batches = Batches(self.store, self.float_cache[decision.name].items)
            rng = np.random.default_rng(self.seed)
            samples = [sample_values([batch], self.samples_per_batch, rng) for batch in batches]  # one batch at a time
            quantizer = self.quantizers[decision.name] = self.choose(decision, samples)
            if self.compensate:
                until = self.last_use.get(decision.name)
                self.quant_cache[decision.name].release(self.store)  # the float stream's alone now
                self.quant_cache[decision.name] = CachedTensor([
                    self.store.put(quantize_linear(b, quantizer.scale, quantizer.zero_point, quantizer.dtype), until)
                    for b in batches])

    def _run_segment(self, start: int, stop: int, float_params: dict, quant_params: dict | None) -> None:
        """Nodes [start, stop) on the float stream, the quantizers of the tensors they produce
        chosen on its values, then (unless quant_params is None) the same nodes with those
        quantizers on the quantized stream."""
        produced = self.layout.produced_in(start, stop)
        chosen = {d.name for d in produced if d.shares is None}
        quantized_runs = self.compensate and quant_params is not None

        def ending(cache):  # the tensors no node from `stop` on reads
            return [name for name in cache if self.last_use.get(name, -1) < stop]

        samples = self._run(lambda: self.builder.float_segment(start, stop, float_params, extra_outputs=chosen),
                            self.float_cache, chosen, consumed={  # what the quantized run reads stays
            name for name in ending(self.float_cache)
            if not (quantized_runs and self.quant_cache.get(name) is self.float_cache[name])})
        for decision in produced:
            self.quantizers[decision.name] = (
                self.choose(decision, samples[decision.name]) if decision.shares is None
                else replace(self.quantizers[decision.shares], tensor_name=decision.name))
        if quantized_runs:
            written = [self.quantizers[d.name] for d in produced]
            self._run(lambda: self.builder.quantized_segment(start, stop, quant_params, written=written,
                                                             quantizers=self.quantizers,
                                                             quantized_constants=self.quantized_constants),
                      self.quant_cache, consumed=set(ending(self.quant_cache)))
        for cache in (self.float_cache, self.quant_cache) if self.compensate else (self.float_cache,):
            for name in ending(cache):
                cache.pop(name).release(self.store)
        self.store.release_freed()

    def _run(self, build: Callable[[], Segment], cache: dict[str, CachedTensor], sampled: set[str] = frozenset(),
             consumed: set[str] = frozenset()) -> dict[str, list[np.ndarray]]:
        """Run the segment that build() makes on every batch; keep what later nodes read in
        `cache` (in the store). The inputs in `consumed` (no later run reads them) are dropped
        batch by batch once read: the memory they held takes the outputs, which would otherwise
        go to disk. A tensor stored as float16 that overflows it (an attention mask of -3.4e38, a
        power spectrum) is stored as float32 from then on, the segment rebuilt.

        Returns:
            for each output in `sampled`, a sample of its values from every batch (sample_values).
        """
        segment = build()
        if not segment.outputs:
            return {}
        session = segment_session(segment)
        rng = np.random.default_rng(self.seed)
        samples = {name: [] for name in segment.outputs if name in sampled}
        kept = {name: [] for name in segment.kept}
        for i in range(self.batch_count):
            feed = {segment.coded.get(name, name): self.store.get(cache[name].items[i]) for name in segment.inputs}
            results = run_segment(session, segment, feed)
            overflowed = [name for name, fetch, result in zip(segment.outputs, segment.fetches, results)
                          if fetch != name and result.dtype == np.float16 and not np.isfinite(result).all()]
            if overflowed:
                self.builder.store_float32(overflowed)
                for name in overflowed:  # the batches before: finite in float16, exact in float32
                    kept[name] = [self._widened(item, name) for item in kept[name]]
                segment = build()
                session = segment_session(segment)
                results = run_segment(session, segment, feed)
            for name in consumed.intersection(segment.inputs):
                cache[name].drop_batch(self.store, i)
            for name, fetch, result in zip(segment.outputs, segment.fetches, results):
                if name in samples and fetch == name:
                    samples[name].append(sample_values([result], self.samples_per_batch, rng))
                if name in kept and fetch == segment.coded.get(name, name):
                    # a copy: onnxruntime's outputs live in its session's memory, which they keep resident
                    kept[name].append(self.store.put(np.array(result), until=self.last_use[name]))
        cache.update({name: CachedTensor(items) for name, items in kept.items()})
        return samples

    def _widened(self, item: Stored, name: str) -> Stored:
        widened = self.store.put(self.store.get(item).astype(np.float32), until=self.last_use[name])
        self.store.drop(item)
        return widened

    def _cached_dtype(self, name: str) -> np.dtype | None:
        """The stored type of a frontier tensor (a stream may have dropped the batches it read last)."""
        for cache in (self.float_cache, self.quant_cache):
            entry = cache.get(name)
            item = next((item for item in entry.items if item is not None), None) if entry else None
            if item is not None:
                return self.store.get(item).dtype
        return None


def _float32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) if values.dtype == np.float16 else values
