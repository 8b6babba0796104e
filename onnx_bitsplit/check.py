"""Runtime accuracy check: a float model and its quantized version on the same inputs.

For every output: cosine similarity, SQNR = 10 log10(||y||² / ||y - y_q||²) in dB and the largest
absolute error over all its values (samples of different sizes included); for outputs shaped as
class scores ([batch, classes] or [batch, steps, classes]) argmax agreement, and top-1 accuracy
where labels are known; whether a quantized output is constant where the float one is not. Plus
each model's median latency per batch. The float model runs on onnxruntime's CPU provider, the
quantized one on the provider asked for (providers.py): there the report also says whether the
whole graph ran on it, which nodes did not and why, and how often its argmax agrees with the same
file on CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .calibration import as_feeds, batch_feeds
from .shapes import input_shapes
from .errors import BitsplitError, ModelError, first_line
from .providers import Placement, open_runner
from .report import clipped, finite_json, printable, record_header

NAME_WIDTH = 24  # an output's name in the table
FALLBACKS_LISTED = 10  # nodes that did not run on the provider, named in the table


@dataclass(frozen=True)
class OutputComparison:
    """One output of the two models over all samples.

    Attributes:
        name: the output's name.
        agreement: fraction of samples (or steps) whose argmax over the last axis is the same;
            None where the output is not shaped as class scores (a map, boxes, a 4-D tensor).
        top1_float, top1_quant: accuracy against the labels, or None without labels.
        cosine: cosine similarity of the outputs, all samples flattened into one vector (a
            per-sample average would be noise for outputs that are near zero on most samples).
        sqnr_db: signal-to-quantization-noise ratio over all values (inf when identical).
        max_abs_error: the largest |y - y_q|.
        finite: both models' outputs are finite; when not, the figures mean nothing and the
            check fails whatever its thresholds.
        constant: the quantized output is one value on every sample where the float one is not
            (a collapsed quantizer): the check fails whatever its thresholds.
    """

    name: str
    agreement: float | None
    top1_float: float | None
    top1_quant: float | None
    cosine: float
    sqnr_db: float
    max_abs_error: float
    finite: bool = True
    constant: bool = False


@dataclass
class CheckReport:
    """The comparison of two models on one data set."""

    samples: int
    batch_size: int = 1
    outputs: list[OutputComparison] = field(default_factory=list)
    latency_ms_float: float = 0.0
    latency_ms_quant: float = 0.0
    placement: Placement = field(default_factory=lambda: Placement("cpu"))
    provider_agreement: float | None = None
    files: dict[str, str] = field(default_factory=dict)  # role -> path, where the command knows them
    sha256: dict[str, str] = field(default_factory=dict)  # path -> digest of each model file compared

    def table(self) -> str:
        """A readable table for people."""
        provider = self.placement.provider
        lines = [f"{self.samples} samples in batches of {self.batch_size}; median latency per batch: "
                 f"float {self.latency_ms_float:.2f} ms (cpu), quantized {self.latency_ms_quant:.2f} ms ({provider})"]
        if provider != "cpu":
            lines.append(f"{provider}: " + ("the whole graph ran there" if self.placement.whole else
                                            self.placement.shortfall())
                         + f"; argmax agreement with the same model on cpu {100 * self.provider_agreement:.1f}%")
            fallbacks = self.placement.fallbacks
            lines += [f"  {printable(op)} {printable(name)}: {printable(reason)}"
                      for op, name, reason in fallbacks[:FALLBACKS_LISTED]]
            if len(fallbacks) > FALLBACKS_LISTED:
                lines.append(f"  and {len(fallbacks) - FALLBACKS_LISTED} more")
            if self.placement.log_lines:
                lines.append(f"{provider} printed {self.placement.log_lines} lines while running, such as:")
                lines += [f"  {clipped(line, 96)}" for line in self.placement.log_sample]
        lines += [
                 f"{'output':<{NAME_WIDTH}} {'agree':>7} {'top-1 float':>11} {'top-1 quant':>11} {'cosine':>8} "
                 f"{'SQNR dB':>8} {'max |err|':>10}"]
        for o in self.outputs:
            top1 = [f"{100 * v:10.1f}%" if v is not None else f"{'-':>11}" for v in (o.top1_float, o.top1_quant)]
            agree = f"{100 * o.agreement:6.1f}%" if o.agreement is not None else f"{'-':>7}"
            lines.append(f"{clipped(o.name, NAME_WIDTH):<{NAME_WIDTH}} {agree} {top1[0]} {top1[1]} "
                         f"{o.cosine:8.4f} {o.sqnr_db:8.2f} {o.max_abs_error:10.4g}")
        return "\n".join(lines)

    def to_json(self, **gates) -> str:
        """Versioned, strict JSON: {"schema": 1, "tool", "thresholds", "passed", "failures",
        "samples", "batch_size", "outputs": [...], "latency_ms_float", "latency_ms_quant",
        "placement", "provider_agreement", "files", "sha256"}; non-finite numbers (the SQNR of
        identical outputs) are null."""
        failures = self.failures(**gates)
        thresholds = {gate: gates.get(gate) for gate in ("min_agree", "min_cosine", "min_sqnr")}
        document = {**record_header(), "thresholds": thresholds,
                    "passed": not failures, "failures": failures, **asdict(self)}
        return json.dumps(finite_json(document), indent=2, allow_nan=False)

    def failures(self, *, min_agree: float | None = None, min_cosine: float | None = None,
                 min_sqnr: float | None = None) -> list[str]:
        """One line for each output below a gate, non-finite or collapsed to a constant."""
        failed = []
        if not self.placement.whole:
            failed.append(self.placement.shortfall())
        if min_agree is not None and all(o.agreement is None for o in self.outputs):
            failed.append("--min-agree: no output is shaped as class scores, argmax agreement does not apply "
                          "(gate on --min-cosine or --min-sqnr)")
        for o in self.outputs:
            if not o.finite:
                failed.append(f"output '{printable(o.name)}': not finite (NaN or infinite values)")
                continue
            if o.constant:
                failed.append(f"output '{printable(o.name)}': the quantized model's is constant, the float model's "
                              "is not")
            if min_agree is not None and o.agreement is not None and o.agreement < min_agree:
                failed.append(f"output '{printable(o.name)}': agreement {o.agreement:.4f} < {min_agree}")
            if min_cosine is not None and o.cosine < min_cosine:
                failed.append(f"output '{printable(o.name)}': cosine {o.cosine:.4f} < {min_cosine}")
            if min_sqnr is not None and o.sqnr_db < min_sqnr:
                failed.append(f"output '{printable(o.name)}': SQNR {o.sqnr_db:.2f} dB < {min_sqnr} dB")
        return failed


def compare(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, feeds, *,
            labels: list[int] | None = None, batch_size: int = 16, count: int | None = None,
            provider: str = "cpu") -> CheckReport:
    """Run both models on the same feeds and compare their outputs.

    Args:
        float_model, quant_model: models with the same inputs and outputs.
        feeds: a CalibrationDataReader or an iterable of {input_name: ndarray}.
        labels: the class of each sample, in order, for top-1 accuracy. Defaults to the reader's
            own (ImageFolderReader.labels(): from file names such as 042_name.jpg), if any.
        batch_size: samples run at once where the batch axis is dynamic.
        count: use at most this many samples. Defaults to all.
        provider: where the quantized model runs (providers.PROVIDERS).
    """
    if labels is None and callable(getattr(feeds, "labels", None)):
        labels = feeds.labels()
    float_shapes, shapes = input_shapes(float_model), input_shapes(quant_model)  # the quantized one may be static
    if float_shapes.keys() != shapes.keys():
        raise ModelError("the two models have different inputs")
    grouped = list(batch_feeds(as_feeds(feeds), shapes, batch_size=batch_size, count=count or 2**62))
    batches = [batch for batch, _ in grouped]
    float_run, float_ms = _run(_load(float_model, "cpu"), batches)
    runner = _load(quant_model, provider)
    quant_run, quant_ms = _run(runner, batches)
    if [name for name, _ in float_run] != [name for name, _ in quant_run]:
        raise ModelError("the two models have different outputs")
    samples = sum(size for _, size in grouped)
    if labels is not None and len(labels) < samples:
        raise ModelError(f"{len(labels)} labels for {samples} samples")
    report = CheckReport(samples, batch_size=max(size for _, size in grouped),
                         latency_ms_float=float_ms, latency_ms_quant=quant_ms, placement=runner.placement)
    if provider != "cpu":
        cpu_run, _ = _run(_load(quant_model, "cpu"), batches)
        report.provider_agreement = float(np.mean(np.concatenate(
            [(a.argmax(-1) == b.argmax(-1)).ravel() for a, b in zip(cpu_run[0][1], quant_run[0][1])])))
    for (name, y), (_, y_q) in zip(float_run, quant_run):
        report.outputs.append(compare_output(name, y, y_q, None if labels is None else np.asarray(labels[:samples])))
    return report


def compare_output(name: str, y: list[np.ndarray], y_q: list[np.ndarray],
                   labels: np.ndarray | None) -> OutputComparison:
    """The figures of one output; y and y_q hold its value on each batch (their sizes may differ)."""
    flat, flat_q = (np.concatenate([part.astype(np.float64).ravel() for part in parts]) for parts in (y, y_q))
    if not (np.isfinite(flat).all() and np.isfinite(flat_q).all()):
        return OutputComparison(name, None, None, None, float("nan"), float("nan"), float("nan"), finite=False)
    noise = ((flat - flat_q) ** 2).sum()
    norms = np.linalg.norm(flat) * np.linalg.norm(flat_q)
    cosine = flat @ flat_q / norms if norms > 0 else float(noise == 0)
    agreement = top1 = top1_q = None
    if all(part.ndim in (2, 3) and part.shape[-1] >= 2 for part in y):  # class scores, per sample or step
        predicted, predicted_q = (np.concatenate([part.argmax(-1).ravel() for part in parts]) for parts in (y, y_q))
        agreement = float((predicted == predicted_q).mean())
        if labels is not None and all(part.ndim == 2 for part in y):
            top1, top1_q = float((predicted == labels).mean()), float((predicted_q == labels).mean())
    return OutputComparison(
        name=name, agreement=agreement, top1_float=top1, top1_quant=top1_q, cosine=float(cosine),
        sqnr_db=float(10 * np.log10((flat ** 2).sum() / noise)) if noise > 0 else float("inf"),
        max_abs_error=float(np.abs(flat - flat_q).max()),
        constant=bool(flat_q.min() == flat_q.max() and flat.min() != flat.max()))


def _load(model: onnx.ModelProto, provider: str):
    try:
        return open_runner(model, provider)
    except BitsplitError:
        raise
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from None


def _run(runner, batches: list[dict]) -> tuple[list[tuple[str, list[np.ndarray]]], float]:
    """Each output on each batch, and the median seconds per batch in milliseconds."""
    runner.run(batches[0])  # warm-up, not timed
    results, seconds = [], []
    for batch in batches:
        start = time.perf_counter()
        results.append(runner.run(batch))
        seconds.append(time.perf_counter() - start)
    outputs = [(name, [r[i] for r in results]) for i, name in enumerate(runner.output_names)]
    return outputs, 1000 * float(np.median(seconds))
