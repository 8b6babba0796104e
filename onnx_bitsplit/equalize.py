"""Cross-layer equalization: the paper's error-compensated activation quantization (ECAQ) made
exact for a per-tensor runtime.

Between a Conv and the Conv that reads its output (through Relu, LeakyRelu, Clip, Pad or pooling,
which all commute with a positive per-channel factor) a factor s_c per channel is folded into both
layers: the producer's output channel c (weights and bias) is divided by s_c, the consumer's input
channel c multiplied by it. The float network computes the same function; what changes is what the
quantizers see:
- a depthwise consumer keeps one scale per channel for its weights, so s only moves the activation:
  s_c = r_c / max(r) stretches every channel to the tensor's range and the per-tensor 8-bit scale
  then serves each channel as a per-channel one would (the paper's per-channel activation scales);
- a dense consumer's weight columns move with s, so s balances the two ranges,
  s_c = sqrt(r_c / w_c) (Nagel et al., 2019), giving each column a share of its rows' integer grid
  in proportion to how large its input is.
Clip's bounds become per-channel (Relu or Max, then Min, with constant [C,1,1] bounds), since Clip
takes scalars.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .providers import make_session
from .graph import export, merge_defaults, split_defaults
from .qdq_format import Names

MAX_STRETCH = 16.0  # no channel is scaled by more than this relative to the largest factor
CHANNELWISE_OPS = {"Relu", "LeakyRelu", "Clip", "Pad", "MaxPool", "AveragePool", "Identity"}


@dataclass(frozen=True)
class EqualizedPair:
    """One producer/consumer pair and what was folded into it.

    Attributes:
        producer, consumer: node names.
        spread: max(s) / min(s) of the factors applied.
        note: what else changed in the graph (Clip bounds made per-channel), or "".
    """

    producer: str
    consumer: str
    spread: float
    note: str = ""


@dataclass
class _Pair:
    producer: gs.Node
    chain: list[gs.Node]
    consumer: gs.Node


def equalize(model: onnx.ModelProto, layer_names: set[str],
             batches: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, list[EqualizedPair]]:
    """Equalize every Conv -> (channel-wise ops) -> Conv pair whose two Convs are in layer_names.

    Args:
        model: a prepared model (graph.prepare); it is not modified.
        layer_names: the nodes that will be quantized.
        batches: calibration feeds; each channel's range is its largest |value| over them.

    Returns:
        (the equalized model, or `model` itself when no pair qualifies; one record per pair).
    """
    names = Names.of_model(model)
    stripped, defaults = split_defaults(model)
    graph = gs.import_onnx(stripped)
    pairs = _find_pairs(graph, layer_names)
    if not pairs:
        return model, []
    ranges = _channel_ranges(model, [pair.consumer.inputs[0].name for pair in pairs], batches)
    records = []
    for pair, channel_range in zip(pairs, ranges):
        factors = _factors(channel_range, pair.consumer)
        if factors is None:
            continue
        note = _fold(graph, names, pair, factors)
        records.append(EqualizedPair(pair.producer.name, pair.consumer.name,
                                     float(factors.max() / factors.min()), note))
    graph.cleanup().toposort()
    return merge_defaults(export(graph), defaults), records


def _find_pairs(graph: gs.Graph, layer_names: set[str]) -> list[_Pair]:
    """Consumer Convs (dense or depthwise) whose input comes from a producer Conv through
    channel-wise ops only, every tensor on the way read by the next node alone."""
    pairs = []
    for consumer in graph.nodes:
        if consumer.op != "Conv" or consumer.name not in layer_names or not _equalizable_consumer(consumer):
            continue
        chain, tensor = [], consumer.inputs[0]
        while len(tensor.outputs) == 1 and tensor not in graph.outputs and tensor.inputs:
            node = tensor.inputs[0]
            if node.op == "Conv" and node.name in layer_names and len(node.inputs) > 2 \
                    and isinstance(node.inputs[2], gs.Constant):
                pairs.append(_Pair(node, chain[::-1], consumer))
                break
            if not _channelwise(node):
                break
            chain.append(node)
            tensor = node.inputs[0]
    return pairs


def _equalizable_consumer(node: gs.Node) -> bool:
    """Dense (group 1) or depthwise: input channel c maps to weight column c or to row c."""
    groups, weight = node.attrs.get("group", 1), node.inputs[1].values
    return groups == 1 or (groups == weight.shape[0] and weight.shape[1] == 1)


def _channelwise(node: gs.Node) -> bool:
    """f(s·x) = s·f(x) per channel for s > 0 (Clip after its bounds are scaled too)."""
    if node.op not in CHANNELWISE_OPS or len(node.outputs) != 1:
        return False
    constants = all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t.name)
    if node.op == "Clip":
        return constants
    if node.op == "Pad":
        if not constants or len(node.inputs) > 3:  # an `axes` input: keep it simple, skip
            return False
        pads = node.inputs[1].values.reshape(2, -1)
        value = node.inputs[2].values if len(node.inputs) > 2 and node.inputs[2].name else 0.0
        return pads.shape[1] > 1 and not pads[:, 1].any() and float(np.max(np.abs(value))) == 0.0
    return True


def _channel_ranges(model: onnx.ModelProto, names: list[str], batches) -> list[np.ndarray]:
    """max |x| per channel (axis 1) of each named tensor over the calibration batches."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = list(dict.fromkeys(names))
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in wanted)
    session = make_session(probe)
    ranges = {n: 0.0 for n in wanted}
    for batch in batches:
        for name, value in zip(wanted, session.run(wanted, batch)):
            ranges[name] = np.maximum(ranges[name], np.abs(value).max(axis=(0, *range(2, value.ndim))))
    return [ranges[n] for n in names]


