"""Tiny float models built with onnx.helper, seeded, for the graph-level tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # below the output's 21, so every test also exercises the opset upgrade
INPUT = "x"


def _model(nodes, initializers, input_shape, output_shape, opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def conv_model(groups: int = 1, bias: bool = True) -> onnx.ModelProto:
    """
        x [N,8,12,12] -> Conv 3x3 (8->16) -> Relu -> Conv 3x3 (16->16, group=groups, stride 2)
          -> Relu -> Conv 1x1 (16->8) -> y
    """
    rng = np.random.default_rng(0)
    init = {"w1": rng.normal(0, 0.3, (16, 8, 3, 3)),
            "w2": rng.normal(0, 0.3, (16, 16 // groups, 3, 3)),
            "w3": rng.normal(0, 0.3, (8, 16, 1, 1))}
    if bias:
        init.update(b1=rng.normal(0, 0.1, 16), b2=rng.normal(0, 0.1, 16), b3=rng.normal(0, 0.1, 8))
    b = (lambda name: [name]) if bias else (lambda name: [])
    nodes = [
        helper.make_node("Conv", [INPUT, "w1", *b("b1")], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", *b("b2")], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         strides=[2, 2], group=groups),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", *b("b3")], ["y"], name="conv3"),
    ]
    return _model(nodes, init, ["N", 8, 12, 12], ["N", 8, 6, 6])


def conv_bn_model() -> onnx.ModelProto:
    """
        x [N,4,8,8] -> Conv 3x3 (4->8, no bias) -> BatchNormalization -> Relu -> Conv 1x1 (8->4) -> y
    The first weight comes from a Constant node through an Identity, as some exporters write it.
    """
    rng = np.random.default_rng(0)
    init = {"gamma": rng.uniform(0.5, 1.5, 8), "beta": rng.normal(0, 0.1, 8),
            "mean": rng.normal(0, 0.1, 8), "var": rng.uniform(0.5, 1.5, 8),
            "w2": rng.normal(0, 0.3, (4, 8, 1, 1))}
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32))
    nodes = [
        helper.make_node("Constant", [], ["w1_const"], name="w1_const", value=w1),
        helper.make_node("Identity", ["w1_const"], ["w1"], name="w1_identity"),
        helper.make_node("Conv", [INPUT, "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    return _model(nodes, init, ["N", 4, 8, 8], ["N", 4, 8, 8])


def gemm_model(trans_b: int = 1) -> onnx.ModelProto:
    """
        x [N,32] -> Gemm (32->24, transB) -> Relu -> Gemm (24->10, alpha 0.5, beta 2) -> y
    """
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (24, 32))
    w2 = rng.normal(0, 0.3, (10, 24))
    init = {"w1": w1 if trans_b else w1.T, "b1": rng.normal(0, 0.1, 24),
            "w2": w2 if trans_b else w2.T, "b2": rng.normal(0, 0.1, 10)}
    nodes = [
        helper.make_node("Gemm", [INPUT, "w1", "b1"], ["g1"], name="gemm1", transB=trans_b),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"], name="gemm2", transB=trans_b,
                         alpha=0.5, beta=2.0),
    ]
    return _model(nodes, init, ["N", 32], ["N", 10])


def matmul_model() -> onnx.ModelProto:
    """
        x [N,6,32] -> MatMul (32->24) -> Sigmoid -> MatMul (24->16) -> Add bias -> y
    """
    rng = np.random.default_rng(0)
    init = {"w1": rng.normal(0, 0.3, (32, 24)), "w2": rng.normal(0, 0.3, (24, 16)),
            "b2": rng.normal(0, 0.1, 16)}
    nodes = [
        helper.make_node("MatMul", [INPUT, "w1"], ["m1"], name="matmul1"),
        helper.make_node("Sigmoid", ["m1"], ["s1"], name="sigmoid1"),
        helper.make_node("MatMul", ["s1", "w2"], ["m2"], name="matmul2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add"),
    ]
    return _model(nodes, init, ["N", 6, 32], ["N", 6, 16])


def calibration_feeds(model: onnx.ModelProto, count: int = 32, seed: int = 1) -> list[dict]:
    """`count` random feeds of batch 1 for the model's only input."""
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{INPUT: rng.normal(0, 1, dims).astype(np.float32)} for _ in range(count)]


def image_model(size: int = 16) -> onnx.ModelProto:
    """
        x [N,3,size,size] -> Conv 3x3 (3->4) -> Relu -> Conv 1x1 (4->4) -> y
    A fixed-size RGB input, so image folders can calibrate it.
    """
    rng = np.random.default_rng(0)
    init = {"w1": rng.normal(0, 0.3, (4, 3, 3, 3)), "w2": rng.normal(0, 0.3, (4, 4, 1, 1))}
    nodes = [
        helper.make_node("Conv", [INPUT, "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    return _model(nodes, init, ["N", 3, size, size], ["N", 4, size, size])
