"""Graph preparation and the choice of layers to quantize.

prepare() turns a float model into the form the rest of the tool relies on: opset 21, input shapes
made static where asked, onnxruntime's basic offline optimizations applied (constant folding,
shape subgraphs included, Pad folded into Conv, Conv+Add/Mul/BatchNormalization fusion; standard
operators only), BatchNormalization folded into the Conv before it, an activation a Gemm adds (a
residual onnxruntime fused into it) split off into an Add, GELU written with Erf as one Gelu node,
every quantizable layer with a bias,
nodes named, topologically sorted, shapes inferred. find_layers() then returns a LayerSpec
for each Conv, Gemm and MatMul whose weight is a constant.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import version_converter

from .errors import ModelError, first_line
from .modelio import PROTOBUF_LIMIT, bodies, model_tensors, node_reads
from .patches import ConvGeometry, conv_patches, conv_positions, dense_patches
from .qdq_format import IR_VERSION, OPSET, Names, weight_bytes
from .shapes import set_input_shapes

log = logging.getLogger(__name__)

QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger",
    # onnxruntime's contrib operators (com.microsoft) on quantized data
    "MatMulNBits", "MatMulBnb4", "MatMulFpQ4", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QGemm",
    "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul", "GatherBlockQuantized",
}
QUANTIZED_PREFIXES = ("QLinear", "QOrdered")
# Ops whose output is non-negative whenever their first input is.
SIGN_PRESERVING_OPS = {
    "Pad", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
    "Transpose", "Identity", "Squeeze", "Unsqueeze", "Resize", "Upsample", "Slice", "Gather",
    "SpaceToDepth", "DepthToSpace",
}
RECURRENT_OPS = {"LSTM", "GRU", "RNN"}
FLOAT_LAYER_OPS = {"ConvTranspose", "Einsum", *RECURRENT_OPS}  # weighted, reported as kept in float
LAYER_OPS = {"Conv", "Gemm", "MatMul"}
# operators whose output size is set by inputs (at these positions) that are often computed from constants
SIZE_PARAMETERS = {"Range": (0, 1, 2), "ConstantOfShape": (0,), "Expand": (1,), "Tile": (1,)}
MAX_EVALUATED_NODES = 256  # the most nodes computed to learn a size: shape arithmetic is short
MAX_LOOP_ITERATIONS = 1 << 20  # a Loop's constant trip count above this would run a calibration for ever
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
NON_NEGATIVE_OPS = {"Relu", "Sigmoid", "Softmax", "HardSigmoid", "Abs", "Exp", "Softplus"}


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable layer.

    Attributes:
        name: the node's name (unique after prepare()).
        op: Conv, Gemm or MatMul.
        input_name: the activation tensor it reads.
        weight_name, bias_name: its initializers (bias_name is None for MatMul).
        weight_shape: the stored weight's shape.
        axis: the output-channel axis of the stored weight (the DequantizeLinear axis).
        geometry: Conv attributes; None for Gemm and MatMul.
        weight_index: the node input that holds the weight (0 for a constant-left MatMul).
    """

    name: str
    op: str
    input_name: str
    weight_name: str
    bias_name: str | None
    weight_shape: tuple[int, ...]
    axis: int
    geometry: ConvGeometry | None = None
    weight_index: int = 1

    @property
    def groups(self) -> int:
        return self.geometry.groups if self.geometry else 1

    @property
    def rows(self) -> int:
        """Output channels: the stored weight's size along `axis`, one scale each."""
        return self.weight_shape[self.axis]

    def stored_bytes(self, bits: int, storage: str) -> int:
        """Bytes of the weight as the writer stores it at `bits` (qdq_format.weight_bytes)."""
        return weight_bytes(int(np.prod(self.weight_shape)), self.rows, bits, storage)

    @property
    def is_depthwise(self) -> bool:
        """A grouped Conv with one output channel per group."""
        return self.groups > 1 and self.weight_shape[0] == self.groups

    def weight_matrix(self, stored: np.ndarray) -> np.ndarray:
        """Stored weight -> W (g, M/g, N), rows in output-channel order."""
        if self.geometry:
            return stored.reshape(self.groups, stored.shape[0] // self.groups, -1)
        return (stored.T if self.axis == 1 else stored)[None]

    def stored_weight(self, matrix: np.ndarray) -> np.ndarray:
        """W (g, M/g, N) -> the stored weight's layout."""
        if self.geometry:
            return matrix.reshape(self.weight_shape)
        return matrix[0].T if self.axis == 1 else matrix[0]

    def patches(self, x: np.ndarray, rows: np.ndarray | None = None, pad_value: float = 0) -> np.ndarray:
        """Layer input -> (g, R, N) patches, so that outputs are patches @ Wᵀ per group: the
        output rows `rows` (flat indices, below patch_count(x.shape)), or all of them; a Conv's
        padding reads `pad_value`."""
        if self.geometry:
            return conv_patches(self._as_2d(x), self.geometry, rows, pad_value)
        return dense_patches(x.swapaxes(-1, -2) if self.weight_index == 0 else x, rows)

    def patch_count(self, shape: tuple[int, ...]) -> int:
        """Patch rows (output positions) of an input of `shape`."""
        if self.geometry:
            return conv_positions(shape if len(shape) == 4 else (*shape[:2], 1, shape[2]), self.geometry)
        return int(np.prod(shape)) // shape[-2 if self.weight_index == 0 else -1]

    @staticmethod
    def _as_2d(x: np.ndarray) -> np.ndarray:
        """A Conv1d input as a Conv2d input of height 1."""
        return x if x.ndim == 4 else x[:, :, None, :]


def prepare(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None, *,
            max_bytes: int | None = None) -> onnx.ModelProto:
    """A copy of `model` in the canonical form described in the module docstring.

    Args:
        input_shapes: static shapes for some of the model's inputs (by name); each must have the
            input's rank and agree with its fixed dimensions.
        max_bytes: refuse a model any of whose tensors of known shape (constants to fold among
            them) would need more bytes than this.
    """
    refuse_unconvertible(model)
    if input_shapes:
        model = _copy(model)
        set_input_shapes(model, input_shapes)
    if max_bytes is not None:
        check_tensor_sizes(model, max_bytes)
    # onnxruntime's fusions list the opset versions they know: run them at the model's own opset
    try:
        optimized = _optimize(model)
    except ModelError as exc:
        if input_shapes:  # onnxruntime's inference of subgraphs can fail at static shapes only
            raise ModelError(f"at the shapes of --input-shape, {exc}") from None
        raise
    model, defaults = split_defaults(_to_opset(optimized))
    with gs.logger.G_LOGGER.suppress():  # its findings reach the user as our errors, or not at all
        graph = gs.import_onnx(model)
        names = Names.of_model(model)
        _name_nodes(graph, names)
        graph.fold_constants().cleanup().toposort()
        _fold_batch_norms(graph, names)
        _split_activation_biases(graph, names)
        _fuse_erf_gelus(graph, names)
        _fold_gemm_factors(graph, names)
        _add_missing_biases(graph, names)
        return merge_defaults(export(graph), defaults)


def constant_initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The initializers that are constants: not also graph inputs (ONNX's overridable defaults,
    which a caller may feed and which stay inputs of the output)."""
    inputs = {i.name for i in model.graph.input}
    return {t.name: t for t in model.graph.initializer if t.name not in inputs}


def split_defaults(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """(a copy of the model without its overridable defaults, those defaults): graphsurgeon
    takes an initializer for a constant and drops it from the inputs, so an edit through it
    sets them aside and merge_defaults() puts them back."""
    constants = constant_initializers(model)
    defaults = [t for t in model.graph.initializer if t.name not in constants]
    if not defaults:
        return model, []
    copy = _copy(model)
    kept = [t for t in copy.graph.initializer if t.name in constants]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    return copy, defaults


def merge_defaults(model: onnx.ModelProto, defaults: list[onnx.TensorProto]) -> onnx.ModelProto:
    """The model with the defaults split_defaults() set aside back among its initializers."""
    model.graph.initializer.extend(defaults)
    return model


def refuse_unconvertible(model: onnx.ModelProto) -> None:
    """Refuse, from the model alone, one this tool cannot convert: already quantized (anywhere:
    subgraphs and model-local functions included), without any Conv, Gemm or MatMul, or with a
    NaN float constant or an infinite weight or bias (non_finite_constant: it would make every
    scale and bias it reaches NaN).

    Raises:
        ModelError: saying which.
    """
    ops = set(_op_types(model))
    quantized = sorted(op for op in ops if op in QUANTIZED_OPS or op.startswith(QUANTIZED_PREFIXES))
    if quantized:
        raise ModelError(f"the model is already quantized (it has {', '.join(quantized)} nodes)")
    if not ops & LAYER_OPS:
        raise ModelError("the model has no Conv, Gemm or MatMul to quantize")
    name = non_finite_constant(model)
    if name is not None:
        raise ModelError(f"constant '{name}' has NaN or infinite values: the model's constants must be finite")
    trip_counts = {name: int(onnx.numpy_helper.to_array(tensor)) for tensor, name in model_tensors(model)
                   if tensor.data_type == onnx.TensorProto.INT64 and not tensor.dims}
    for node in _nodes(model):
        trips = trip_counts.get(node.input[0]) if node.op_type == "Loop" and node.input else None
        if trips is not None and trips > MAX_LOOP_ITERATIONS:
            raise ModelError(f"Loop '{node.name or node.output[0]}' runs {trips} iterations, over the "
                             f"{MAX_LOOP_ITERATIONS} a calibration run can afford")


def non_finite_constant(model: onnx.ModelProto) -> str | None:
    """The name of a float constant of the model (modelio.model_tensors) with a NaN, or with an
    infinite value that a layer reads (a weight or bias), or None. Other infinities are kept: -inf
    is the identity of a Max (jax's reductions start from it), the value of a mask."""
    layer_inputs = {name for node in _nodes(model) if node.op_type in LAYER_OPS | FLOAT_LAYER_OPS
                    for name in node.input}
    for tensor, name in model_tensors(model):
        if tensor.data_type in FLOAT_TYPES:
            values = onnx.numpy_helper.to_array(tensor)
            if np.isnan(values).any() or (name in layer_inputs and not np.isfinite(values).all()):
                return name
    return None


def _op_types(model: onnx.ModelProto):
    """The op type of every node (_nodes())."""
    return (node.op_type for node in _nodes(model))


def _nodes(model: onnx.ModelProto):
    """Every node: the graph's, its subgraphs' (If, Loop, Scan bodies) and its model-local functions'."""
    return (node for body in bodies(model.graph, *model.functions) for node in body.node)


def check_tensor_sizes(model: onnx.ModelProto, max_bytes: int) -> None:
    """Refuse a model that would allocate a tensor larger than max_bytes, before it does: a sparse
    initializer (made dense as the model loads), or a tensor of known static size (an activation
    at the input's size, a constant to fold: a 1 KB ConstantOfShape can ask for gigabytes).

    Raises:
        ModelError: naming the tensor and its size.
    """
    for sparse in model.graph.sparse_initializer:
        _check_size(sparse.values.name, list(sparse.dims), sparse.values.data_type, max_bytes)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference fails on odd models; onnxruntime then judges them
        return
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if tensor.HasField("shape") and None not in dims and tensor.elem_type:
            _check_size(value.name, dims, tensor.elem_type, max_bytes)
    _check_folded_sizes(model, max_bytes)


def _check_folded_sizes(model: onnx.ModelProto, max_bytes: int) -> None:
    """The tensors constant folding would build whose size onnx's inference cannot tell (a Range
    whose limit comes through a Cast): their size parameters, scalars and short shapes computed
    from constants, are computed (onnx's reference evaluator) and the size checked."""
    producers = {output: node for node in model.graph.node for output in node.output}
    evaluable = set(constant_initializers(model))  # computed from constants alone, by nodes that cannot be large
    for node in model.graph.node:  # in the topological order ONNX requires
        if (node.op_type not in SIZE_PARAMETERS and not any(a.HasField("g") or a.graphs for a in node.attribute)
                and all(not name or name in evaluable for name in node.input)):
            evaluable.update(node.output)
    for node in model.graph.node:
        positions = SIZE_PARAMETERS.get(node.op_type, ())
        names = [node.input[p] for p in positions if p < len(node.input) and node.input[p]]
        if names and all(name in evaluable for name in names):
            values = _evaluate(model, names, producers)
            try:
                size = 0.0 if values is None else _folded_size(node.op_type, values)
            except (ValueError, TypeError, OverflowError):  # not scalars, not finite: onnxruntime refuses the model
                size = 0.0
            _refuse_over(node.output[0], size, max_bytes)


def _evaluate(model: onnx.ModelProto, names: list[str], producers: dict) -> list[np.ndarray] | None:
    """The values of tensors computed from constants alone, or None if onnx's reference evaluator
    cannot compute them (onnxruntime judges the model then)."""
    from onnx.reference import ReferenceEvaluator

    needed, stack = {}, list(names)
    while stack and len(needed) <= MAX_EVALUATED_NODES:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed[id(node)] = node
            stack += [name for name in node.input if name]
    if len(needed) > MAX_EVALUATED_NODES:
        return None
    nodes = [node for node in model.graph.node if id(node) in needed]
    read = {name for node in nodes for name in node.input} | set(names)
    graph = onnx.helper.make_graph(nodes, "sizes", [], [onnx.helper.make_empty_tensor_value_info(n) for n in names],
                                   [t for t in model.graph.initializer if t.name in read])
    try:
        return ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=model.opset_import)).run(None, {})
    except Exception:  # an operator the reference evaluator lacks, or a model onnxruntime will refuse
        return None


