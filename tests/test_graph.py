"""Graph preparation and layer discovery: the function kept, constants folded under names of their
own, the layers found in every kind of model, and models this tool cannot convert refused."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import (INPUT, calibration_feeds, conv1d_conv3d_model, conv_bn_model, conv_model, feeds_for, gemm_model,
                    matmul_left_model, matmul_model, mobile_model)
from onnx_bitsplit import QuantConfig, quantize
from onnx_bitsplit.errors import ModelError
from onnx_bitsplit.graph import find_layers, non_negative_tensors, prepare
from onnx_bitsplit.qdq_format import OPSET
from runs import model_sqnr_db


def run(model, feed):
    return ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]


@pytest.mark.parametrize("build", [conv_model, conv_bn_model, gemm_model, matmul_model])
def test_prepare_keeps_the_function(build):
    model = build()
    prepared = prepare(model)
    feed = calibration_feeds(model, count=1)[0]
    np.testing.assert_allclose(run(prepared, feed), run(model, feed), rtol=1e-4, atol=1e-5)
    assert prepared.opset_import[0].version == OPSET


def test_prepare_does_not_modify_its_input():
    model = conv_bn_model()
    before = model.SerializeToString()
    prepare(model)
    assert model.SerializeToString() == before


def test_batch_norm_and_constant_weights_are_folded():
    prepared = prepare(conv_bn_model())
    ops = [node.op_type for node in prepared.graph.node]
    assert "BatchNormalization" not in ops and "Constant" not in ops and "Identity" not in ops
    layers, skipped = find_layers(prepared)
    assert [layer.name for layer in layers] == ["conv1", "conv2"] and skipped == []
    assert all(layer.bias_name for layer in layers)  # a zero bias was added where none was


@pytest.mark.parametrize("trans_b,axis", [(1, 0), (0, 1)])
def test_gemm_layers_know_their_output_axis(trans_b, axis):
    prepared = prepare(gemm_model(trans_b))
    layers, _ = find_layers(prepared)
    assert [layer.axis for layer in layers] == [axis, axis]
    # alpha 0.5 and beta 2 of the second Gemm are folded into its weight and bias
    assert all({a.name for a in node.attribute} <= {"transA", "transB"} for node in prepared.graph.node)
    W = np.arange(24 * 32, dtype=np.float32).reshape((24, 32) if trans_b else (32, 24))
    matrix = layers[0].weight_matrix(W)
    assert matrix.shape == (1, 24, 32)
    np.testing.assert_array_equal(layers[0].stored_weight(matrix), W)


def test_grouped_conv_weight_matrix_round_trips():
    layers, _ = find_layers(prepare(conv_model(groups=4)))
    W = np.random.default_rng(0).normal(size=layers[1].weight_shape)
    matrix = layers[1].weight_matrix(W)
    assert matrix.shape == (4, 4, 4 * 9)
    np.testing.assert_array_equal(layers[1].stored_weight(matrix), W)


def test_non_negative_inputs_are_recognised():
    prepared = prepare(conv_model())
    layers, _ = find_layers(prepared)
    assert [layer.input_name in non_negative_tensors(prepared) for layer in layers] == [False, True, True]


def test_already_quantized_models_are_refused():
    model = conv_model()
    model.graph.node.append(helper.make_node("QuantizeLinear", ["y", "s"], ["yq"]))
    with pytest.raises(ModelError, match="already quantized"):
        prepare(model)


def test_non_constant_weights_are_kept_in_float():
    """
        x [N,4,4] -> MatMul(x, x) -> y     (no constant side: nothing to quantize)
    """
    graph = helper.make_graph([helper.make_node("MatMul", [INPUT, INPUT], ["y"], name="square")], "g",
                              [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, ["N", 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 4])])
    layers, skipped = find_layers(prepare(helper.make_model(graph)))
    assert layers == [] and skipped == [("square", "weight is not a constant")]


def test_generated_constants_are_named_after_their_node():
    """{node}_weight_alpha and {node}_bias_beta (Gemm factors folded), {node}_bias (a bias added),
    each unique in the model."""
    gemm = {t.name for t in prepare(gemm_model()).graph.initializer}
    assert {"gemm2_weight_alpha", "gemm2_bias_beta"} <= gemm and not {"w2", "b2"} & gemm
    model = conv_model(bias=False)
    model.graph.initializer[1].name = "conv2_bias"  # w2 takes the name conv2's added bias would get
    model.graph.node[2].input[1] = "conv2_bias"
    prepared = prepare(model)
    conv1, conv2, conv3 = [node for node in prepared.graph.node if node.op_type == "Conv"]
    assert (conv1.input[2], conv2.input[1:], conv3.input[2]) == ("conv1_bias", ["conv2_bias", "conv2_bias_1"],
                                                                 "conv3_bias")


# models this tool cannot convert

@pytest.mark.parametrize("size", ["folded", "output", "sparse", "range through a cast"])
def test_a_tiny_model_asking_for_gigabytes_is_refused_before_allocating(folder, size, run, snapshot, assert_refused):
    """A constant of 10 GB that folding would build (ConstantOfShape, summed), a graph output of
    400 MB from ConstantOfShape, a sparse initializer whose dense form is 400 MB, a Range of 800 MB
    whose limit comes through a Cast (onnx's inference cannot tell its size)."""
    model = conv_model()
    if size == "folded":
        model.graph.node.append(helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="big"))
        model.graph.node.append(helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0, name="sum"))
        model.graph.initializer.append(numpy_helper.from_array(np.array([50000, 50000], np.int64), "big_shape"))
        model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    elif size == "range through a cast":
        model.graph.initializer.extend([numpy_helper.from_array(np.array(1e8, np.float32), "limit_float"),
                                        numpy_helper.from_array(np.array(0, np.int64), "start"),
                                        numpy_helper.from_array(np.array(1, np.int64), "delta")])
        model.graph.node.extend([helper.make_node("Cast", ["limit_float"], ["limit"], to=TensorProto.INT64),
                                 helper.make_node("Range", ["start", "limit", "delta"], ["big"], name="range")])
        model.graph.output.append(helper.make_tensor_value_info("big", TensorProto.INT64, None))
    elif size == "output":
        model.graph.node.append(helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="big"))
        model.graph.initializer.append(numpy_helper.from_array(np.array([100_000_000], np.int64), "big_shape"))
        model.graph.output.append(helper.make_tensor_value_info("big", TensorProto.FLOAT, None))
    else:
        values = numpy_helper.from_array(np.ones(1, np.float32), "sparse")
        indices = numpy_helper.from_array(np.zeros(1, np.int64), "sparse_indices")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [100_000_000]))
    onnx.save(model, folder / "big.onnx")
    before = snapshot(folder)
    result = run(folder / "big.onnx", folder / "q.onnx", "--calib", folder / "calib.npy", "--max-memory", "128M")
    assert_refused(result, "over the memory limit", folder, before)


