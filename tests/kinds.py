"""Tiny models of each kind users bring besides CNNs, built with onnx.helper and seeded: a BERT-style
encoder with a padding mask, a ViT block of static shape, a recurrent model with its states on axis 1,
an If and a Loop, a Sigmoid output of tiny values, an embedding lookup. Each comes with its feeds."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
WIDTH, HEADS, FFN = 32, 4, 64


def _constants(values: dict) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.asarray(v), k) for k, v in values.items()]


def _model(nodes, inputs, outputs, values, opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "kind", inputs, outputs, _constants(values))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _linear(rng, values: dict, name: str, x: str, n_in: int, n_out: int) -> list[onnx.NodeProto]:
    """x @ W + b, as exporters write a torch Linear on a 3-D input."""
    values[f"{name}_w"] = rng.normal(0, n_in ** -0.5, (n_in, n_out)).astype(np.float32)
    values[f"{name}_b"] = rng.normal(0, 0.05, n_out).astype(np.float32)
    return [helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_mm"], name=f"{name}/MatMul"),
            helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [name], name=f"{name}/Add")]


def _layer_norm(values: dict, name: str, x: str) -> list[onnx.NodeProto]:
    values[f"{name}_scale"] = np.ones(WIDTH, np.float32)
    values[f"{name}_bias"] = np.zeros(WIDTH, np.float32)
    return [helper.make_node("LayerNormalization", [x, f"{name}_scale", f"{name}_bias"], [name], name=name,
                             axis=-1, epsilon=1e-5)]


def _gelu(name: str, x: str) -> list[onnx.NodeProto]:
    """x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports GELU below opset 20."""
    return [helper.make_node("Div", [x, "sqrt2"], [f"{name}_d"]),
            helper.make_node("Erf", [f"{name}_d"], [f"{name}_e"]),
            helper.make_node("Add", [f"{name}_e", "one"], [f"{name}_a"]),
            helper.make_node("Mul", [x, f"{name}_a"], [f"{name}_m"]),
            helper.make_node("Mul", [f"{name}_m", "half"], [name])]


def _block(rng, values: dict, x: str, mask: str | None) -> list[onnx.NodeProto]:
    """A post-norm transformer block on x [B, L, WIDTH]; `mask` [B, 1, 1, L] is added to the scores."""
    head = WIDTH // HEADS
    values.update(heads=np.array([0, 0, HEADS, head], np.int64), merged=np.array([0, 0, WIDTH], np.int64),
                  scale=np.float32(head ** -0.5), sqrt2=np.float32(2 ** 0.5), one=np.float32(1.0),
                  half=np.float32(0.5))
    nodes = []
    for part in "qkv":
        nodes += _linear(rng, values, part, x, WIDTH, WIDTH)
        nodes += [helper.make_node("Reshape", [part, "heads"], [f"{part}_h"]),
                  helper.make_node("Transpose", [f"{part}_h"], [f"{part}_t"],
                                   perm=[0, 2, 3, 1] if part == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["q_t", "k_t"], ["scores"], name="attention/scores"),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"])]
    if mask is not None:
        nodes.append(helper.make_node("Add", ["scaled", mask], ["masked"], name="attention/mask"))
    nodes += [helper.make_node("Softmax", ["masked" if mask else "scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_t"], ["context"], name="attention/context"),
              helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", "merged"], ["context_m"])]
    nodes += _linear(rng, values, "out", "context_m", WIDTH, WIDTH)
    nodes += [helper.make_node("Add", ["out", x], ["residual1"])]
    nodes += _layer_norm(values, "norm1", "residual1")
    nodes += _linear(rng, values, "ffn1", "norm1", WIDTH, FFN)
    nodes += _gelu("gelu", "ffn1")
    nodes += _linear(rng, values, "ffn2", "gelu", FFN, WIDTH)
    nodes += [helper.make_node("Add", ["ffn2", "norm1"], ["residual2"])]
    nodes += _layer_norm(values, "norm2", "residual2")
    return nodes


VOCAB, TOKENS = 50, 12


def bert_model() -> onnx.ModelProto:
    """
        input_ids [B,L] -> Gather (word embeddings) + positions -> LayerNorm -> block -> hidden [B,L,32]
        attention_mask [B,L] -> (1 - mask) * finfo(float32).min -> [B,1,1,L], added to the scores
    The mask as HF transformers exports it: padded positions are -3.4e38, beyond float16.
    """
    rng = np.random.default_rng(0)
    values = {"words": rng.normal(0, 1, (VOCAB, WIDTH)).astype(np.float32),
              "positions": rng.normal(0, 0.2, (TOKENS, WIDTH)).astype(np.float32),
              "lowest": np.float32(np.finfo(np.float32).min), "axes": np.array([1, 2], np.int64)}
    nodes = [helper.make_node("Gather", ["words", "input_ids"], ["embedded"], name="embeddings/Gather"),
             helper.make_node("Add", ["embedded", "positions"], ["embedded_p"]),
             *_layer_norm(values, "embeddings", "embedded_p"),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mask_f"], ["inverted"]),
             helper.make_node("Mul", ["inverted", "lowest"], ["mask_l"]),
             helper.make_node("Unsqueeze", ["mask_l", "axes"], ["mask"]),
             *_block(rng, values, "embeddings", "mask")]
    nodes.append(helper.make_node("Identity", ["norm2"], ["hidden"]))
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", TOKENS])
              for name in ("input_ids", "attention_mask")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("hidden", TensorProto.FLOAT,
                                                                ["batch", TOKENS, WIDTH])], values)


def bert_feeds(count: int, seed: int = 1) -> list[dict]:
    """Sentences of 3 to TOKENS tokens, padded to TOKENS (mask 0 on the padding)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        length = int(rng.integers(3, TOKENS + 1))
        ids = np.zeros((1, TOKENS), np.int64)
        ids[0, :length] = rng.integers(1, VOCAB, length)
        feeds.append({"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})
    return feeds


def vit_model() -> onnx.ModelProto:
    """
        image [1,3,16,16] -> Conv 4x4/4 (patches) -> Reshape [1,32,16] -> Transpose -> Concat class token
          -> + positions -> block -> Gather token 0 -> Gemm -> logits [1,10]
    A static batch of 1 written into its constants, as a ViT exported at a fixed shape.
    """
    rng = np.random.default_rng(0)
    values = {"patch_w": rng.normal(0, 0.2, (WIDTH, 3, 4, 4)).astype(np.float32),
              "patch_b": np.zeros(WIDTH, np.float32),
              "flat": np.array([1, WIDTH, 16], np.int64),
              "class_token": rng.normal(0, 1, (1, 1, WIDTH)).astype(np.float32),
              "positions": rng.normal(0, 0.2, (1, 17, WIDTH)).astype(np.float32),
              "first": np.array(0, np.int64),
              "head_w": rng.normal(0, 0.2, (10, WIDTH)).astype(np.float32),
              "head_b": np.zeros(10, np.float32)}
    nodes = [helper.make_node("Conv", ["image", "patch_w", "patch_b"], ["patches"], name="patch", strides=[4, 4],
                              kernel_shape=[4, 4]),
             helper.make_node("Reshape", ["patches", "flat"], ["patches_f"]),
             helper.make_node("Transpose", ["patches_f"], ["tokens"], perm=[0, 2, 1]),
             helper.make_node("Concat", ["class_token", "tokens"], ["sequence"], axis=1),
             helper.make_node("Add", ["sequence", "positions"], ["embedded"]),
             *_block(rng, values, "embedded", None),
             helper.make_node("Gather", ["norm2", "first"], ["pooled"], axis=1),
             helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["logits"], name="head", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], values)


def image_feeds(count: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


HIDDEN = 16


def recurrent_model(cell: str = "LSTM") -> onnx.ModelProto:
    """A voice-activity detector as Silero's: audio [1,64] -> MatMul -> Relu -> LSTM (or GRU) one step
    with its state [2,1,16] (h and c; the batch on axis 1) -> MatMul -> Sigmoid -> probability [1,1],
    and the new state; the sample rate, a 0-D input, scales the audio."""
    rng = np.random.default_rng(0)
    gates = 4 if cell == "LSTM" else 3
    values = {"in_w": rng.normal(0, 0.2, (64, 32)).astype(np.float32),
              "cell_w": rng.normal(0, 0.3, (1, gates * HIDDEN, 32)).astype(np.float32),
              "cell_r": rng.normal(0, 0.3, (1, gates * HIDDEN, HIDDEN)).astype(np.float32),
              "cell_b": np.zeros((1, 2 * gates * HIDDEN), np.float32),
              "out_w": rng.normal(0, 0.3, (HIDDEN, 1)).astype(np.float32),
              "step": np.array([1, 1, 32], np.int64), "row": np.array([1, HIDDEN], np.int64),
              "rate": np.float32(16000.0), "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
              "two": np.array([2], np.int64)}
    nodes = [helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["sr_f", "rate"], ["gain"]),
             helper.make_node("Mul", ["audio", "gain"], ["scaled"]),
             helper.make_node("MatMul", ["scaled", "in_w"], ["features"], name="input/MatMul"),
             helper.make_node("Relu", ["features"], ["features_r"]),
             helper.make_node("Reshape", ["features_r", "step"], ["sequence"]),
             helper.make_node("Slice", ["state", "zero", "one"], ["h0"]),
             helper.make_node("Slice", ["state", "one", "two"], ["c0"])]
    if cell == "LSTM":
        nodes.append(helper.make_node("LSTM", ["sequence", "cell_w", "cell_r", "cell_b", "", "h0", "c0"],
                                      ["", "h1", "c1"], hidden_size=HIDDEN))
    else:
        nodes += [helper.make_node("GRU", ["sequence", "cell_w", "cell_r", "cell_b", "", "h0"], ["", "h1"],
                                   hidden_size=HIDDEN),
                  helper.make_node("Identity", ["c0"], ["c1"])]
    nodes += [helper.make_node("Concat", ["h1", "c1"], ["new_state"], axis=0),
              helper.make_node("Reshape", ["h1", "row"], ["h_row"]),
              helper.make_node("MatMul", ["h_row", "out_w"], ["logit"], name="output/MatMul"),
              helper.make_node("Sigmoid", ["logit"], ["probability"])]
    inputs = [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 64]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, HIDDEN]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [1, 1]),
               helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, 1, HIDDEN])]
    return _model(nodes, inputs, outputs, values)


