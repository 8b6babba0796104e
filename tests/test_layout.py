"""The deployed layout: every quantized layer and every operator between them is a node unit
(DequantizeLinear on each data input, QuantizeLinear on the output), so runtimes fuse them into
integer kernels; onnxruntime's own optimizer is the judge where it has kernels."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphs import BETWEEN, INPUT, calibration_feeds, conv_model, gemm_model, inverted_residual_model, op_between_convs
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.layout import SAME_SCALE_OPS, plan_layout
from onnx_bitsplit.graph import find_layers, prepare


def optimized_ops(model, tmp_path) -> collections.Counter:
    """Op counts after onnxruntime's CPU optimizer (the level that fuses QDQ units)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


def links(model):
    producers = {output: node for node in model.graph.node for output in node.output}
    readers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    return producers, readers


def quantizer_params(model, node):
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return tuple(initializers[name].tobytes() for name in node.input[1:3])


def sqnr_db(model, quantized, feeds):
    run = lambda m: np.concatenate([ort.InferenceSession(m.SerializeToString()).run(None, f)[0] for f in feeds])
    reference, test = run(model), run(quantized)
    return 10 * np.log10((reference ** 2).sum() / ((reference - test) ** 2).sum())


def assert_node_units(quantized):
    """Every operator of the quantized graph but Q/DQ reads each float input through a
    DequantizeLinear (graph inputs included) and writes into QuantizeLinear only."""
    producers, readers = links(quantized)
    initializers = {t.name for t in quantized.graph.initializer}
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        data = [name for name in node.input[:1 if node.op_type in SAME_SCALE_OPS | {"Clip"} else None]
                if name and name not in initializers]
        assert data and all(producers[name].op_type == "DequantizeLinear" for name in data), node.name
        assert [r.op_type for r in readers[node.output[0]]] == ["QuantizeLinear"], node.name
        if node.op_type in SAME_SCALE_OPS:  # the output shares the input's quantizer bit for bit
            assert quantizer_params(quantized, readers[node.output[0]][0]) == \
                quantizer_params(quantized, producers[data[0]]), node.name


@pytest.mark.parametrize("op", sorted(BETWEEN))
def test_operator_between_layers_is_a_node_unit(op, tmp_path):
    model = op_between_convs(op)
    quantized, _ = quantize(model, calibration_feeds(model, 64), QuantConfig(wbits=8))
    assert_node_units(quantized)
    ops = {node.op_type for node in quantized.graph.node}
    if op in ("Relu", "Clip"):  # folded into conv1's quantizer, which saturates where they did
        assert op not in ops
        _, readers = links(quantized)
        q, = readers["c"]
        scale, zero_point = (onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer if t.name in q.input[1:])
        assert zero_point == 0 and (op == "Relu" or scale * 255 <= 1.0)
    else:
        assert op.split()[0] in ops or op == "HardSwish" and {"HardSigmoid", "Mul"} <= ops  # its function body
    assert sqnr_db(model, quantized, calibration_feeds(model, 4, seed=5)) > 20
    assert optimized_ops(quantized, tmp_path)["Conv"] == 0  # both layers run as QLinearConv


@pytest.mark.parametrize("build,fused", [
    (conv_model, {"QLinearConv": 3}),
    (gemm_model, {"QGemm": 2}),  # the second Gemm's alpha 0.5 and beta 2 are folded away
    (inverted_residual_model, {"QLinearConv": 3, "QLinearAdd": 1}),  # Pad folded into the Conv
])
def test_onnxruntime_runs_every_layer_as_an_integer_kernel(build, fused, tmp_path):
    model = build()
    quantized, _ = quantize(model, calibration_feeds(model, 16), QuantConfig(wbits=4, weight_storage="int8"))
    assert_node_units(quantized)
    ops = optimized_ops(quantized, tmp_path)
    assert not {"Conv", "Gemm", "MatMul", "Add", "Pad", "Clip", "Relu"} & set(ops), ops
    assert all(ops[op] == count for op, count in fused.items()), ops


def test_activations_are_unsigned_with_zero_point_zero_where_non_negative():
    model = inverted_residual_model()
    quantized, report = quantize(model, calibration_feeds(model, 16), QuantConfig(wbits=8))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    zero_points = {node.input[0]: initializers[node.input[2]] for node in quantized.graph.node
                   if node.op_type == "QuantizeLinear"}
    assert all(z.dtype == np.uint8 for z in zero_points.values())
    # after each Relu6 (folded: its quantizer reads the Conv output): no offset, as runtimes fuse it
    assert zero_points["c1"] == 0 and zero_points["c2"] == 0
    assert 0 < zero_points[INPUT] < 255 and 0 < zero_points["c3"] < 255  # signed: an offset


def test_layout_of_a_block():
    prepared = prepare(inverted_residual_model())
    layers, _ = find_layers(prepared)
    layout = plan_layout(prepared, layers)
    removed = {t.removed_node for t in layout.tensors.values() if t.removed_node}
    assert removed == {"relu6_expand", "relu6_depthwise"}
    assert all(t.upper_bound == 6.0 for t in layout.tensors.values() if t.removed_node)
    assert [t.signed for t in layout.tensors.values()] == [True, False, False, True, True]


def test_an_embedding_gather_shares_its_tables_quantizer_so_the_table_stays_integer(tmp_path):
    """Otherwise onnxruntime cannot drop the DequantizeLinear -> Gather -> QuantizeLinear pair and
    dequantizes the whole table on every run."""
    import kinds

    model = kinds.embedding_model()
    quantized, _ = quantize(model, kinds.feeds(model, 8), QuantConfig(wbits=8))
    producers, readers = links(quantized)
    (gather,) = [node for node in quantized.graph.node if node.op_type == "Gather"]
    (output_quantizer,) = readers[gather.output[0]]
    assert quantizer_params(quantized, producers[gather.input[0]]) == quantizer_params(quantized, output_quantizer)
    assert optimized_ops(quantized, tmp_path)["DequantizeLinear"] == 1  # the gathered rows' only
