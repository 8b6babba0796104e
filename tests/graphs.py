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


def damaged(model: onnx.ModelProto, scale: float = -1.0) -> onnx.ModelProto:
    """A copy of the model with its first weight multiplied by `scale`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weight = copy.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * scale, weight.name))
    return copy


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


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def mobile_model(opset: int = 11) -> onnx.ModelProto:
    """
        x [N,4,10,10] -> Conv 3x3 (4->8) -> HardSwish as x*HardSigmoid(x)
          -> Conv 3x3 depthwise -> SiLU as x*Sigmoid(x) -> Resize x2 (nearest) -> a
        a -> Conv 1x1 (8->8) -> Clip(0, 6) with min/max inputs -> b
        Concat(a, b) -> BatchNormalization (after a Concat: stays, un-fused) -> Conv 1x1 (16->4)
          -> ConvTranspose 2x2 stride 2 (kept in float) -> y [N,4,40,40]
    Written at opset 11, as older exporters do.
    """
    rng = np.random.default_rng(0)
    init = [
        _const("w1", rng.normal(0, 0.3, (8, 4, 3, 3))), _const("b1", rng.normal(0, 0.1, 8)),
        _const("w2", rng.normal(0, 0.3, (8, 1, 3, 3))), _const("b2", rng.normal(0, 0.1, 8)),
        _const("w3", rng.normal(0, 0.3, (8, 8, 1, 1))), _const("b3", rng.normal(0, 0.1, 8)),
        _const("w4", rng.normal(0, 0.3, (4, 16, 1, 1))), _const("b4", rng.normal(0, 0.1, 4)),
        _const("wt", rng.normal(0, 0.3, (4, 4, 2, 2))),
        _const("gamma", rng.uniform(0.5, 1.5, 16)), _const("beta", rng.normal(0, 0.1, 16)),
        _const("mean", rng.normal(0, 0.1, 16)), _const("var", rng.uniform(0.5, 1.5, 16)),
        _const("zero", 0.0), _const("six", 6.0), _const("roi", []), _const("scales", [1, 1, 2, 2]),
    ]
    nodes = [
        helper.make_node("Conv", [INPUT, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("HardSigmoid", ["c1"], ["hs"], name="hardsigmoid"),
        helper.make_node("Mul", ["c1", "hs"], ["h1"], name="hardswish"),
        helper.make_node("Conv", ["h1", "w2", "b2"], ["c2"], name="depthwise", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Sigmoid", ["c2"], ["sg"], name="sigmoid"),
        helper.make_node("Mul", ["c2", "sg"], ["s2"], name="silu"),
        helper.make_node("Resize", ["s2", "roi", "scales"], ["a"], name="resize", mode="nearest"),
        helper.make_node("Conv", ["a", "w3", "b3"], ["c3"], name="pointwise"),
        helper.make_node("Clip", ["c3", "zero", "six"], ["b"], name="relu6"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("BatchNormalization", ["cat", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Conv", ["bn", "w4", "b4"], ["c4"], name="project"),
        helper.make_node("ConvTranspose", ["c4", "wt"], ["y"], name="upsample", strides=[2, 2]),
    ]
    graph = helper.make_graph(nodes, "mobile", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 4, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 40, 40])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def inverted_residual_model() -> onnx.ModelProto:
    """
        x [N,4,10,10] -> Conv 1x1 (4->8, rows scaled 0.1 to 1.5) -> Clip(0, 6) -> Pad 1
          -> Conv 3x3 depthwise -> Clip(0, 6) -> Conv 1x1 (8->4) -> Add(x) -> y
    A MobileNetV2/EfficientNet-Lite block, its channels' ranges spread as trained ones are.
    """
    rng = np.random.default_rng(0)
    init = [
        _const("w1", rng.normal(0, 0.5, (8, 4, 1, 1)) * np.geomspace(0.1, 1.5, 8).reshape(8, 1, 1, 1)),
        _const("b1", rng.normal(0, 0.1, 8)),
        _const("w2", rng.normal(0, 0.3, (8, 1, 3, 3))), _const("b2", rng.normal(0, 0.1, 8)),
        _const("w3", rng.normal(0, 0.3, (4, 8, 1, 1))), _const("b3", rng.normal(0, 0.1, 4)),
        _const("zero", 0.0), _const("six", 6.0),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Conv", [INPUT, "w1", "b1"], ["c1"], name="expand"),
        helper.make_node("Clip", ["c1", "zero", "six"], ["r1"], name="relu6_expand"),
        helper.make_node("Pad", ["r1", "pads"], ["p1"], name="pad"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="depthwise", group=8),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="relu6_depthwise"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="project"),
        helper.make_node("Add", ["c3", INPUT], ["y"], name="residual"),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 4, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 10, 10])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def conv1d_conv3d_model() -> onnx.ModelProto:
    """
        x [N,4,16] -> Conv1d k3 (4->8) -> Relu -> Conv1d k1 stride 2 (8->4) -> Flatten -> Gemm (32->6)
        z [N,2,4,6,6] -> Conv3d k3 (2->2, kept in float) -> w
    Two inputs and two outputs: calibration comes keyed by input name.
    """
    rng = np.random.default_rng(0)
    init = [_const("w1", rng.normal(0, 0.3, (8, 4, 3))), _const("w2", rng.normal(0, 0.3, (4, 8, 1))),
            _const("w3", rng.normal(0, 0.3, (6, 32))), _const("w4", rng.normal(0, 0.3, (2, 2, 3, 3, 3)))]
    nodes = [
        helper.make_node("Conv", [INPUT, "w1"], ["c1"], name="conv1d_a", pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv1d_b", strides=[2]),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3"], ["y"], name="gemm", transB=1),
        helper.make_node("Conv", ["z", "w4"], ["w"], name="conv3d", pads=[1, 1, 1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "conv1d_3d",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 4, 16]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N", 2, 4, 6, 6])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def matmul_left_model() -> onnx.ModelProto:
    """
        x [N,32,6] -> MatMul(W1 [24,32], x) -> Relu -> MatMul(W2 [16,24], .) -> y [N,16,6]
    The constant on the left: outputs run along the weight's rows.
    """
    rng = np.random.default_rng(0)
    init = {"w1": rng.normal(0, 0.3, (24, 32)), "w2": rng.normal(0, 0.3, (16, 24))}
    nodes = [helper.make_node("MatMul", ["w1", INPUT], ["m1"], name="left1"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["w2", "r1"], ["y"], name="left2")]
    return _model(nodes, init, ["N", 32, 6], ["N", 16, 6])


def dynamic_size_model() -> onnx.ModelProto:
    """conv_model() with dynamic height and width: x [N,8,H,W]."""
    model = conv_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    return model


def feeds_for(model: onnx.ModelProto, count: int, seed: int = 1, sizes=None) -> list[dict]:
    """Random feeds of batch 1 for every input; dynamic dims take the next of `sizes` (cycled)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for index in range(count):
        feed = {}
        for value in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            size = sizes[index % len(sizes)] if sizes else 8
            shape = [1] + [d if d is not None else size for d in dims[1:]]
            feed[value.name] = rng.normal(0, 1, shape).astype(np.float32)
        feeds.append(feed)
    return feeds


