"""Where the quantizers go: the node units of a prepared graph.

Runtimes run QDQ graphs as integer kernels one "node unit" at a time: DequantizeLinear on every
data input of an operator, the operator, QuantizeLinear on each of its outputs (onnxruntime's
QLinearConv/QGemm/QLinearAdd... fusions, QNN HTP's op builders, OpenVINO's low-precision
transformations). plan_layout() decides, once, which tensors are quantized so that every operator
of UNIT_OPS is such a unit; capture.py simulates exactly this decision and qdq.py writes it.

Rules, as onnxruntime's own QDQ quantizer applies them:
- every float input and output of a unit operator is quantized, once per tensor, whoever else
  reads it (operators outside UNIT_OPS read the dequantized value and run in float);
- data-movement operators (SAME_SCALE_OPS) give their output their input's quantizer, a quantized
  constant's too (an embedding table's Gather): their output values lie on the input's grid, and
  runtimes run them on the integers unchanged (with other parameters onnxruntime and QNN run them
  in float);
- a Relu, or a Clip from 0, whose input has no other reader disappears into the quantizer of its
  output: a quantizer with zero point 0 and qmax·scale <= the Clip's top saturates exactly as the
  operator does (a runtime fuses Conv -> Relu/Clip -> Q only when the Q makes them redundant);
- operators with a fixed output range (Sigmoid, Softmax, Tanh, HardSigmoid, a Clip below 0) get a
  quantizer spanning exactly that range, as QNN's 16-bit kernels require;
- graph outputs get a quantizer over their whole calibration range, fixed-range operators' too:
  what reads them (argmax, thresholds, box decoding) lives on the extremes that a clipping
  quantizer would flatten, and a score of 1e-5 must not become 0 on a [0, 1] grid;
- a Softmax's input may carry an attention mask, "minus infinity" where padding is: its
  quantizer is chosen on the other values and its bottom set far enough below them that the
  masked positions, saturated there, still weigh nothing; the mask added into it keeps its
  "minus infinity" as a value low enough for the sum to saturate (act_scale.choose_quantizer);
- a layer normalization's input (a transformer's residual stream) and the terms of the Add making
  it get 16 bits, unless a layer reads them (its integer kernel takes 8): a few outlier channels
  take an 8-bit range and leave the others a step or two, and the normalization divides that
  error back up. CPU runtimes run that Add in float and the layer writing a 16-bit term as an
  integer kernel; QNN HTP takes no layer writing 16 bits from 8 (wider_layer_outputs: with
  --target qnn such a model gets 16-bit activations throughout);
- constant data inputs of units (an Add's or Mul's operand) become per-tensor integer constants,
  finite ones: -inf, the start of a Max, stays float.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from .graph import LayerSpec, constant_initializers, non_negative_tensors
from .modelio import node_reads

# operator -> positions of its data inputs (the rest are parameters: shapes, pads, scales, roi...)
UNIT_OPS: dict[str, tuple[int, ...]] = {
    "Conv": (0,), "Gemm": (0,), "MatMul": (0, 1),
    "Add": (0, 1), "Mul": (0, 1), "Concat": (), "Sum": (),
    "AveragePool": (0,), "GlobalAveragePool": (0,), "MaxPool": (0,), "GlobalMaxPool": (0,),
    "Resize": (0,), "Reshape": (0,), "Flatten": (0,), "Transpose": (0,), "Squeeze": (0,),
    "Unsqueeze": (0,), "Pad": (0,), "Slice": (0,), "Split": (0,), "Gather": (0,),
    "DepthToSpace": (0,), "SpaceToDepth": (0,),
    "Relu": (0,), "Clip": (0,), "LeakyRelu": (0,), "Sigmoid": (0,), "HardSigmoid": (0,),
    "HardSwish": (0,), "Tanh": (0,), "Softmax": (0,), "Gelu": (0,), "Sub": (0, 1), "Div": (0, 1),
    "ReduceMean": (0,), "Expand": (0,), "Tile": (0,), "GatherElements": (0,), "Max": (0, 1), "Min": (0, 1),
}
ALL_INPUTS = {"Concat", "Sum"}  # every input is data
# Values stay on the input's grid: the output shares the input's quantizer.
SAME_SCALE_OPS = {
    "MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Pad",
    "Slice", "Split", "Gather", "GatherElements", "DepthToSpace", "SpaceToDepth", "Resize", "Expand",
    "Tile",
}
REMOVABLE_OPS = {"Relu", "Clip"}
NORMALIZED_BITS = 16  # least width of a layer normalization's input (TensorQuant.min_bits)
OUTPUT_RANGES = {"Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0), "Tanh": (-1.0, 1.0)}


@dataclass(frozen=True)
class TensorQuant:
    """The decision to quantize one activation tensor (per tensor); its scale comes later.

    Attributes:
        name: the tensor.
        signed: it can be negative (its quantizer gets a zero point); non-negative tensors
            have zero point 0.
        shares: the tensor whose quantizer this one takes over (SAME_SCALE_OPS), or None.
        removed_node: a Relu/Clip folded into this quantizer: the QuantizeLinear reads that
            node's input, and the node is left out of the written graph.
        upper_bound: the top of the Clip producing the tensor; the scale must keep
            qmax·scale <= upper_bound so that the quantizer saturates where the Clip does.
        fixed_range: (low, high) of an operator with a bounded output: the quantizer spans it.
        full_range: the quantizer spans the tensor's whole calibration range, no clipping.
        softmax_input: only Softmax reads it, so it may hold an attention mask's "minus
            infinity" (finfo.min, -1e4, -inf): the quantizer keeps those values below every other.
        mask_operand: it is added into a softmax input (the mask itself): its "minus infinity"
            becomes a value low enough for the sum to saturate at that input's bottom.
        min_bits: the quantizer's least width whatever the activation bits asked for: 16 for a
            layer normalization's input, a transformer's residual stream, where a few outlier
            channels take the whole of an 8-bit range and leave the others a step or two.
    """

    name: str
    signed: bool
    shares: str | None = None
    removed_node: str | None = None
    upper_bound: float | None = None
    fixed_range: tuple[float, float] | None = None
    full_range: bool = False
    softmax_input: bool = False
    mask_operand: bool = False
    min_bits: int = 0


@dataclass
class Layout:
    """Every quantized tensor of a graph, in the order of the nodes that produce them.

    Attributes:
        tensors: name -> TensorQuant; graph inputs first, then in node order.
        constants: initializers that are data inputs of units (an Add's operand), quantized per
            tensor like activations.
        producers: tensor name -> index of the node producing it (graph inputs: -1).
    """

    tensors: dict[str, TensorQuant] = field(default_factory=dict)
    constants: dict[str, TensorQuant] = field(default_factory=dict)
    producers: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._order = [self.producers[name] for name in self.tensors]  # ascending: tensors is in node order
        self._decisions = list(self.tensors.values())

    def produced_in(self, start: int, stop: int) -> list[TensorQuant]:
        """The quantized tensors whose producer is one of nodes [start, stop) (graph inputs: -1)."""
        return self._decisions[bisect.bisect_left(self._order, start):bisect.bisect_left(self._order, stop)]


def plan_layout(model: onnx.ModelProto, layers: list[LayerSpec], float_nodes: set[str] = frozenset()) -> Layout:
    """The node units of a prepared model whose quantized layers are `layers`; the nodes named in
    `float_nodes` are no units: they read and write float, and their neighbours' units quantize
    what they share with them."""
    graph = model.graph
    initializers = constant_initializers(model)
    floats = _float_tensors(model)
    producers = {name: index for index, node in enumerate(graph.node) for name in node.output}
    producers.update({i.name: -1 for i in graph.input if i.name not in initializers})
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_reads(node):
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    layer_inputs = {layer.name: layer.input_name for layer in layers}

    units = [node for node in graph.node
             if node.name not in float_nodes and _is_unit(node, layer_inputs, initializers)]
    quantized, constants = set(), {}
    for node in units:
        for name in _data_inputs(node, layer_inputs):
            if name in initializers:
                values = onnx.numpy_helper.to_array(initializers[name])
                if values.dtype == np.float32 and np.isfinite(values).all():  # -inf, a Max's start, stays float
                    constants[name] = TensorQuant(name, signed=bool((values < 0).any()))
            elif name in floats:
                quantized.add(name)
        quantized.update(name for name in node.output if name in floats)
    removed = {node.input[0]: node for node in units if _removable(node, producers, readers, outputs, initializers)}
    quantized -= removed.keys()  # inside a fused unit: never materialised by an integer runtime

    non_negative = non_negative_tensors(model)
    normalized = _normalized(graph, producers)
    decided: dict[str, TensorQuant] = {}
    for name in sorted(quantized, key=lambda n: producers.get(n, -1)):
        if name not in producers:  # read but produced nowhere: a malformed graph onnxruntime refuses
            continue
        node = graph.node[producers[name]] if producers[name] >= 0 else None
        source = node.input[0] if node is not None and node.input else None
        if node is not None and node.op_type in SAME_SCALE_OPS and source in decided:
            decided[name] = TensorQuant(name, decided[source].signed, shares=_root(source, decided))
        elif node is not None and node.op_type in SAME_SCALE_OPS and source in constants:  # an embedding table
            decided[name] = TensorQuant(name, constants[source].signed, shares=source)
        else:
            decided[name] = _own_quantizer(non_negative, name, node, removed, initializers)
            if name in outputs:
                decided[name] = replace(decided[name], full_range=True, fixed_range=None)
            elif readers.get(name) and all(reader.op_type == "Softmax" for reader in readers[name]):
                decided[name] = replace(decided[name], softmax_input=True)
    read_by_layers = {_root(name, decided) for name in layer_inputs.values()}  # stay 8-bit: integer kernels
    for root in {_root(name, decided) for name in normalized if name in decided} - read_by_layers:
        if root in decided:  # the quantizer it shares, if it shares one
            decided[root] = replace(decided[root], min_bits=NORMALIZED_BITS)
    for name in [name for name, decision in decided.items() if decision.softmax_input]:
        node = graph.node[producers[name]] if producers[name] >= 0 else None
        for operand in node.input if node is not None and node.op_type == "Add" else ():
            if operand in decided:
                root = _root(operand, decided)
                decided[root] = replace(decided[root], mask_operand=True)
    return Layout(decided, constants, {name: producers[name] for name in decided})


def _own_quantizer(non_negative: set[str], name: str, node: onnx.NodeProto | None, removed: dict,
                   initializers) -> TensorQuant:
    """The decision for a tensor with a quantizer of its own."""
    if node is None:
        return TensorQuant(name, name not in non_negative)
    removed_node = node.name if removed.get(node.input[0] if node.input else None) is node else None
    bounds = _clip_bounds(node, initializers) if node.op_type in REMOVABLE_OPS else None
    if bounds is not None and bounds[0] == 0.0:
        return TensorQuant(name, False, removed_node=removed_node, upper_bound=bounds[1])
    if bounds is not None and bounds[1] is not None and bounds[0] < 0.0 < bounds[1]:
        return TensorQuant(name, True, fixed_range=(bounds[0], bounds[1]))
    if node.op_type in OUTPUT_RANGES:
        low, high = OUTPUT_RANGES[node.op_type]
        return TensorQuant(name, low < 0, fixed_range=(low, high))
    return TensorQuant(name, name not in non_negative)


def _removable(node: onnx.NodeProto, producers, readers, outputs, initializers) -> bool:
    """A Relu, or Clip from 0 with constant bounds, that is its input's only reader."""
    if node.op_type not in REMOVABLE_OPS:
        return False
    source = node.input[0]
    bounds = _clip_bounds(node, initializers)
    return (bounds is not None and bounds[0] == 0.0 and producers.get(source, -1) >= 0
            and len(readers.get(source, [])) == 1 and source not in outputs)


def _normalized(graph: onnx.GraphProto, producers: dict[str, int]) -> set[str]:
    """The tensors a layer normalization reads (LayerNormalization's input, or x of x - ReduceMean(x)
    as exporters write it without that operator), and the terms of the Add making one: the
    residual stream and the branch added into it, whose layer writes the outlier channels first."""
    names = {node.input[0] for node in graph.node if node.op_type == "LayerNormalization"}
    for node in graph.node:
        if node.op_type == "Sub" and producers.get(node.input[1], -1) >= 0:
            mean = graph.node[producers[node.input[1]]]
            if mean.op_type == "ReduceMean" and mean.input[0] == node.input[0]:
                names.add(node.input[0])
    for name in list(names):
        producer = graph.node[producers[name]] if producers.get(name, -1) >= 0 else None
        if producer is not None and producer.op_type == "Add":
            names.update(producer.input)
    return names


def _root(name: str, decided: dict[str, TensorQuant]) -> str:
    """The tensor whose quantizer `name` takes over through shares (a constant ends the chain)."""
    while name in decided and decided[name].shares is not None:
        name = decided[name].shares
    return name


def _clip_bounds(node: onnx.NodeProto, initializers) -> tuple[float, float | None] | None:
    """(low, high) of a Relu (0, None) or of a Clip with constant bounds; None otherwise."""
    if node.op_type == "Relu":
        return 0.0, None
    bounds = []
    for position in (1, 2):
        name = node.input[position] if len(node.input) > position else ""
        if not name:
            bounds.append(None)
        elif name in initializers:
            bounds.append(float(onnx.numpy_helper.to_array(initializers[name])))
        else:
            return None
    low, high = bounds
    return (low, high) if low is not None else None


def _is_unit(node: onnx.NodeProto, layer_inputs: dict[str, str], initializers) -> bool:
    if node.op_type not in UNIT_OPS:
        return False
    if node.op_type in ("Conv", "Gemm"):
        return node.name in layer_inputs
    if node.op_type == "MatMul":  # a layer, or a product of two activations
        return node.name in layer_inputs or not any(name in initializers for name in node.input)
    return True


def _data_inputs(node: onnx.NodeProto, layer_inputs: dict[str, str]) -> list[str]:
    if node.name in layer_inputs:
        return [layer_inputs[node.name]]
    if node.op_type in ALL_INPUTS:
        return [name for name in node.input if name]
    positions = UNIT_OPS[node.op_type]
    return [node.input[p] for p in positions if p < len(node.input) and node.input[p]]


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors: inferred value_info, graph inputs and outputs, initializers."""
    infos = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    names = {vi.name for vi in infos if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names.update(t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return names


def wider_layer_outputs(model: onnx.ModelProto, layers: list[LayerSpec], layout: Layout, bits: int) -> list[str]:
    """The layers whose output the layout keeps wider than `bits` (the terms of a transformer's
    residual stream): QNN HTP takes no layer writing more bits than it reads."""
    writers, decided = {node.name: node.output[0] for node in model.graph.node}, layout.tensors
    return [layer.name for layer in layers
            if (root := _root(writers[layer.name], decided)) in decided and decided[root].min_bits > bits]
