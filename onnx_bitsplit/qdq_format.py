"""The QDQ format: every rule the simulation (capture.py) and the writer (qdq.py) must agree on.

- Opset 21: the first with INT4 and per-axis DequantizeLinear; IR version 10, the first with INT4.
- Activations: per tensor, unsigned, uint8 or uint16 (runtimes fuse a node unit only when its
  input and output types agree, so one unsigned type serves every tensor; signed ones get a zero
  point). Weights: per output channel, symmetric, INT4 (2 to 4 bits, with INT4 storage) or INT8.
  Biases: INT32 on the grid input scale x weight scale, zero point 0.
- QuantizeLinear: q = saturate(round_half_even(x / scale) + zero_point) with x / scale in float32;
  DequantizeLinear: (q - zero_point) · scale in float32 (the ONNX specification at opset 21).
- Generated names: `{base}_{role}`, unique in the model (Names).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from .modelio import bodies

OPSET = 21
IR_VERSION = 10
ACTIVATION_BITS = (8, 16)
WEIGHT_STORAGE = ("int4", "int8")  # the first stores weights of 2 to 4 bits as INT4, the second every weight as INT8
FLOAT_BYTES = 4  # one float32 scale per output channel


@dataclass(frozen=True)
class ActivationQuant:
    """A chosen per-tensor quantizer: x ≈ scale · (clip(round(x / scale) + zero_point) - zero_point)
    in the unsigned integers of `bits` bits."""

    tensor_name: str
    scale: float
    zero_point: int = 0
    bits: int = 8

    @property
    def dtype(self) -> np.dtype:
        return activation_dtype(self.bits)


def activation_dtype(bits: int) -> np.dtype:
    """The integer type of an activation quantizer of `bits` bits: uint8 or uint16."""
    return np.dtype({8: np.uint8, 16: np.uint16}[bits])


def weight_dtype(bits: int, storage: str) -> np.dtype:
    """The integer type a weight of `bits` bits is stored in."""
    return np.dtype(ml_dtypes.int4 if bits <= 4 and storage == "int4" else np.int8)


def weight_bytes(count: int, rows: int, bits: int, storage: str) -> int:
    """Bytes of a stored weight: `count` integers of weight_dtype (INT4 packed two a byte) and one
    float32 scale for each of its `rows` output channels."""
    bits_each = 4 if weight_dtype(bits, storage) == ml_dtypes.int4 else 8
    return (count * bits_each + 7) // 8 + FLOAT_BYTES * rows


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integers of `bits` bits: [-2^(b-1), 2^(b-1) - 1] or [0, 2^b - 1]."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def round_to_grid(x: np.ndarray, scale, zero_point, low: int, high: int) -> np.ndarray:
    """clip(round_half_even(x / scale) + zero_point, low, high), in x's and scale's precision:
    QuantizeLinear before its cast, and the rounding the scale searches try candidates with."""
    return np.clip(np.rint(x / scale) + zero_point, low, high)


def quantize_linear(x: np.ndarray, scale, zero_point, dtype) -> np.ndarray:
    """QuantizeLinear: the integers of `x` in `dtype` (per tensor, or per channel with `scale` and
    `zero_point` shaped to broadcast against `x`)."""
    info = ml_dtypes.iinfo(dtype) if np.dtype(dtype) == ml_dtypes.int4 else np.iinfo(dtype)
    return round_to_grid(x, np.asarray(scale, np.float32), zero_point, int(info.min), int(info.max)).astype(dtype)


def dequantize_linear(q: np.ndarray, scale, zero_point) -> np.ndarray:
    """DequantizeLinear: (q - zero_point) · scale in float32."""
    return (q.astype(np.float32) - np.float32(zero_point)) * np.asarray(scale, np.float32)


def fake_quant(x: np.ndarray, quantizer: ActivationQuant) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) with an activation quantizer."""
    q = quantize_linear(x, quantizer.scale, quantizer.zero_point, quantizer.dtype)
    return dequantize_linear(q, quantizer.scale, quantizer.zero_point)


class Names:
    """Unique names for generated tensors and nodes, seeded with every name a model holds (nodes,
    tensors, subgraphs included), so that no generated name can collide with the user's."""

    def __init__(self, taken=()):
        self.taken = set(taken)

    @classmethod
    def of_model(cls, model: onnx.ModelProto) -> "Names":
        return cls(model_names(model.graph))

    def new(self, base: str, role: str) -> str:
        """`{base}_{role}`, or `{base}_{role}_{n}` with the first n that is free."""
        name = candidate = f"{base}_{role}"
        number = 0
        while name in self.taken:
            number += 1
            name = f"{candidate}_{number}"
        self.taken.add(name)
        return name


def model_names(graph: onnx.GraphProto) -> set[str]:
    """Every node and tensor name of a graph and of its subgraphs."""
    names = set()
    for body in bodies(graph):
        names.update(t.name for t in body.initializer)
        names.update(v.name for v in [*body.input, *body.output, *body.value_info])
        for node in body.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


@dataclass(frozen=True)
class QuantizerNames:
    """The generated names around one quantized tensor `tensor`."""

    tensor: str
    scale: str
    zero_point: str
    quantized: str  # QuantizeLinear's output (the integers)
    dequantized: str  # DequantizeLinear's output, where the tensor keeps its name for its producer
    float: str  # the producer's output, where the tensor's name goes to DequantizeLinear's output
    quantize_node: str
    dequantize_node: str
    output_dequantize_node: str  # a graph output's own DequantizeLinear, which keeps the output's name

    @classmethod
    def allocate(cls, names: Names, tensor: str) -> "QuantizerNames":
        return cls(tensor, *(names.new(tensor, role) for role in (
            "scale", "zero_point", "quantized", "dequantized", "float", "QuantizeLinear", "DequantizeLinear",
            "DequantizeLinear_output")))


def quantize_node(names: QuantizerNames, source: str) -> onnx.NodeProto:
    """QuantizeLinear of `source` into names.quantized."""
    return helper.make_node("QuantizeLinear", [source, names.scale, names.zero_point], [names.quantized],
                            name=names.quantize_node)


def dequantize_node(names: QuantizerNames, output: str, name: str | None = None,
                    axis: int | None = None) -> onnx.NodeProto:
    """DequantizeLinear of names.quantized into `output` (per axis with `axis`)."""
    attrs = {} if axis is None else {"axis": axis}
    return helper.make_node("DequantizeLinear", [names.quantized, names.scale, names.zero_point], [output],
                            name=name or names.dequantize_node, **attrs)


def quantizer_constants(names: QuantizerNames, scale, zero_point, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) as the arrays stored under names.scale and names.zero_point: float32,
    and one zero point of the integer type per scale."""
    scale = np.asarray(scale, np.float32)
    return scale, np.full(scale.shape, zero_point).astype(dtype)