def _folded_size(op: str, values: list[np.ndarray]) -> float:
    """Bytes of the output of `op` (SIZE_PARAMETERS) given its size parameters."""
    if op == "Range":
        start, limit, delta = (np.asarray(v).item() for v in values)
        count = max(math.ceil((limit - start) / delta), 0) if delta else 0
        return float(count) * np.asarray(values[0]).itemsize
    return float(np.prod(np.asarray(values[0], np.float64))) * 4  # at least 4 bytes a value of a float tensor


def _check_size(name: str, dims: list[int], elem_type: int, max_bytes: int) -> None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, ValueError, TypeError):  # a type numpy has no name for (strings): one byte a value at least
        itemsize = 1
    _refuse_over(name, float(np.prod(dims, dtype=np.float64)) * itemsize, max_bytes)


def _refuse_over(name: str, size: float, max_bytes: int) -> None:
    if size > max_bytes:
        raise ModelError(f"tensor '{name}' would need {size / 2**30:.2f} GiB, over the memory limit for one "
                         f"tensor, {max_bytes / 2**30:.2f} GiB (a quarter of --max-memory)")


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic-level offline optimizations (all of them produce standard operators),
    with the opset imports they add but do not use removed."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 4
    with tempfile.TemporaryDirectory(prefix="onnx-bitsplit-") as folder:
        source, target = Path(folder) / "model.onnx", Path(folder) / "optimized.onnx"
        onnx.save(model, source, save_as_external_data=model.ByteSize() > PROTOBUF_LIMIT,
                  location="model.data")
        options.optimized_model_filepath = str(target)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.data")
        try:
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        optimized = onnx.load(str(target))
    used = {node.domain or "" for node in optimized.graph.node}
    kept = [o for o in optimized.opset_import if (o.domain or "") in used | {"", "ai.onnx"}]
    del optimized.opset_import[:]
    optimized.opset_import.extend(kept)
    return optimized



