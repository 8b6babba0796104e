"""What a conversion did: per-layer figures and phase times. summary() and to_json() are views.

The JSON (`--report`) is versioned: {"schema": 1, "tool": {"name", "version", "versions": {package:
version}}, "files": {role: path}, "sha256": {path: digest}, "options": {...QuantConfig},
"calibration": {how the samples were made}, "calibration_samples", "activation_bits",
"sizes": {"float_bytes", "quant_bytes"}, "memory": {"peak_rss_bytes", "spilled_bytes"},
"wall_seconds", "phase_seconds": {name: s}, "layers": [{name, op, bits, outputs, inputs, groups,
rel_error, rtn_rel_error, seconds, sensitivity, reason}], "skipped": [{name, reason}],
"activations": [{tensor, rel_error}], "equalized": [{producer, consumer, spread, note}],
"warnings": [line]}. A conversion that failed writes {"schema", "tool", "error": {"message",
"exit_code"}} instead. Non-finite numbers are written as null, so strict parsers read it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from . import __version__
from .qdq_format import ACTIVATION_BITS, weight_dtype

SCHEMA = 1
PACKAGES = ("onnx", "onnxruntime", "numpy")  # whose versions a record names besides this tool's
TIME_LINE_PHASES = 4  # the slowest phases named on the summary's time line; the rest as "other"
# A layer or tensor whose error is far above the rest is warned about (outliers): this many times
# the median, and above an absolute floor, so that a uniformly accurate model warns of nothing.
OUTLIER_FACTOR = {"layer": 5.0, "tensor": 10.0}
OUTLIER_FLOOR = {"layer": 0.05, "tensor": 0.01}
OUTLIERS_NAMED = 3


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
        activation_bits: the activations' integer width.
        phase_seconds: wall time per phase.
        float_bytes, quant_bytes: model sizes (with external data where there is some).
        peak_rss_bytes: the process's peak resident memory at the end of the conversion.
        spilled_bytes: stream tensors written to the work folder (past the memory budget).
        options: the options of the conversion (QuantConfig as a dict).
        files: the files a file-to-file conversion read and wrote (quantize_file), by role.
        sha256: the SHA-256 of each of those files (external data included), by path.
        calibration: how the calibration samples were made (calibration.describe()).
        wall_seconds: the conversion's wall time, end to end.
        warnings: what the user should know about the result (one line each).
    """

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    activations: dict[str, float] = field(default_factory=dict)
    equalized: list = field(default_factory=list)
    calibration_samples: int = 0
    activation_bits: int = 8
    phase_seconds: dict[str, float] = field(default_factory=dict)
    float_bytes: int = 0
    quant_bytes: int = 0
    peak_rss_bytes: int = 0
    spilled_bytes: int = 0
    options: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def summary(self, worst: int = 5) -> str:
        """A few lines for people."""
        bits = {}
        for layer in self.layers:
            bits[layer.bits] = bits.get(layer.bits, 0) + 1
        lines = [
            f"quantized {len(self.layers)} layers ("
            + ", ".join(f"{count} at W{b}" for b, count in sorted(bits.items())) + f"), "
            f"{len(self.activations)} activations at {self.activation_bits} bits, "
            f"from {self.calibration_samples} calibration samples",
            self._time_line(),
            f"size {_mib(self.float_bytes)} -> {_mib(self.quant_bytes)} "
            f"({100 * self.quant_bytes / max(self.float_bytes, 1):.1f}%)",
            f"peak memory {self.peak_rss_bytes / 2**30:.2f} GiB"
            + (f", {self.spilled_bytes / 2**30:.2f} GiB of tensors spilled to disk" if self.spilled_bytes else ""),
            self._runtimes_line(),
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
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)

    def _runtimes_line(self) -> str:
        """Where the file runs as integer kernels: QNN HTP runs every width; the CPU runtimes have no
        INT4 convolution kernel and run 16-bit activations in float."""
        storage = self.options.get("weight_storage", "int4")
        int4 = any(weight_dtype(layer.bits, storage) != np.int8 for layer in self.layers)
        if self.activation_bits > min(ACTIVATION_BITS):
            return "integer kernels on QNN HTP; onnxruntime CPU and OpenVINO run its 16-bit activations in float"
        if int4:
            return ("integer kernels on QNN HTP; onnxruntime CPU and OpenVINO run its INT4 layers in float "
                    "(--target cpu or openvino stores them as INT8)")
        return "integer kernels on onnxruntime CPU, OpenVINO and QNN HTP"

    def _time_line(self) -> str:
        """'time 74.1 s: statistics 44.0, capture 21.3, solve 6.2, scales 1.5, other 1.1' (< 100 columns)."""
        ranked = sorted(self.phase_seconds.items(), key=lambda item: -item[1])
        named, rest = ranked[:TIME_LINE_PHASES], ranked[TIME_LINE_PHASES:]
        parts = [f"{name.replace('activation_', '')} {seconds:.1f}" for name, seconds in named]
        if rest:
            parts.append(f"other {sum(seconds for _, seconds in rest):.1f}")
        return f"time {sum(self.phase_seconds.values()):.1f} s: " + ", ".join(parts)

    def to_json(self) -> str:
        """The versioned JSON of the module docstring."""
        document = {
            **record_header(),
            "files": self.files,
            "sha256": self.sha256,
            "options": self.options,
            "calibration": self.calibration,
            "calibration_samples": self.calibration_samples,
            "activation_bits": self.activation_bits,
            "sizes": {"float_bytes": self.float_bytes, "quant_bytes": self.quant_bytes},
            "memory": {"peak_rss_bytes": self.peak_rss_bytes, "spilled_bytes": self.spilled_bytes},
            "wall_seconds": self.wall_seconds,
            "phase_seconds": self.phase_seconds,
            "layers": [_layer_json(layer) for layer in self.layers],
            "skipped": [{"name": name, "reason": reason} for name, reason in self.skipped],
            "activations": [{"tensor": name, "rel_error": error} for name, error in self.activations.items()],
            "equalized": [asdict(pair) for pair in self.equalized],
            "warnings": self.warnings,
        }
        return json.dumps(finite_json(document), indent=2, allow_nan=False)


