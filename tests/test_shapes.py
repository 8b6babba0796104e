"""Input shapes: read from the model, parsed from text, made static."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import conv1d_conv3d_model, conv_model, dynamic_size_model
from onnx_bitsplit.errors import BitsplitError, ModelError
from onnx_bitsplit.shapes import (AS_GIVEN, DYNAMIC_BATCH, batching, input_shapes, named_shapes, parse_dims,
                                  parse_input_shape, parse_size, set_input_shapes)


def test_parse_dims_golden():
    assert parse_dims("1x3x224x224") == (1, 3, 224, 224)
    assert parse_dims("1X8") == (1, 8)
    assert parse_dims("7") == (7,)


@pytest.mark.parametrize("text", ["", "x", "1x", "1xx3", "0x3", "ax3", "-1x3", "1.5x3", "1 x 3", "1,3"])
def test_parse_dims_takes_positive_integers_only(text):
    with pytest.raises(BitsplitError, match=f"expected dimensions such as 1x3x224x224, got '{text}'"):
        parse_dims(text)


def test_parse_size_golden():
    assert parse_size("640x480") == (640, 480)
    assert parse_size("24X32") == (24, 32)


@pytest.mark.parametrize("text", ["640", "1x640x480", "axb", "640x0", ""])
def test_parse_size_takes_height_and_width(text):
    with pytest.raises(BitsplitError, match=f"expected HEIGHTxWIDTH such as 640x640, got '{text}'"):
        parse_size(text)


def test_parse_input_shape_golden():
    assert parse_input_shape("1x3x8x8") == ("", (1, 3, 8, 8))
    assert parse_input_shape("images=1x3x8x8") == ("images", (1, 3, 8, 8))
    assert parse_input_shape("a=b=1x2") == ("a=b", (1, 2))  # the last '=' separates: names may hold one
    with pytest.raises(BitsplitError, match="got 'x'"):
        parse_input_shape("images=x")


def test_named_shapes_golden():
    assert named_shapes([("", (1, 8))], ["x"]) == {"x": (1, 8)}
    assert named_shapes([("z", (1, 2)), ("x", (1, 4))], ["x", "z"]) == {"z": (1, 2), "x": (1, 4)}
    with pytest.raises(BitsplitError, match="the model has 2 inputs: give NAME=DIMS"):
        named_shapes([("", (1, 8))], ["x", "z"])


def test_input_shapes_and_batching():
    model = conv1d_conv3d_model()
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = -1  # as some exporters write a dynamic dim
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "default"))
    model.graph.input.append(helper.make_tensor_value_info("default", TensorProto.FLOAT, [3]))  # not a real input
    assert input_shapes(model) == {"x": [None, 4, 16], "z": [None, 2, 4, 6, 6]}
    assert batching(input_shapes(model)) == DYNAMIC_BATCH
    assert batching({"a": [4, 3], "b": [4, 3, 2]}) == 4
    assert batching({"a": [4, 3], "b": [2, 3]}) == AS_GIVEN  # no one batch size
    assert batching({"audio": [None, 64], "state": [2, None, 16]}) == AS_GIVEN  # a state's batch on axis 1
    assert batching({"audio": [1, 64], "rate": []}) == AS_GIVEN  # a 0-D input


def test_set_input_shapes_fixes_the_named_inputs_and_forgets_stale_output_shapes():
    model = dynamic_size_model()
    set_input_shapes(model, {"x": (2, 8, 10, 14)})
    assert input_shapes(model) == {"x": [2, 8, 10, 14]}
    assert not model.graph.output[0].type.tensor_type.HasField("shape")


@pytest.mark.parametrize("shape,message", [
    ({"y": (1, 8, 12, 12)}, "no input 'y' (inputs: x)"),
    ({"x": (1, 8, 12)}, "does not fit input 'x' of shape ?x8x12x12"),
    ({"x": (1, 9, 12, 12)}, "--input-shape: 1x9x12x12 does not fit"),
])
def test_set_input_shapes_refuses_what_does_not_fit(shape, message):
    with pytest.raises(ModelError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        set_input_shapes(conv_model(), shape)


def test_input_shape_makes_the_output_static(tmp_path, model_path, npy_dir, invoke):
    out = tmp_path / "q.onnx"
    result = invoke(model_path, out, "--calib", npy_dir, "--input-shape", "1x8x12x12", "--quiet")
    assert result.exit_code == 0, result.output
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 8, 12, 12]


@pytest.mark.parametrize("shape,text", [("1x8x12", "does not fit"), ("1x9x12x12", "does not fit"),
                                        ("ax8x12x12", "Invalid value for '--input-shape'"),
                                        ("y=1x8x12x12", "no input 'y'")])
def test_bad_input_shapes_are_one_line_errors(tmp_path, model_path, npy_dir, shape, text, invoke):
    result = invoke(model_path, tmp_path / "q.onnx", "--calib", npy_dir, "--input-shape", shape)
    assert result.exit_code != 0 and not (tmp_path / "q.onnx").exists()
    assert text in result.output and "Traceback" not in result.output, result.output
