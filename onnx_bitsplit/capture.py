"""The float network and the partially quantized network, run side by side one segment at a time.

The prepared graph is cut before each quantized layer. Segment k holds the nodes from layer k up
to (not including) layer k+1; its inputs are the cached tensors at the cut (the frontier), its
outputs the tensors that later nodes read. Each segment runs as its own onnxruntime session with
the layer's weight and bias as inputs: the float stream with the float weights, the quantized
stream with the solved ones (baked in as constants, so onnxruntime prepacks them as in a whole
model) and a QuantizeLinear/DequantizeLinear pair on every tensor the layout
quantizes (layout.py), so the quantized stream computes what the written model computes. No pass
ever restarts from the input, and the cache holds only the frontier, in a BatchStore (in memory
up to a budget, the rest on disk). The quantized stream keeps its quantized tensors as their
8- or 16-bit integers (exactly what QuantizeLinear gives, a quarter or half of the bytes) and each
segment dequantizes what it reads; the float stream keeps the tensors the layout quantizes as
float16 (a rounding error 2^-11 of the value, far below the 8-bit quantizer's step).

A tensor's quantizer is chosen when the float stream first produces it, from a sample of its float
values (act_scale.sample_values, taken batch by batch), before the quantized stream runs the nodes
that read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .act_scale import MAX_SAMPLES, fake_quant, sample_values
from .calibration import input_shapes
from .graph import LayerSpec
from .layout import ActivationQuant, Layout, TensorQuant
from .providers import make_session
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
        scale, zero_point = np.float32(self.quantizer.scale), np.float32(self.quantizer.zero_point)
        return (stored.astype(np.float32) - zero_point) * scale

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


@dataclass(frozen=True)
class Segment:
    """Nodes [start, stop) of the topologically sorted graph, as a runnable model."""

    model: onnx.ModelProto
    start: int
    inputs: list[str]
    outputs: list[str]  # tensors, one per graph output (a tensor may be written twice: stored and sampled)
    fetches: list[str]  # the graph outputs: the tensor's name, or the name of its stored form
    kept: list[str]  # the outputs that later nodes read
    coded: dict[str, str]  # tensor -> the name of its stored form (integers, or float16 in the float stream)


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
        self.model = model
        self.layers = layers
        self.layout = layout or Layout()
        self.choose = choose
        self.seed = [0, seed]  # [0, 0] draws what 0 draws (numpy's SeedSequence pads with zeros)
        self.compensate = compensate and layout is not None
        self.nodes = list(model.graph.node)
        position = {node.name: index for index, node in enumerate(self.nodes)}
        self.starts = [position[layer.name] for layer in layers]
        self.last_use = _last_uses(model)
        self.value_infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.graph_inputs = {i.name for i in model.graph.input}
        self.batch_count = len(batches)
        self.samples_per_batch = max(1, MAX_SAMPLES // self.batch_count)  # for choosing quantizers
        fixed = [shape[0] for shape in input_shapes(model).values() if shape and shape[0]]
        self.fixed_batch = min(fixed) if fixed else None
        self.joined: dict[int, bool] = {}  # segment start -> whether it runs batches of several fixed batches
        self.quantizers: dict[str, ActivationQuant] = {}
        self.store = store
        self.float_cache: dict[str, list[Stored]] = {
            name: [batch[name] for batch in batches] for name in batches[0]}
        self.borrowed = {id(items) for items in self.float_cache.values()} if keep_inputs else set()
        self.quant_cache = dict(self.float_cache) if self.compensate else self.float_cache
        self._quantize_constants()
        self._quantize_graph_inputs()
        self._run_segment(0, self.starts[0], {}, {})

    def layer_inputs(self, index: int) -> tuple[Batches, Batches]:
        """(x_tilde, x): the input batches of layer `index` in the quantized and float streams
        (the same object without error compensation)."""
        name = self.layers[index].input_name
        x = Batches(self.store, self.float_cache[name])
        if not self.compensate:
            return x, x
        return Batches(self.store, self.quant_cache[name], self.quantizers.get(name)), x

    def advance(self, index: int, *, float_params: dict[str, np.ndarray],
                quant_params: dict[str, np.ndarray]) -> None:
        """Run segment `index` (layer `index` up to the next layer, or to the end) on both streams;
        after the last layer only the float stream runs, to choose the quantizers there.

        Args:
            float_params, quant_params: the layer's weight (and bias) by initializer name.
        """
        last = index + 1 == len(self.layers)
        stop = len(self.nodes) if last else self.starts[index + 1]
        self._run_segment(self.starts[index], stop, float_params, None if last else quant_params)

    def _quantize_constants(self) -> None:
        """Quantizers of the constant data inputs, and their quantized values for the quantized stream."""
        self.quantized_constants = {}
        for name, decision in self.layout.constants.items():
            values = numpy_helper.to_array(self.initializers[name])
            quantizer = self.quantizers[name] = self.choose(decision, [sample_values([values])])
            self.quantized_constants[name] = numpy_helper.from_array(_fake_quant(values, quantizer), name)

    def _quantize_graph_inputs(self) -> None:
        for decision in self.layout.produced_in(-1, 0):
            batches = Batches(self.store, self.float_cache[decision.name])
            rng = np.random.default_rng(self.seed)
            samples = [sample_values([batch], self.samples_per_batch, rng) for batch in batches]  # one batch at a time
            quantizer = self.quantizers[decision.name] = self.choose(decision, samples)
            if self.compensate:
                until = self.last_use.get(decision.name)
                self.quant_cache[decision.name] = [self.store.put(_integers(b, quantizer), until) for b in batches]

    def _run_segment(self, start: int, stop: int, float_params: dict, quant_params: dict | None) -> None:
        """Nodes [start, stop) on the float stream, the quantizers of the tensors they produce
        chosen on its values, then (unless quant_params is None) the same nodes with those
        quantizers on the quantized stream."""
        produced = self.layout.produced_in(start, stop)
        chosen = {d.name for d in produced if d.shares is None}
        quantized_runs = self.compensate and quant_params is not None

        def ending(cache):  # the tensors no node from `stop` on reads
            return [name for name in cache if self.last_use.get(name, -1) < stop]

        segment = self._segment(start, stop, float_params, extra_outputs=chosen)
        # the streams share the lists of tensors they do not quantize: the quantized run reads them last
        samples = self._run(segment, self.float_cache, chosen, consumed={
            name for name in ending(self.float_cache)
            if not (quantized_runs and self.quant_cache.get(name) is self.float_cache[name])})
        for decision in produced:
            self.quantizers[decision.name] = (
                self.choose(decision, samples[decision.name]) if decision.shares is None
                else replace(self.quantizers[decision.shares], tensor_name=decision.name))
        if quantized_runs:
            segment = self._segment(start, stop, quant_params,
                                    quantizers=[self.quantizers[d.name] for d in produced])
            self._run(segment, self.quant_cache, consumed=set(ending(self.quant_cache)))
        finished = {}  # by identity: the streams share the lists of tensors they do not quantize
        for cache in (self.float_cache, self.quant_cache) if self.compensate else (self.float_cache,):
            for name in ending(cache):
                items = cache.pop(name)
                finished[id(items)] = items
        for items in finished.values():
            self._drop(items)
        self.store.release_freed()

    def _drop(self, items: list[Stored | None], index: int | None = None) -> None:
        """Forget the batches of a finished tensor (`index`: that one only), unless they are
        borrowed (keep_inputs); a dropped batch is None in its list."""
        if id(items) in self.borrowed:
            return
        for i in range(len(items)) if index is None else [index]:
            if items[i] is not None:
                self.store.drop(items[i])
                items[i] = None

    def _run(self, segment: Segment, cache: dict[str, list[Stored]], sampled: set[str] = frozenset(),
             consumed: set[str] = frozenset()) -> dict[str, list[np.ndarray]]:
        """Run the segment on every batch; keep what later nodes read in `cache` (in the store).
        The inputs in `consumed` (no later run reads them) are dropped batch by batch once read:
        the memory they held takes the outputs, which would otherwise go to disk.

        Returns:
            for each output in `sampled`, a sample of its values from every batch (sample_values).
        """
        if not segment.outputs:
            return {}
        # no spinning: between runs the main thread copies and samples the outputs, and the
        # spinning workers would take the cores from it (2 s of 36 on EfficientNet-Lite0 at 256 images)
        session = make_session(segment.model, qdq_fusion=False, spinning=False)
        rng = np.random.default_rng(self.seed)
        samples = {name: [] for name in segment.outputs if name in sampled}
        kept = {name: [] for name in segment.kept}
        feeds = [segment.coded.get(name, name) for name in segment.inputs]
        for i in range(self.batch_count):
            results = self._run_batch(session, segment.fetches, {feed: self.store.get(cache[name][i])
                                                                 for feed, name in zip(feeds, segment.inputs)},
                                      segment.start)
            for name in consumed.intersection(segment.inputs):
                self._drop(cache[name], i)
            for name, fetch, result in zip(segment.outputs, segment.fetches, results):
                if name in samples and fetch == name:
                    samples[name].append(sample_values([result], self.samples_per_batch, rng))
                if name in kept and fetch == segment.coded.get(name, name):
                    # a copy: onnxruntime's outputs live in its session's memory, which they keep
                    # resident (0.5 GiB more peak on 48 samples of the 640x640 detector)
                    kept[name].append(self.store.put(np.array(result), until=self.last_use[name]))
        cache.update(kept)
        return samples

    def _run_batch(self, session, fetches: list[str], feed: dict[str, np.ndarray], start: int) -> list[np.ndarray]:
        """session.run on one batch. A model with a fixed batch gets batches of several of them
        (batch_feeds(join_fixed=True)): the segments' inputs have no shapes, so most segments run
        them at once, but one with the batch written into a constant (a Reshape to [1, -1])
        must not. The first float run of each segment decides: the joined batch runs, and its
        first fixed batch alone gives the same outputs; otherwise the segment runs one fixed
        batch at a time."""
        rows = len(next(iter(feed.values())))
        if self.fixed_batch is None or rows <= self.fixed_batch:
            return session.run(fetches, feed)
        if start not in self.joined:
            self.joined[start] = self._runs_joined(session, fetches, feed)
        return session.run(fetches, feed) if self.joined[start] else self._one_by_one(session, fetches, feed)

    def _runs_joined(self, session, fetches: list[str], feed: dict[str, np.ndarray]) -> bool:
        try:
            joined = session.run(fetches, feed)
        except Exception:  # onnxruntime's shape errors: the batch is in a constant
            return False
        alone = session.run(fetches, {name: value[:self.fixed_batch] for name, value in feed.items()})
        return all(j.shape[:1] == (len(next(iter(feed.values()))),) and np.allclose(
            j[:self.fixed_batch], a, rtol=1e-3, atol=1e-3 * float(np.abs(a).max(initial=0))) for j, a in zip(joined, alone))

    def _one_by_one(self, session, fetches: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The batch run one fixed batch at a time, the outputs joined."""
        rows, step = len(next(iter(feed.values()))), self.fixed_batch
        pieces = [session.run(fetches, {name: value[i:i + step] for name, value in feed.items()})
                  for i in range(0, rows, step)]
        return [np.concatenate(parts) for parts in zip(*pieces)]

    def _segment(self, start: int, stop: int, params: dict[str, np.ndarray], *,
                 extra_outputs: set[str] = frozenset(), quantizers: list[ActivationQuant] | None = None) -> Segment:
        """Nodes [start, stop) as a model reading the frontier, with `params` (initializer name ->
        value) for the layer's weight and bias, writing what is read later and `extra_outputs`.
        With `quantizers` (the quantized stream) each of their tensors goes through QuantizeLinear
        and DequantizeLinear before anything reads it, and is written as its integers; inputs
        quantized earlier are read as integers and dequantized; quantized constants replace the
        float ones."""
        nodes = self.nodes[start:stop]
        produced = {name for node in nodes for name in node.output}
        read = list(dict.fromkeys(name for node in nodes for name in node.input if name))
        inputs = [n for n in read if n not in produced and n not in self.initializers]
        kept = [n for n in dict.fromkeys(o for node in nodes for o in node.output) if self.last_use.get(n, -1) >= stop]
        constants = [self.initializers[n] for n in read if n in self.initializers and n not in params]
        constants += [numpy_helper.from_array(value, name) for name, value in params.items()]
        coded = {}
        if quantizers is None:  # onnxruntime's Cast converts 10x faster than numpy, with the same rounding
            coded = {name: f"{name}.sim_half" for name in inputs + kept if self._stored_half(name)}
            nodes = ([helper.make_node("Cast", [coded[name]], [name], to=TensorProto.FLOAT) for name in inputs
                      if name in coded] + nodes
                     + [helper.make_node("Cast", [name], [coded[name]], to=TensorProto.FLOAT16) for name in kept
                        if name in coded])
        outputs = kept + sorted(extra_outputs - {name for name in kept if name not in coded})
        fetches = [coded.get(name, name) for name in kept] + outputs[len(kept):]
        input_infos = [helper.make_tensor_value_info(coded[name], TensorProto.FLOAT16, None) if name in coded
                       else self._value_info(name) for name in inputs]
        output_infos = [helper.make_tensor_value_info(fetch, TensorProto.FLOAT16, None) if fetch != name
                        else self._value_info(name, typed=False) for name, fetch in zip(outputs, fetches)]
        if quantizers is not None:
            read_coded = [self.quantizers[name] for name in inputs if name in self.quantizers]
            written = {q.tensor_name: q for q in quantizers}
            nodes = [_dequantizer(q) for q in read_coded] + _with_quantizers(nodes, quantizers)
            constants = [self.quantized_constants.get(c.name, c) for c in constants]
            constants += [t for q in read_coded + quantizers for t in _quantizer_constants(q)]
            coded = {q.tensor_name: f"{q.tensor_name}.sim_quantized" for q in read_coded}
            coded.update({name: f"{name}.sim_quantized" for name in kept if name in written})
            fetches = [coded.get(name, name) for name in outputs]
            input_infos = [_integer_info(coded[name], self.quantizers[name]) if name in coded else info
                           for name, info in zip(inputs, input_infos)]
            output_infos = [_integer_info(coded[name], written[name]) if name in coded else info
                            for name, info in zip(outputs, output_infos)]
        graph = helper.make_graph(nodes, f"segment_{start}", input_infos, output_infos, constants)
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        return Segment(model, start, inputs, outputs, fetches, kept, coded)

    def _stored_half(self, name: str) -> bool:
        """Whether the float stream stores the tensor as float16: a float32 tensor that the layout
        quantizes, produced inside the graph (calibration inputs are stored as given)."""
        info = self.value_infos.get(name)
        return (name in self.layout.tensors and name not in self.graph_inputs and info is not None
                and info.type.tensor_type.elem_type == TensorProto.FLOAT)

    def _value_info(self, name: str, typed: bool = True) -> onnx.ValueInfoProto:
        """The tensor's inferred type with its shape dropped (batch and sizes vary); for a frontier
        input with no inferred type, the cached data's."""
        info = self.value_infos.get(name)
        if info is not None and info.type.tensor_type.elem_type:
            return helper.make_tensor_value_info(name, info.type.tensor_type.elem_type, None)
        if typed:  # a stream may have dropped the batches it read last (_run's consumed)
            cached = next((items[0] for items in (self.float_cache.get(name), self.quant_cache.get(name))
                           if items and items[0] is not None), None)
            if cached is not None:
                dtype = self.store.get(cached).dtype
                return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)
            graph_input = next((i for i in self.model.graph.input if i.name == name), None)
            if graph_input is not None:
                return graph_input
        return onnx.ValueInfoProto(name=name)