@pytest.mark.parametrize("where", ["subgraph", "contrib", "function"])
def test_quantized_operators_anywhere_are_refused(folder, where, run, snapshot, assert_refused):
    model = conv_model()
    if where == "function":  # a model-local function the graph calls
        model.functions.append(helper.make_function(
            "local", "requant", ["a", "s"], ["b"], [helper.make_node("QuantizeLinear", ["a", "s"], ["q"]),
                                                    helper.make_node("DequantizeLinear", ["q", "s"], ["b"])],
            [helper.make_opsetid("", 21)]))
        model.opset_import.append(helper.make_opsetid("local", 1))
        model.graph.node.append(helper.make_node("requant", ["y", "b1"], ["z"], domain="local"))
    elif where == "contrib":
        model.graph.node.append(helper.make_node("MatMulNBits", ["y", "w1"], ["z"], domain="com.microsoft", K=8, N=8,
                                                 bits=4, block_size=16))
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    else:
        branch = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["d"])], "branch", [],
                                   [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)])
        model.graph.node.append(helper.make_node("If", ["cond"], ["d"], then_branch=branch, else_branch=branch))
    onnx.save(model, folder / "q_in.onnx")
    before = snapshot(folder)
    assert_refused(run(folder / "q_in.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"),
                   "already quantized", folder, before)