def recurrent_feeds(count: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"audio": rng.normal(0, 1, (1, 64)).astype(np.float32),
             "state": rng.normal(0, 0.5, (2, 1, HIDDEN)).astype(np.float32),
             "sr": np.array(16000, np.int64)} for _ in range(count)]


def _branch(name: str, values: dict, rng) -> onnx.GraphProto:
    """A branch reading the outer tensor `hidden`: hidden @ W -> Relu."""
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), f"{name}_w")
    return helper.make_graph(
        [helper.make_node("MatMul", ["hidden", f"{name}_w"], [f"{name}_mm"], name=f"{name}/MatMul"),
         helper.make_node("Relu", [f"{name}_mm"], [f"{name}_out"])],
        name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)], [weight])


def if_model() -> onnx.ModelProto:
    """
        x [N,8] -> MatMul (8->16) -> hidden -> MatMul (16->8) -> middle
        If (mean(x) > 100: never on the data) then hidden @ W1 else hidden @ W2, each branch reading
        `hidden` from the outer graph, after the layer that reads it last in the outer graph
        -> + middle -> MatMul (8->4) -> y
    """
    rng = np.random.default_rng(0)
    values = {"w0": rng.normal(0, 0.3, (8, 16)).astype(np.float32),
              "w1": rng.normal(0, 0.3, (16, 8)).astype(np.float32),
              "w3": rng.normal(0, 0.3, (8, 4)).astype(np.float32), "limit": np.float32(100.0)}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["hidden"], name="first/MatMul"),
             helper.make_node("MatMul", ["hidden", "w1"], ["middle"], name="middle/MatMul"),
             helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             helper.make_node("Greater", ["mean", "limit"], ["condition"]),
             helper.make_node("If", ["condition"], ["chosen"], name="branch",
                              then_branch=_branch("then", values, rng), else_branch=_branch("else", values, rng)),
             helper.make_node("Add", ["chosen", "middle"], ["joined"]),
             helper.make_node("MatMul", ["joined", "w3"], ["y"], name="last/MatMul")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], values)