def quantizer_dtype(quantizer: ActivationQuant) -> type:
    """The integer type of an activation quantizer: uint8 or uint16."""
    return {8: np.uint8, 16: np.uint16}[quantizer.bits]


def _fake_quant(values: np.ndarray, quantizer: ActivationQuant) -> np.ndarray:
    return fake_quant(values, quantizer.scale, quantizer.bits, False, quantizer.zero_point)


def _float32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) if values.dtype == np.float16 else values


def _integers(values: np.ndarray, quantizer: ActivationQuant) -> np.ndarray:
    """QuantizeLinear(values): the quantizer's integers."""
    dtype = quantizer_dtype(quantizer)
    q = np.rint(values / np.float32(quantizer.scale)) + quantizer.zero_point
    return np.clip(q, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)


def _integer_info(name: str, quantizer: ActivationQuant) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(quantizer_dtype(quantizer))),
                                         None)


def _dequantizer(quantizer: ActivationQuant) -> onnx.NodeProto:
    """DequantizeLinear from the tensor's integers (`.sim_quantized`) to the tensor."""
    name = quantizer.tensor_name
    return helper.make_node("DequantizeLinear", [f"{name}.sim_quantized", f"{name}.sim_scale", f"{name}.sim_zero_point"],
                            [name])


def _quantizer_constants(quantizer: ActivationQuant) -> list[onnx.TensorProto]:
    name = quantizer.tensor_name
    return [numpy_helper.from_array(np.array(quantizer.scale, np.float32), f"{name}.sim_scale"),
            numpy_helper.from_array(np.array(quantizer.zero_point, quantizer_dtype(quantizer)), f"{name}.sim_zero_point")]


def _with_quantizers(nodes: list[onnx.NodeProto], quantizers: list[ActivationQuant]) -> list[onnx.NodeProto]:
    """The nodes with each quantized tensor renamed at its producer and restored by a Q/DQ pair."""
    quantized = {q.tensor_name for q in quantizers}
    result = []
    for node in nodes:
        outputs = [name for name in node.output if name in quantized]
        if not outputs:
            result.append(node)
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.output[:] = [f"{name}.sim_float" if name in quantized else name for name in node.output]
        result.append(copy)
        for name in outputs:
            args = [f"{name}.sim_scale", f"{name}.sim_zero_point"]
            result += [helper.make_node("QuantizeLinear", [f"{name}.sim_float", *args], [f"{name}.sim_quantized"]),
                       helper.make_node("DequantizeLinear", [f"{name}.sim_quantized", *args], [name])]
    return result


def _last_uses(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> index of the last node that reads it (graph outputs: past the end)."""
    last = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            last[name] = index
    for output in model.graph.output:
        last[output.name] = len(model.graph.node)
    return last