@pytest.mark.parametrize("op", ["QuantizeLinear", "QLinearConv", "ConvInteger", "DynamicQuantizeLinear",
                                "MatMulInteger"])
def test_already_quantized_models_are_refused_by_the_command(folder, op, invoke, snapshot, assert_refused):
    model = conv_model()
    model.graph.node.append(helper.make_node(op, ["y"], ["extra"], name="quantized"))
    onnx.save(model, folder / "quantized.onnx", )
    before = snapshot(folder)
    result = invoke(folder / "quantized.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "already quantized", folder, before)


# models as users have them: each kind converts and runs in onnxruntime, close to float at W8

@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_mobile_block(opset):
    model = mobile_model(opset)
    quantized, report = quantize(model, feeds_for(model, 24), QuantConfig(wbits=8))
    assert quantized.opset_import[0].version == 21
    assert [layer.name for layer in report.layers] == ["conv1", "depthwise", "pointwise", "project"]
    assert ("upsample", "ConvTranspose is kept in float") in report.skipped
    assert model_sqnr_db(model, quantized, feeds_for(model, 6, seed=9)) > 25
    w4, _ = quantize(model, feeds_for(model, 24), QuantConfig(wbits=4))
    assert model_sqnr_db(model, w4, feeds_for(model, 6, seed=9)) > 8


def test_conv1d_quantized_conv3d_kept_two_inputs():
    model = conv1d_conv3d_model()
    quantized, report = quantize(model, feeds_for(model, 16), QuantConfig(wbits=8))
    assert [layer.name for layer in report.layers] == ["conv1d_a", "conv1d_b", "gemm"]
    assert report.skipped == [("conv3d", "Conv3d is kept in float")]
    held_out = feeds_for(model, 6, seed=9)
    assert model_sqnr_db(model, quantized, held_out, output=0) > 25
    assert model_sqnr_db(model, quantized, held_out, output=1) > 100  # float, untouched


def test_constant_on_the_left_of_matmul():
    model = matmul_left_model()
    quantized, report = quantize(model, feeds_for(model, 16), QuantConfig(wbits=8))
    assert [(layer.name, layer.shape) for layer in report.layers] == [("left1", (24, 32, 1)), ("left2", (16, 24, 1))]
    assert model_sqnr_db(model, quantized, feeds_for(model, 6, seed=9)) > 25


@pytest.mark.parametrize("where", ["used", "unused", "constant node"])
def test_a_non_finite_constant_is_refused_by_name(folder, where, run, snapshot, assert_refused):
    """A NaN constant is refused wherever it is, an infinite one where a layer reads it."""
    model = conv_model()
    if where == "used":
        bias = next(t for t in model.graph.initializer if t.name == "b1")
        bias.CopyFrom(numpy_helper.from_array(np.full(tuple(bias.dims), -np.inf, np.float32), "b1"))
    elif where == "unused":
        model.graph.initializer.append(numpy_helper.from_array(np.array([np.nan], np.float32), "spare"))
    else:
        model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
            np.array([1.0, np.nan], np.float32), "c_value")))
    onnx.save(model, folder / "bad.onnx")
    before = snapshot(folder)
    name = {"used": "b1", "unused": "spare", "constant node": "c_value"}[where]
    assert_refused(run(folder / "bad.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"),
                   f"constant '{name}' has NaN or infinite values", folder, before)