def if_only_model() -> onnx.ModelProto:
    """x [N,16] -> If (x.mean() > 100) then x @ W1 else x @ W2 -> y [N,8]: every layer in a branch."""
    rng = np.random.default_rng(0)
    values = {"limit": np.float32(100.0)}
    nodes = [helper.make_node("Identity", ["x"], ["hidden"]),
             helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             helper.make_node("Greater", ["mean", "limit"], ["condition"]),
             helper.make_node("If", ["condition"], ["y"], name="branch",
                              then_branch=_branch("then", values, rng), else_branch=_branch("else", values, rng))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], values)


def loop_model() -> onnx.ModelProto:
    """
        x [N,8] -> MatMul (8->8) -> Loop 3 times: state = Tanh(state @ W) with W a constant of the
        outer graph -> MatMul (8->4) -> y
    """
    rng = np.random.default_rng(0)
    values = {"w0": rng.normal(0, 0.3, (8, 8)).astype(np.float32),
              "loop_w": rng.normal(0, 0.3, (8, 8)).astype(np.float32),
              "w2": rng.normal(0, 0.3, (8, 4)).astype(np.float32),
              "trips": np.array(3, np.int64), "go": np.array(True)}
    body = helper.make_graph(
        [helper.make_node("Identity", ["go_in"], ["go_out"]),
         helper.make_node("MatMul", ["state_in", "loop_w"], ["step"], name="body/MatMul"),
         helper.make_node("Tanh", ["step"], ["state_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("state_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["start"], name="first/MatMul"),
             helper.make_node("Loop", ["trips", "go", "start"], ["final"], name="loop", body=body),
             helper.make_node("MatMul", ["final", "w2"], ["y"], name="last/MatMul")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], values)


def tiny_sigmoid_model() -> onnx.ModelProto:
    """
        x [N,16] -> Gemm (16->8) -> Relu -> Gemm (8->1, bias -11) -> Sigmoid -> score [N,1]
    A wake-word score: about 1e-5 to 1e-3 on the data, far below one step of a [0, 1] grid.
    """
    rng = np.random.default_rng(0)
    values = {"w1": rng.normal(0, 0.3, (8, 16)).astype(np.float32), "b1": np.zeros(8, np.float32),
              "w2": rng.normal(0, 0.3, (1, 8)).astype(np.float32), "b2": np.full(1, -9.0, np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="gemm1", transB=1),
             helper.make_node("Relu", ["g1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["g2"], name="gemm2", transB=1),
             helper.make_node("Sigmoid", ["g2"], ["score"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                  [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])], values)


def embedding_model() -> onnx.ModelProto:
    """
        ids [N,6] -> Gather (table 40x16) -> MatMul (16->8) -> y [N,6,8]
    """
    rng = np.random.default_rng(0)
    values = {"table": rng.normal(0, 1, (40, 16)).astype(np.float32),
              "w": rng.normal(0, 0.3, (16, 8)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["embedded"], name="embedding"),
             helper.make_node("MatMul", ["embedded", "w"], ["y"], name="project")]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])], values)


def feeds(model: onnx.ModelProto, count: int, seed: int = 1) -> list[dict]:
    """Random feeds of batch 1 for a model of float inputs (x) or token ids (ids)."""
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
    if value.type.tensor_type.elem_type == TensorProto.INT64:
        return [{value.name: rng.integers(0, 40, shape)} for _ in range(count)]
    return [{value.name: rng.normal(0, 1, shape).astype(np.float32)} for _ in range(count)]