# op -> (extra inputs as initializers, attributes) for op_between_convs
BETWEEN = {
    "Relu": ({}, {}), "LeakyRelu": ({}, {"alpha": 0.1}), "Sigmoid": ({}, {}), "HardSigmoid": ({}, {}),
    "HardSwish": ({}, {}), "Tanh": ({}, {}), "Softmax": ({}, {"axis": 1}),
    "Clip": ({"low": np.float32(0.0), "high": np.float32(1.0)}, {}),
    "MaxPool": ({}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    "AveragePool": ({}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    "GlobalAveragePool": ({}, {}),
    "Resize": ({"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}, {"mode": "nearest"}),
    "Reshape": ({"shape": np.array([0, 4, 2, 32], np.int64)}, {}),
    "Transpose": ({}, {"perm": [0, 1, 3, 2]}),
    "Pad": ({"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}, {"mode": "reflect"}),
    "Add": ({}, {}), "Mul": ({}, {}), "Concat": ({}, {"axis": 1}),
    "Mul by constant": ({"factor": np.linspace(-1.0, 2.0, 64, dtype=np.float32).reshape(1, 1, 8, 8)}, {}),
    "Max": ({"floor": np.float32(-0.4)}, {}),  # tf2onnx's bounded LeakyRelu
    "Min": ({"ceiling": np.float32(0.5)}, {}),
}


def op_between_convs(op: str) -> onnx.ModelProto:
    """
        x [N,4,8,8] -> Conv 3x3 (4->4) -> c -> OP -> o -> Conv 1x1 (4 or 8 -> 4) -> y
    Add, Mul and Concat take (c, x): a residual, a gate, a skip connection; "Mul by constant"
    multiplies c by a spatial constant (a per-channel one would be folded into conv1).
    """
    rng = np.random.default_rng(0)
    constants, attrs = BETWEEN[op]
    op_type = op.split()[0]
    inputs = ["c", *constants] if op_type not in ("Add", "Mul", "Concat") or constants else ["c", INPUT]
    if op_type == "Clip":
        inputs = ["c", "low", "high"]
    width = 8 if op_type == "Concat" else 4
    init = {"w1": rng.normal(0, 0.3, (4, 4, 3, 3)), "b1": rng.normal(0, 0.1, 4),
            "w2": rng.normal(0, 0.3, (4, width, 1, 1)), "b2": rng.normal(0, 0.1, 4)}
    nodes = [
        helper.make_node("Conv", [INPUT, "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(op_type, inputs, ["o"], name="op", **attrs),
        helper.make_node("Conv", ["o", "w2", "b2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "between", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, None, None])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()]
        + [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def batch_in_constants_model() -> onnx.ModelProto:
    """
        x [1,4,8,8] -> Conv 3x3 -> Reshape [1, -1] -> Softmax -> Reshape [-1, 4, 8, 8] -> Conv 1x1 -> y
    A static batch of 1 written into a constant: several samples run at once would be mixed by the
    Softmax without any shape error.
    """
    rng = np.random.default_rng(0)
    init = {"w1": rng.normal(0, 0.3, (4, 4, 3, 3)), "w2": rng.normal(0, 0.3, (4, 4, 1, 1))}
    nodes = [
        helper.make_node("Conv", [INPUT, "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c1", "flat"], ["f"]),
        helper.make_node("Softmax", ["f"], ["s"], axis=-1),
        helper.make_node("Reshape", ["s", "back"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()]
        + [numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
           numpy_helper.from_array(np.array([-1, 4, 8, 8], np.int64), "back")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