def test_an_initializer_that_is_a_graph_input_stays_an_input():
    """ONNX lets an initializer be an input too, a default the caller may override: the output
    keeps the input, and a layer reading it stays in float, with its reason."""
    model = gemm_model()
    bias = next(t for t in model.graph.initializer if t.name == model.graph.node[-1].input[2])
    model.graph.input.append(helper.make_tensor_value_info(bias.name, TensorProto.FLOAT, list(bias.dims)))
    quantized, report = quantize(model, calibration_feeds(model, 8), QuantConfig(wbits=8))
    assert bias.name in [i.name for i in quantized.graph.input]
    assert (model.graph.node[-1].name, "bias is not a constant") in report.skipped
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = calibration_feeds(model, 1)[0]
    shifted = session.run(None, {**feed, bias.name: numpy_helper.to_array(bias) + 1})[0]
    assert np.allclose(shifted - session.run(None, feed)[0], 2, atol=1e-4)  # the override is used (beta 2)


def test_a_loop_with_an_endless_constant_trip_count_is_refused(folder, run, snapshot, assert_refused):
    """A 1 KB model whose Loop runs 10^12 times would calibrate for ever: refused at once."""
    model = conv_model()
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["trips"], value=numpy_helper.from_array(
        np.array(10**12, np.int64))))
    model.graph.node.append(helper.make_node("Loop", ["trips", "", "y"], ["looped"], name="forever", body=body))
    model.graph.output.append(helper.make_tensor_value_info("looped", TensorProto.FLOAT, None))
    onnx.save(model, folder / "loop.onnx")
    before = snapshot(folder)
    assert_refused(run(folder / "loop.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"),
                   "Loop 'forever' runs 1000000000000 iterations", folder, before)


def gelu_model(form: str) -> onnx.ModelProto:
    """x [N,8] -> MatMul -> GELU with Erf, as torch writes it ("torch": (x * (1 + erf(x / √2))) * 0.5)
    or as a hand-written gelu ("bert": (x * 0.5) * (1 + erf(x * (1/√2)))) -> MatMul -> y."""
    rng = np.random.default_rng(0)
    half = [helper.make_node("Mul", ["h", "half"], ["h_half"])] if form == "bert" else []
    scaled = (helper.make_node("Mul", ["inv_sqrt2", "h"], ["d"]) if form == "bert"
              else helper.make_node("Div", ["h", "sqrt2"], ["d"]))
    product = (helper.make_node("Mul", ["h_half", "a"], ["g"]) if form == "bert"
               else helper.make_node("Mul", ["h", "a"], ["m"]))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"), *half, scaled,
             helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["a"]), product,
             *([] if form == "bert" else [helper.make_node("Mul", ["m", "half"], ["g"])]),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="second")]
    values = {"w1": rng.normal(0, 0.5, (8, 16)), "w2": rng.normal(0, 0.3, (16, 4)), "half": 0.5, "one": 1.0,
              "sqrt2": 2 ** 0.5, "inv_sqrt2": 2 ** -0.5}
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in values.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("form", ["torch", "bert"])
def test_an_erf_gelu_becomes_one_gelu_node(form):
    """One node unit QNN runs (it has no Erf), the same values."""
    model = gelu_model(form)
    prepared = prepare(model)
    ops = [node.op_type for node in prepared.graph.node]
    assert ops.count("Gelu") == 1 and "Erf" not in ops
    feeds = calibration_feeds(model, count=4)
    assert model_sqnr_db(model, prepared, feeds) > 100


def test_minus_infinity_as_a_maxs_start_is_kept():
    """jax2tf writes a reduction's start value, -inf, as a constant: Max(-inf, x) = x."""
    model = conv_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, np.float32), "start"))
    last = model.graph.node[-1]
    last.output[0] = "c3"
    model.graph.node.append(helper.make_node("Max", ["start", "c3"], ["y"]))
    feeds = calibration_feeds(model, count=8)
    quantized, _ = quantize(model, feeds, QuantConfig(wbits=8))
    assert model_sqnr_db(model, quantized, feeds) > 20