def export(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model at IR_VERSION with shapes inferred where onnx can."""
    with gs.logger.G_LOGGER.suppress():
        model = gs.export_onnx(graph)
    model.ir_version = IR_VERSION
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # a model onnx cannot infer still runs; types come from the data
        log.warning("shape inference failed: %s", exc)
        return model


def _to_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise ModelError("the model imports no default-domain ONNX opset")
    if version >= OPSET:
        return model
    try:
        return version_converter.convert_version(model, OPSET)
    except Exception as exc:
        raise ModelError(f"cannot convert the model from opset {version} to {OPSET}: {exc}") from None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _name_nodes(graph: gs.Graph, names: Names) -> None:
    """Give every node a unique name: layers are addressed by name in options and reports."""
    seen = set()
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = names.new(node.name or node.op, str(index))
        seen.add(node.name)


def _fold_batch_norms(graph: gs.Graph, names: Names) -> None:
    """Conv -> BatchNormalization (inference form, constants) becomes one Conv."""
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        conv = bn.i() if bn.inputs[0].inputs else None
        params = bn.inputs[1:5]
        if (conv is None or conv.op != "Conv" or len(bn.inputs[0].outputs) != 1
                or not isinstance(conv.inputs[1], gs.Constant)
                or not all(isinstance(p, gs.Constant) for p in params)
                or len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant)
                or len([o for o in bn.outputs if o.outputs or o in graph.outputs]) > 1):
            continue
        gamma, beta, mean, var = (p.values.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        weight = conv.inputs[1].values
        bias = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros(weight.shape[0])
        new_weight = (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
        new_bias = ((bias - mean) * factor + beta).astype(weight.dtype)
        conv.inputs[1] = gs.Constant(names.new(conv.name, "weight_bn"), new_weight)
        bias_constant = gs.Constant(names.new(conv.name, "bias_bn"), new_bias)
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias_constant
        else:
            conv.inputs.append(bias_constant)
        conv.outputs = [bn.outputs[0]]
        bn.outputs.clear()
    graph.cleanup().toposort()


def _split_activation_biases(graph: gs.Graph, names: Names) -> None:
    """A Gemm with a constant weight that adds an activation (onnxruntime fuses MatMul + Add of a
    residual into one) as Gemm then Add: the layer keeps its weight quantizable."""
    for node in list(graph.nodes):
        if (node.op != "Gemm" or len(node.inputs) < 3 or not isinstance(node.inputs[1], gs.Constant)
                or isinstance(node.inputs[2], gs.Constant) or node.attrs.get("beta", 1.0) != 1.0):
            continue
        added, output = node.inputs.pop(2), node.outputs[0]
        product = gs.Variable(names.new(output.name, "product"), dtype=output.dtype)
        node.outputs = [product]
        graph.nodes.append(gs.Node("Add", names.new(node.name, "add"), inputs=[product, added], outputs=[output]))
    graph.toposort()


def _fuse_erf_gelus(graph: gs.Graph, names: Names) -> None:
    """x * 0.5 * (1 + erf(x / sqrt 2)), as exporters write GELU below opset 20, as one Gelu node:
    one node unit that QNN and OpenVINO run (QNN has no Erf) instead of five."""
    def constant(tensor, value) -> bool:
        return isinstance(tensor, gs.Constant) and tensor.values.size == 1 and np.isclose(
            float(tensor.values.ravel()[0]), value, rtol=1e-4)

    def other(node, tensor):  # a two-input node's other input
        return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]

    def only_reader(tensor, op):
        readers = tensor.outputs
        return readers[0] if len(readers) == 1 and readers[0].op == op else None

    for erf in [node for node in graph.nodes if node.op == "Erf"]:
        scaled = erf.inputs[0]
        divide = scaled.inputs[0] if len(scaled.inputs) == 1 else None
        if divide is None or divide.op not in ("Div", "Mul"):
            continue
        x = divide.inputs[1] if divide.op == "Mul" and isinstance(divide.inputs[0], gs.Constant) else divide.inputs[0]
        if not constant(other(divide, x), 2 ** 0.5 if divide.op == "Div" else 2 ** -0.5):
            continue
        plus_one = only_reader(erf.outputs[0], "Add")
        if plus_one is None or not constant(other(plus_one, erf.outputs[0]), 1.0):
            continue
        product = only_reader(plus_one.outputs[0], "Mul")
        if product is None:
            continue
        factor, last = other(product, plus_one.outputs[0]), only_reader(product.outputs[0], "Mul")
        half = factor.inputs[0] if len(factor.inputs) == 1 else None
        if half is not None and half.op == "Mul" and x in half.inputs and constant(other(half, x), 0.5):
            output = product.outputs[0]  # (x * 0.5) * (1 + erf)
        elif factor is x and last is not None and constant(other(last, product.outputs[0]), 0.5):
            output = last.outputs[0]  # (x * (1 + erf)) * 0.5
        else:
            continue
        producer = output.inputs[0]
        producer.outputs.clear()
        graph.nodes.append(gs.Node("Gelu", names.new(erf.name, "gelu"), inputs=[x], outputs=[output]))
    graph.cleanup().toposort()


def _fold_gemm_factors(graph: gs.Graph, names: Names) -> None:
    """Gemm's alpha into its constant weight and beta into its constant bias: integer kernels
    fuse a Gemm whose bias is added as it is (onnxruntime's QGemm wants beta = 1)."""
    for node in graph.nodes:
        constant = [isinstance(t, gs.Constant) for t in node.inputs[1:]]
        if node.op != "Gemm" or not constant or not all(constant):
            continue
        alpha, beta = node.attrs.pop("alpha", 1.0), node.attrs.pop("beta", 1.0)
        weight = node.inputs[1]
        node.inputs[1] = gs.Constant(names.new(node.name, "weight_alpha"), (weight.values * alpha).astype(weight.dtype))
        if len(node.inputs) > 2:  # a row [1, N] as a vector: a per-channel DequantizeLinear needs its axis
            bias = node.inputs[2]
            values = bias.values.reshape(-1) if bias.values.ndim == 2 and bias.values.shape[0] == 1 else bias.values
            node.inputs[2] = gs.Constant(names.new(node.name, "bias_beta"), (values * beta).astype(bias.dtype))
    graph.cleanup()


def _add_missing_biases(graph: gs.Graph, names: Names) -> None:
    """Zero biases for Conv and Gemm layers without one, so bias correction has a place to go."""
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm") or len(node.inputs) > 2 or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant):
            continue
        axis = 1 if node.op == "Gemm" and not node.attrs.get("transB", 0) else 0
        node.inputs.append(gs.Constant(names.new(node.name, "bias"), np.zeros(weight.shape[axis], np.float32)))
    graph.cleanup().toposort()


def find_layers(model: onnx.ModelProto) -> tuple[list[LayerSpec], list[tuple[str, str]]]:
    """The quantizable layers of a prepared model in topological order, and the (name, reason)
    of each weighted layer left in float."""
    initializers = constant_initializers(model)
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node_reads(node):
            uses[name] = uses.get(name, 0) + 1
    layers, skipped = [], []
    for node in model.graph.node:
        if node.op_type in FLOAT_LAYER_OPS:
            skipped.append((node.name, f"{node.op_type} is kept in float"))
        skipped += [(inner.name, f"inside {node.op_type} '{node.name}': control-flow bodies are kept in float")
                    for inner in _body_layers(node)]
        if node.op_type not in LAYER_OPS:
            continue
        weight_index = _weight_index(node, initializers)
        weight = initializers[node.input[weight_index]] if weight_index is not None else None
        reason = _unquantizable(node, weight, weight_index, initializers, uses)
        if reason:
            skipped.append((node.name, reason))
            continue
        layers.append(_layer_spec(node, weight, weight_index))
    return layers, skipped


def _body_layers(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The weighted layers inside a node's subgraphs (If branches, Loop and Scan bodies)."""
    return [inner for attribute in node.attribute
            for body in bodies(*([attribute.g] if attribute.HasField("g") else attribute.graphs))
            for inner in body.node if inner.op_type in LAYER_OPS | FLOAT_LAYER_OPS]


def _weight_index(node, initializers) -> int | None:
    """Which input is the constant weight: 1, or 0 for a MatMul whose left side is constant."""
    if len(node.input) > 1 and node.input[1] in initializers:
        return 1
    if node.op_type == "MatMul" and node.input[0] in initializers:
        return 0
    return None


def _unquantizable(node, weight, weight_index, initializers, uses) -> str | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if weight is None:
        return "weight is not a constant"
    if node.input[1 - weight_index] in initializers:
        return "input is a constant"
    if weight.data_type != onnx.TensorProto.FLOAT:
        return "weight is not float32"
    if not np.isfinite(onnx.numpy_helper.to_array(weight)).all():
        return "weight has NaN or infinite values"
    if uses[weight.name] > 1:
        return "weight is shared with other nodes"
    if node.op_type == "Conv" and len(weight.dims) not in (3, 4):
        return f"Conv{len(weight.dims) - 2}d is kept in float"
    if node.op_type != "Conv" and len(weight.dims) != 2:
        return "weight is not 2-D"
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        return "Gemm with transA=1 is kept in float"
    if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
        return "bias is not a constant"
    if len(node.input) > 2 and node.input[2] and not np.isfinite(onnx.numpy_helper.to_array(initializers[node.input[2]])).all():
        return "bias has NaN or infinite values"
    return None


def _layer_spec(node, weight, weight_index: int) -> LayerSpec:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    shape = tuple(weight.dims)
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        return LayerSpec(node.name, "Conv", node.input[0], weight.name, bias_name, shape, 0,
                         _conv_geometry(attrs, shape))
    if node.op_type == "Gemm":
        axis = 0 if attrs.get("transB", 0) else 1
        return LayerSpec(node.name, "Gemm", node.input[0], weight.name, bias_name, shape, axis)
    # MatMul: x @ W has its outputs along W's axis 1; W @ x along W's axis 0
    return LayerSpec(node.name, "MatMul", node.input[1 - weight_index], weight.name, None, shape,
                     axis=weight_index, weight_index=weight_index)


def _conv_geometry(attrs: dict, shape: tuple[int, ...]) -> ConvGeometry:
    """Conv attributes as 2-D geometry; a Conv1d is a Conv2d of height 1."""
    one_d = len(shape) == 3
    lift = (lambda values, pad: (pad, *values)) if one_d else (lambda values, pad: tuple(values))
    pads = attrs.get("pads", (0, 0) if one_d else (0, 0, 0, 0))
    return ConvGeometry(
        kernel=lift(shape[2:], 1),
        strides=lift(attrs.get("strides", (1,) * (len(shape) - 2)), 1),
        dilations=lift(attrs.get("dilations", (1,) * (len(shape) - 2)), 1),
        pads=(0, pads[0], 0, pads[1]) if one_d else tuple(pads),
        auto_pad=attrs.get("auto_pad", b"NOTSET").decode(),
        groups=attrs.get("group", 1),
    )


def non_negative_tensors(model: onnx.ModelProto) -> set[str]:
    """The tensors that are provably >= 0 (after Relu, Clip(min >= 0), ...), in one pass over the
    topologically sorted nodes."""
    initializers = constant_initializers(model)

    def constant_min(name: str) -> float | None:
        tensor = initializers.get(name)
        return None if tensor is None else float(onnx.numpy_helper.to_array(tensor).min())

    found = set()
    for node in model.graph.node:
        source = node.input[0] if node.input else ""
        if node.op_type in NON_NEGATIVE_OPS:
            positive = True
        elif node.op_type == "Clip":
            low = constant_min(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            positive = low is not None and low >= 0
        elif node.op_type in ("Max", "Min") and len(node.input) == 2:  # a constant bound, as equalize writes Clip
            bound = constant_min(node.input[1])
            positive = bound is not None and bound >= 0 and (node.op_type == "Max" or source in found)
        elif node.op_type == "Pad" and len(node.input) > 2 and node.input[2]:
            value = constant_min(node.input[2])
            positive = value is not None and value >= 0 and source in found
        else:
            positive = node.op_type in SIGN_PRESERVING_OPS and source in found
        if positive:
            found.update(node.output[:1])
    return found



def layer_work(model: onnx.ModelProto, layers: list[LayerSpec]) -> list[int]:
    """Each layer's multiply-accumulates per sample: weights x output positions (1 position where
    the output's shape is unknown)."""
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.value_info}
    outputs = {node.name: node.output[0] for node in model.graph.node}
    work = []
    for layer in layers:
        dims = shapes.get(outputs[layer.name], [])
        positions = int(np.prod([d for d in dims[2:] if d > 0])) if layer.geometry and dims else 1
        work.append(int(np.prod(layer.weight_shape)) * positions)
    return work
