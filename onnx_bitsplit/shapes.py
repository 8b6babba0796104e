"""A model's inputs and their shapes: read from the model in one place, parsed from text in one place.

A shape is a list with None for a dynamic dimension (a dim_param, or a dim_value of 0 or -1 as some
exporters write). The batch is axis 0 where every input has one (batching()).
"""

from __future__ import annotations

import onnx

from .errors import BitsplitError, ModelError
from .modelio import bodies

Shape = list  # of int, or None for a dynamic dimension


def input_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """The model's real inputs (initializers excluded): name -> shape."""
    initializers = {t.name for t in model.graph.initializer}
    return {i.name: [d.dim_value if d.dim_value > 0 else None for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in initializers}


DYNAMIC_BATCH, AS_GIVEN = "dynamic", "as given"  # batching(): besides a fixed batch size


def batching(shapes: dict[str, Shape]) -> str | int:
    """How samples group into runs (calibration.batch_feeds): DYNAMIC_BATCH when every input has a
    dynamic axis 0 (the batch: samples join along it); the batch size when every input fixes the
    same axis 0; AS_GIVEN otherwise (a 0-D input, a state with the batch on axis 1, inputs of
    different fixed sizes): a run is a feed as the user made it."""
    firsts = {shape[0] if shape else "scalar" for shape in shapes.values()}
    if firsts == {None}:
        return DYNAMIC_BATCH
    if len(firsts) == 1 and isinstance(next(iter(firsts)), int):
        return next(iter(firsts))
    return AS_GIVEN


def dynamic_inputs(model: onnx.ModelProto) -> list[str]:
    """The inputs with a dynamic dimension."""
    return [name for name, shape in input_shapes(model).items() if None in shape]


def parse_dims(text: str) -> tuple[int, ...]:
    """'1x3x224x224' -> (1, 3, 224, 224): positive integers only.

    Raises:
        BitsplitError: for anything else.
    """
    parts = text.lower().split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise BitsplitError(f"expected dimensions such as 1x3x224x224, got '{text}'")
    return tuple(int(p) for p in parts)


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480): an image's height and width."""
    try:
        dims = parse_dims(text)
    except BitsplitError:
        dims = ()
    if len(dims) != 2:
        raise BitsplitError(f"expected HEIGHTxWIDTH such as 640x640, got '{text}'")
    return dims


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'[NAME=]DIMS' -> (NAME or '', dims)."""
    name, _, dims = text.rpartition("=")
    return name, parse_dims(dims)


def named_shapes(shapes: list[tuple[str, tuple[int, ...]]], input_names: list[str]) -> dict[str, tuple[int, ...]]:
    """(NAME or '', dims) pairs -> {input name: dims}; no name stands for the model's only input."""
    named = {}
    for name, dims in shapes:
        if not name:
            if len(input_names) != 1:
                raise BitsplitError(f"the model has {len(input_names)} inputs: give NAME=DIMS")
            name = input_names[0]
        named[name] = dims
    return named


def misfit(shapes: dict[str, tuple[int, ...]], model_shapes: dict[str, Shape]) -> str | None:
    """Why static `shapes` do not fit a model's inputs (an unknown input, another rank, a clash
    with a fixed dimension), or None."""
    for name, shape in shapes.items():
        if name not in model_shapes:
            return f"the model has no input '{name}' (inputs: {', '.join(model_shapes)})"
        fixed = model_shapes[name]
        if len(shape) != len(fixed) or any(f is not None and f != s for f, s in zip(fixed, shape)):
            wanted = "x".join(str(f) if f else "?" for f in fixed)
            return f"{'x'.join(map(str, shape))} does not fit input '{name}' of shape {wanted}"
    return None


def set_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Make the named inputs static, in place; output shapes are left to inference.

    Raises:
        ModelError: when they do not fit (misfit()).
    """
    problem = misfit(shapes, input_shapes(model))
    if problem:
        raise ModelError(f"--input-shape: {problem}")
    inputs = {i.name: i for i in model.graph.input}
    for name, shape in shapes.items():
        for dim, size in zip(inputs[name].type.tensor_type.shape.dim, shape):
            dim.Clear()
            dim.dim_value = size
    for body in bodies(model.graph):  # stale dims, subgraphs' too, would clash with the inferred ones
        for output in body.output:
            if output.type.HasField("tensor_type"):
                output.type.tensor_type.ClearField("shape")
        del body.value_info[:]