def record_header() -> dict:
    """What every JSON record starts with: its schema and the tool and library versions that made it."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"schema": SCHEMA, "tool": {"name": "onnx-bitsplit", "version": __version__, "versions": versions}}


def error_json(message: str, exit_code: int) -> str:
    """The record of a run that failed."""
    return json.dumps({**record_header(), "error": {"message": message, "exit_code": exit_code}}, indent=2)


def _layer_json(layer: LayerReport) -> dict:
    document = asdict(layer)
    outputs, inputs, groups = document.pop("shape")
    document.update(outputs=outputs, inputs=inputs, groups=groups,
                    sensitivity={str(bits): error for bits, error in layer.sensitivity.items()})
    return document


def finite_json(value):
    """The value with every non-finite float replaced by None, for strict JSON parsers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def printable(text: str) -> str:
    """Text from a model (node names) made safe for a terminal: control characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def clipped(text: str, width: int) -> str:
    """printable(text) in at most `width` characters, its end replaced by '…' when cut."""
    text = printable(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def outliers(layers: list[LayerReport], activations: dict[str, float], activation_bits: int) -> list[str]:
    """Warnings for the layers and tensors whose relative error stands far above the others',
    with the option that would keep more of them."""
    warnings, bits = [], {layer.name: layer.bits for layer in layers}
    for kind, errors in (("layer", {layer.name: layer.rel_error for layer in layers}), ("tensor", activations)):
        if not errors:
            continue
        median = sorted(errors.values())[len(errors) // 2]
        limit = max(OUTLIER_FACTOR[kind] * median, OUTLIER_FLOOR[kind])
        worst = sorted(((error, name) for name, error in errors.items() if error > limit), reverse=True)
        for error, name in worst[:OUTLIERS_NAMED]:
            if kind == "layer":
                fix = (f"--bits-per-layer '{name}=8' or " if bits[name] < 8 else "") + f"--exclude '{name}'"
                warnings.append(f"layer '{printable(name)}' (W{bits[name]}) keeps a relative output error of "
                                f"{error:.3f}, the median layer's {median:.3f}: {printable(fix)} may keep more")
            else:
                warnings.append(f"tensor '{printable(name)}' loses {error:.1%} to its quantizer, the median "
                                f"tensor {median:.1e}" + ("" if activation_bits >= 16 else ": --abits 16 keeps more"))
        if len(worst) > OUTLIERS_NAMED:
            warnings.append(f"and {len(worst) - OUTLIERS_NAMED} more {kind}s as far above the median")
    return warnings


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


class PhaseClock:
    """Wall time per phase into `seconds`; a phase entered inside another is not counted twice.
    `started(name)` is called when a phase is first entered outside any other."""

    def __init__(self, started=None):
        self.seconds: dict[str, float] = {}
        self.inner: list[float] = []
        self.started = started

    @contextmanager
    def __call__(self, name: str):
        if self.started is not None and not self.inner and name not in self.seconds:
            self.started(name)
        start = time.perf_counter()
        self.inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            own = elapsed - self.inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + own
            if self.inner:
                self.inner[-1] += elapsed