def _factors(channel_range: np.ndarray, consumer: gs.Node) -> np.ndarray | None:
    """s per channel (module docstring), limited to MAX_STRETCH; None when the tensor is all zero."""
    if not channel_range.max() > 0:
        return None
    weight = consumer.inputs[1].values
    if consumer.attrs.get("group", 1) == 1:
        column_range = np.abs(weight).max(axis=(0, *range(2, weight.ndim)))
        factors = np.sqrt(channel_range / np.maximum(column_range, np.finfo(np.float32).tiny))
    else:
        factors = channel_range.astype(np.float64)
    factors = np.clip(factors, factors.max() / MAX_STRETCH, None)
    return factors * np.max(channel_range / factors) / channel_range.max()  # keep the tensor's range


def _fold(graph: gs.Graph, names: Names, pair: _Pair, factors: np.ndarray) -> str:
    """Divide the producer's output channels by `factors`, scale the chain's Clip bounds alike and
    multiply the consumer's input channels; returns what changed besides the weights."""
    producer_weight, bias = pair.producer.inputs[1], pair.producer.inputs[2]
    shape = (-1, *[1] * (producer_weight.values.ndim - 1))
    producer_weight.values = (producer_weight.values / factors.reshape(shape)).astype(np.float32)
    bias.values = (bias.values / factors).astype(np.float32)
    consumer_weight = pair.consumer.inputs[1]
    along = 1 if pair.consumer.attrs.get("group", 1) == 1 else 0
    consumer_weight.values = (consumer_weight.values * factors.reshape(
        [-1 if axis == along else 1 for axis in range(consumer_weight.values.ndim)])).astype(np.float32)
    clips = [node for node in pair.chain if node.op == "Clip" and len(node.inputs) > 1]
    for clip in clips:
        _per_channel_clip(graph, names, clip, factors.reshape(shape[:-1]))  # [C,1,1] for an NCHW tensor
    return f"{len(clips)} Clip made per-channel" if clips else ""


def _per_channel_clip(graph: gs.Graph, names: Names, clip: gs.Node, factors: np.ndarray) -> None:
    """Clip(x, lo, hi) on x/s -> Min(Max(x, lo/s), hi/s), the bounds shaped like `factors`;
    Max(x, 0) stays Relu, a bound of zero being zero on every channel."""
    tensor = clip.inputs[0]
    bounds = [(op, clip.inputs[index]) for op, index in (("Max", 1), ("Min", 2))
              if len(clip.inputs) > index and clip.inputs[index].name]
    for position, (op, bound) in enumerate(bounds):
        last = position == len(bounds) - 1
        out = clip.outputs[0] if last else gs.Variable(names.new(clip.name, op.lower()), np.float32)
        if op == "Max" and float(bound.values) == 0.0:
            node = gs.Node("Relu", names.new(clip.name, "relu"), inputs=[tensor], outputs=[out])
        else:
            scaled = gs.Constant(names.new(clip.name, f"{op.lower()}_bound"),
                                 (float(bound.values) / factors).astype(np.float32))
            node = gs.Node(op, names.new(clip.name, f"{op.lower()}_node"), inputs=[tensor, scaled], outputs=[out])
        graph.nodes.append(node)
        tensor = out
    clip.outputs.clear()
