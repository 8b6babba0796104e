"""Mixed precision under a size budget: each layer's bits from its measured sensitivity.

Each layer is solved on float inputs at each candidate bit width (a few iterations), which gives
its relative output error there; its cost at each width is the bytes the writer stores
(qdq_format.weight_bytes). Starting from the cheapest candidate everywhere, the allocation
repeatedly takes the upgrade that removes the most error per byte, as long as it still fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .capture import NetworkStreams
from .config import QuantConfig
from .errors import BitsplitError
from .graph import LayerSpec
from .rows import RowConverter
from .selection import override
from .statistics import layer_statistics
from .store import BatchStore

BUDGET_BITS = (4, 8)  # INT4 holds 2 to 4 bits at one cost, INT8 5 to 8: a byte budget picks from these
SENSITIVITY_ITERATIONS = 3


@dataclass(frozen=True)
class LayerCost:
    """One layer's candidates: measured relative output error and stored bytes, by bits."""

    name: str
    errors: dict[int, float]
    sizes: dict[int, int]


def measure_sensitivities(model: onnx.ModelProto, layers: list[LayerSpec], batches, store: BatchStore,
                          weights: dict[str, np.ndarray], config: QuantConfig,
                          progress: Callable[[int], None]) -> list[dict[int, float]]:
    """Each layer's relative output error at each width of BUDGET_BITS, solved on float inputs
    (one float pass, a few iterations per solve); none for layers whose bits layer_wbits fixes."""
    streams = NetworkStreams(model, layers, batches, store, compensate=False, keep_inputs=True, seed=config.seed)
    convert = RowConverter()
    errors = []
    for index, layer in enumerate(layers):
        if override(config, layer) is not None:
            errors.append({})
        else:
            solver = layer_statistics(layer, streams, index, weights[layer.weight_name], blend=1.0,
                                      sample_rows=config.sample_rows, seed=config.seed, convert=convert)
            errors.append({bits: solver.solve(bits, iterations=SENSITIVITY_ITERATIONS, damping=config.damping).rel_error
                           for bits in BUDGET_BITS})
        params = {name: weights[name] for name in (layer.weight_name, layer.bias_name) if name}
        if index + 1 < len(layers):  # nothing after the last layer is measured
            streams.advance(index, float_params=params, quant_params=params)
        progress(index)
    return errors


def budget_bits(layers: list[LayerSpec], sensitivity: list[dict[int, float]], config: QuantConfig,
                budget: int) -> tuple[list[int], list[str]]:
    """Bits per layer whose stored weights fit `budget` bytes; layer_wbits overrides stay fixed."""
    costs = []
    for layer, errors in zip(layers, sensitivity):
        fixed = override(config, layer)
        errors = errors if fixed is None else {fixed: 0.0}
        costs.append(LayerCost(layer.name, errors, {bits: layer.stored_bytes(bits, config.weight_storage)
                                                    for bits in errors}))
    try:
        return allocate_bits(costs, budget)
    except ValueError as exc:
        raise BitsplitError(f"size budget {config.size_budget}: {exc}") from None


def allocate_bits(layers: list[LayerCost], budget: int) -> tuple[list[int], list[str]]:
    """Bits per layer with total size within `budget` bytes, and a reason for each choice.

    Raises:
        ValueError: when even the cheapest bits everywhere exceed the budget.
    """
    options = [sorted(layer.errors) for layer in layers]
    choice = [0] * len(layers)
    spent = sum(layer.sizes[bits[0]] for layer, bits in zip(layers, options))
    if spent > budget:
        raise ValueError(f"the budget of {budget} bytes is below the smallest possible size, {spent} bytes")
    while True:
        best, best_rate = None, 0.0
        for index, layer in enumerate(layers):
            if choice[index] + 1 >= len(options[index]):
                continue
            now, after = options[index][choice[index]], options[index][choice[index] + 1]
            extra = layer.sizes[after] - layer.sizes[now]
            gain = layer.errors[now] - layer.errors[after]
            if spent + extra <= budget and gain > 0 and (extra <= 0 or gain / extra > best_rate):
                best, best_rate = index, float("inf") if extra <= 0 else gain / extra
        if best is None:
            break
        layer = layers[best]
        now, after = options[best][choice[best]], options[best][choice[best] + 1]
        spent += layer.sizes[after] - layer.sizes[now]
        choice[best] += 1
    bits = [options[index][c] for index, c in enumerate(choice)]
    reasons = [_reason(layer, b, options[i]) for i, (layer, b) in enumerate(zip(layers, bits))]
    return bits, reasons


def _reason(layer: LayerCost, bits: int, options: list[int]) -> str:
    errors = ", ".join(f"W{b}: {layer.errors[b]:.4f}" for b in options)
    return f"size budget: W{bits} (relative output error {errors})"
