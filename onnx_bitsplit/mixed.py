"""Mixed precision under a size budget: bits per layer from measured sensitivities (pure Python).

Each layer has a measured relative output error at each candidate bit width and a storage cost
(INT4 up to 4 bits, INT8 above, plus one float scale per output channel). Starting from the
cheapest candidate everywhere, the allocation repeatedly takes the upgrade that removes the most
error per byte, as long as it still fits the budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """What one layer weighs: its weight count, output channels, and measured error per bits."""

    name: str
    weights: int
    rows: int
    errors: dict[int, float]


def storage_bytes(weights: int, rows: int, bits: int) -> int:
    """Bytes of a quantized weight: INT4 (bits <= 4) or INT8 values, packed, and float32 scales."""
    return (weights * (4 if bits <= 4 else 8) + 7) // 8 + 4 * rows


def allocate_bits(layers: list[LayerCost], budget: int) -> tuple[list[int], list[str]]:
    """Bits per layer with total storage within `budget` bytes, and a reason for each choice.

    Raises:
        ValueError: when even the cheapest bits everywhere exceed the budget.
    """
    options = [sorted(layer.errors) for layer in layers]
    choice = [0] * len(layers)
    spent = sum(storage_bytes(layer.weights, layer.rows, bits[0]) for layer, bits in zip(layers, options))
    if spent > budget:
        raise ValueError(f"the budget of {budget} bytes is below the smallest possible size, {spent} bytes")
    while True:
        best, best_rate = None, 0.0
        for index, layer in enumerate(layers):
            if choice[index] + 1 >= len(options[index]):
                continue
            now, after = options[index][choice[index]], options[index][choice[index] + 1]
            extra = storage_bytes(layer.weights, layer.rows, after) - storage_bytes(layer.weights, layer.rows, now)
            gain = layer.errors[now] - layer.errors[after]
            if spent + extra <= budget and gain > 0 and (extra <= 0 or gain / extra > best_rate):
                best, best_rate = index, float("inf") if extra <= 0 else gain / extra
        if best is None:
            break
        layer = layers[best]
        now, after = options[best][choice[best]], options[best][choice[best] + 1]
        spent += storage_bytes(layer.weights, layer.rows, after) - storage_bytes(layer.weights, layer.rows, now)
        choice[best] += 1
    bits = [options[index][c] for index, c in enumerate(choice)]
    reasons = [_reason(layer, b, options[i]) for i, (layer, b) in enumerate(zip(layers, bits))]
    return bits, reasons


def _reason(layer: LayerCost, bits: int, options: list[int]) -> str:
    errors = ", ".join(f"W{b}: {layer.errors[b]:.4f}" for b in options)
    return f"size budget: W{bits} (relative output error {errors})"
