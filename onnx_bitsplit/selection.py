"""Which layers are quantized, at how many bits, and which other nodes stay in float.

Patterns name nodes the way users see them: a node name, an fnmatch pattern over node names
('*depthwise*'), an operator type ('op:Gemm', 'op:Softmax'), or '@depthwise' for every depthwise
Conv. --bits-per-layer selects layers; --exclude any node. A pattern that selects nothing is an
error: a typo must not pass silently.
"""

from __future__ import annotations

import fnmatch

import onnx

from .config import QuantConfig
from .errors import BitsplitError
from .graph import LayerSpec

DEPTHWISE = "@depthwise"  # every depthwise Conv
OP_PREFIX = "op:"  # 'op:Gemm' selects by operator type


def matches(pattern: str, layer: LayerSpec | onnx.NodeProto) -> bool:
    """Whether a pattern (a name, an fnmatch pattern, 'op:TYPE' or '@depthwise') selects the layer
    or node (only a layer is depthwise)."""
    if pattern == DEPTHWISE:
        return isinstance(layer, LayerSpec) and layer.is_depthwise
    if pattern.startswith(OP_PREFIX):
        return pattern[len(OP_PREFIX):] == (layer.op if isinstance(layer, LayerSpec) else layer.op_type)
    return fnmatch.fnmatchcase(layer.name, pattern)


def exclude_layers(model: onnx.ModelProto, layers: list[LayerSpec], patterns: tuple[str, ...]) -> tuple[
        list[LayerSpec], list[tuple[str, str]], set[str]]:
    """The layers no pattern selects, (name, reason) of those kept in float because one does, and
    the names of the other nodes the patterns select (they run in float, outside node units).

    Raises:
        BitsplitError: for a pattern that selects no node.
    """
    layer_names = {layer.name for layer in layers}
    nodes = {node.name for node in model.graph.node for pattern in patterns
             if node.name not in layer_names and matches(pattern, node)}
    for pattern in patterns:
        if not any(matches(pattern, item) for item in [*layers, *model.graph.node]):
            raise BitsplitError(f"--exclude '{pattern}' selects no node (node names such as "
                                f"'{layers[0].name}', 'op:Conv', 'op:Softmax', '@depthwise')")
    kept, excluded = [], []
    for layer in layers:
        pattern = next((p for p in patterns if matches(p, layer)), None)
        if pattern is None:
            kept.append(layer)
        else:
            excluded.append((layer.name, f"excluded by '{pattern}'"))
    return kept, excluded, nodes


def override(config: QuantConfig, layer: LayerSpec) -> int | None:
    """layer_wbits for this layer: its exact name, else the first pattern that selects it."""
    if layer.name in config.layer_wbits:
        return config.layer_wbits[layer.name]
    return next((bits for pattern, bits in config.layer_wbits.items() if matches(pattern, layer)), None)


def layer_bits(config: QuantConfig, layers: list[LayerSpec], index: int) -> int:
    """Weight bits of layers[index]: an override by name or pattern, else first/last, else
    depthwise, else wbits."""
    bits = override(config, layers[index])
    if bits is not None:
        return bits
    if config.first_last_wbits is not None and index in (0, len(layers) - 1):
        return config.first_last_wbits
    if config.depthwise_wbits is not None and layers[index].is_depthwise:
        return config.depthwise_wbits
    return config.wbits


def check_overrides(config: QuantConfig, layers: list[LayerSpec]) -> None:
    """Raise BitsplitError for a --bits-per-layer pattern that selects no layer."""
    _check_used("--bits-per-layer", tuple(config.layer_wbits), layers)


def _check_used(option: str, patterns: tuple[str, ...], layers: list[LayerSpec]) -> None:
    for pattern in patterns:
        if not any(matches(pattern, layer) for layer in layers):
            raise BitsplitError(f"{option} '{pattern}' selects none of the {len(layers)} quantizable layers "
                                f"(node names such as '{layers[0].name}', 'op:Conv', '@depthwise')")
