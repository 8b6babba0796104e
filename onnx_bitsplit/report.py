"""What a conversion did: per-layer figures and phase times. summary() and to_json() are views."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LayerReport:
    """One quantized layer.

    Attributes:
        name, op: the node.
        bits: its weight bits.
        shape: (M, N, groups): outputs, inputs per group, groups.
        rel_error: response error ||Y - X~ Wqᵀ||² / ||Y||² on the calibration data after Bit-Split.
        rtn_rel_error: the same for round-to-nearest with the initial scales.
        seconds: time spent on this layer (capture, statistics, solve).
        sensitivity: relative output error at each candidate bit width, on float inputs (measured
            with a size budget).
        reason: why the layer has its bits, where a size budget chose them.
    """

    name: str
    op: str
    bits: int
    shape: tuple[int, int, int]
    rel_error: float
    rtn_rel_error: float
    seconds: float
    sensitivity: dict[int, float] = field(default_factory=dict)
    reason: str = ""


@dataclass
class Report:
    """A conversion's record.

    Attributes:
        layers: the quantized layers, in graph order.
        skipped: (name, reason) of Conv/Gemm/MatMul nodes left in float.
        activations: each quantized activation tensor's relative error ||x - Q(x)||² / ||x||² on the
            calibration values its scale was chosen on.
        equalized: the layer pairs cross-layer equalization changed (equalize.EqualizedPair).
        calibration_samples: samples the statistics were gathered on.
        phase_seconds: wall time per phase.
        float_bytes, quant_bytes: serialized model sizes.
    """

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    activations: dict[str, float] = field(default_factory=dict)
    equalized: list = field(default_factory=list)
    calibration_samples: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    float_bytes: int = 0
    quant_bytes: int = 0

    def summary(self, worst: int = 5) -> str:
        """A few lines for people."""
        bits = {}
        for layer in self.layers:
            bits[layer.bits] = bits.get(layer.bits, 0) + 1
        total = sum(self.phase_seconds.values())
        phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phase_seconds.items())
        lines = [
            f"quantized {len(self.layers)} layers ("
            + ", ".join(f"{count} at W{b}" for b, count in sorted(bits.items())) + f"), "
            f"{len(self.activations)} activations at 8 bits, from {self.calibration_samples} calibration samples",
            f"time {total:.1f}s ({phases})",
            f"size {_mib(self.float_bytes)} -> {_mib(self.quant_bytes)} "
            f"({100 * self.quant_bytes / max(self.float_bytes, 1):.1f}%)",
        ]
        if self.equalized:
            clips = sum(bool(pair.note) for pair in self.equalized)
            lines.append(f"equalized {len(self.equalized)} layer pairs (channel factors spread up to "
                         f"{max(pair.spread for pair in self.equalized):.0f}x"
                         + (f"; Clip bounds made per-channel in {clips}" if clips else "") + ")")
        if self.skipped:
            lines.append(f"kept in float: {len(self.skipped)} ("
                         + "; ".join(f"{printable(name)}: {reason}" for name, reason in self.skipped[:3])
                         + (" ..." if len(self.skipped) > 3 else "") + ")")
        if self.activations:
            name, error = max(self.activations.items(), key=lambda item: item[1])
            lines.append(f"worst activation by relative error: {printable(name)}: {error:.2e}")
        ranked = sorted(self.layers, key=lambda layer: layer.rel_error, reverse=True)[:worst]
        if ranked:
            lines.append("worst layers by relative output error (Bit-Split vs round-to-nearest):")
            lines += [f"  {printable(layer.name)} W{layer.bits}: {layer.rel_error:.4f} vs {layer.rtn_rel_error:.4f}"
                      for layer in ranked]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def printable(text: str) -> str:
    """Text from a model (node names) made safe for a terminal: control characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"
