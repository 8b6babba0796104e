"""Runtimes a quantized model is deployed on, and where its nodes ran there.

- "cpu": onnxruntime's CPU provider (QDQ node units fused into QLinearConv, QGemm, ...).
- "qnn": Qualcomm's NPU through the onnxruntime-qnn plugin (HTP backend; a simulator on x86-64
  Linux), with CPU fallback disabled, so a session that loads runs whole on the HTP graph.
- "openvino": OpenVINO's CPU plugin (the `openvino` package), which reads QDQ ONNX and reports
  each layer's runtime precision.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import BitsplitError, first_line
from .graph import RECURRENT_OPS
from .shapes import dynamic_inputs

PROVIDERS = ("cpu", "qnn", "openvino")
PACKAGES = {"qnn": "onnxruntime-qnn", "openvino": "openvino"}
QNN_EP = "QNNExecutionProvider"
QNN_OPTIONS = {"backend_type": "htp", "offload_graph_io_quantization": "0"}
# OpenVINO layer types whose precision tells whether the model runs as integer kernels
OPENVINO_WEIGHTED = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
INTEGER_PRECISIONS = {"u8", "i8"}
LOCATION_LINE = re.compile(r"^(Exception from \S+:\d+:?|\[ ?\w+ ?\])$")
LOG_SAMPLE = 3  # distinct lines of a provider's native output kept for the report
QNN_REASON = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit \((\w+)\)\s*:\s*REASON\s*:\s*(.+)")


@dataclass
class Placement:
    """Where a model's nodes ran on a provider.

    Attributes:
        provider: one of PROVIDERS.
        whole: every node ran there (for OpenVINO: every layer with a weight in u8/i8).
        fallbacks: (op type, node name, reason) of each node that did not.
    """

    provider: str
    whole: bool = True
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)
    log_lines: int = 0  # lines the provider's native code printed while running the model
    log_sample: list[str] = field(default_factory=list)  # the first distinct few of them

    def shortfall(self) -> str:
        """What kept the model from running whole here, in a few words."""
        if self.provider == "openvino":
            return (f"{len(self.fallbacks)} weighted layers ran on openvino in floating point "
                    "(see their precision), not as integer kernels")
        return f"{len(self.fallbacks)} nodes did not run on {self.provider}"


class Runner:
    """A model loaded on one provider: run(feed) -> outputs, and its placement."""

    def __init__(self, run, output_names: list[str], placement: Placement):
        self.run = run
        self.output_names = output_names
        self.placement = placement


def make_session(model: onnx.ModelProto, *, qdq_fusion: bool = True, spinning: bool = True) -> ort.InferenceSession:
    """A CPU session that reports failures by exception only, not on the user's terminal.

    Args:
        qdq_fusion: let onnxruntime fuse QuantizeLinear/DequantizeLinear around operators into
            integer kernels, as it does for a deployed model. Off, Q and DQ run as written: the
            simulation's segments need that, since their weights are float constants that
            onnxruntime would otherwise quantize on its own, unlike the written model.
        spinning: let onnxruntime's worker threads busy-wait for the next run. Off for sessions
            whose runs alternate with numpy work: the spinning threads would hold its cores.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only
    if not qdq_fusion:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def open_runner(model: onnx.ModelProto, provider: str) -> Runner:
    """Load `model` on `provider`.

    Raises:
        BitsplitError: the provider's package is missing, or it cannot load the model at all.
    """
    if provider not in PROVIDERS:
        raise BitsplitError(f"unknown provider '{provider}' (one of {', '.join(PROVIDERS)})")
    if provider == "qnn":
        return _qnn_runner(model)
    if provider == "openvino":
        return _openvino_runner(model)
    session = make_session(model)
    return _session_runner(session, Placement("cpu"))


def _session_runner(session: ort.InferenceSession, placement: Placement) -> Runner:
    names = [o.name for o in session.get_outputs()]
    return Runner(lambda feed: session.run(names, feed), names, placement)


def _logged_runner(session: ort.InferenceSession, placement: Placement) -> Runner:
    """A runner whose runs' native output (the QNN simulator's, which can repeat a line without
    end) is counted and sampled into the placement instead of flooding the user's terminal."""
    names = [o.name for o in session.get_outputs()]

    def run(feed):
        with _captured_stderr() as log:
            results = session.run(names, feed)
        lines = [line.rstrip() for line in log.read().splitlines() if line.strip()]
        log.close()
        placement.log_lines += len(lines)
        for line in lines:
            if len(placement.log_sample) >= LOG_SAMPLE:
                break
            if line not in placement.log_sample:
                placement.log_sample.append(line)
        return results

    return Runner(run, names, placement)


def cause_line(exc: BaseException) -> str:
    """The line of an exception's message that says why: OpenVINO's start with where in its
    sources the exception was thrown ("Exception from src/...cpp:84:"), the cause follows."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if not LOCATION_LINE.match(line)]
    return causes[0] if causes else first_line(exc)


def _require(provider: str):
    module = {"qnn": "onnxruntime_qnn", "openvino": "openvino"}[provider]
    try:
        return __import__(module)
    except ImportError:
        raise BitsplitError(f"--provider {provider} needs the {PACKAGES[provider]} package: "
                            f"pip install {PACKAGES[provider]}") from None


def _qnn_devices():
    qnn = _require("qnn")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        try:
            with _quiet_output():  # the QNN libraries print a banner as they load
                ort.register_execution_provider_library(QNN_EP, qnn.get_library_path())
        except Exception as exc:
            raise BitsplitError(f"cannot load the QNN execution provider: {first_line(exc)}") from None
        devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        raise BitsplitError("the QNN execution provider offers no device on this machine")
    return devices


def _qnn_options(devices, *, fallback: bool, severity: int = 3) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = severity
    if not fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    else:
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    options.add_provider_for_devices(devices, QNN_OPTIONS)
    return options


def _qnn_runner(model: onnx.ModelProto) -> Runner:
    """The model on QNN HTP without CPU fallback; if QNN does not take it whole, on QNN with
    fallback, with the nodes left to the CPU and the validator's reasons."""
    devices = _qnn_devices()
    data = model.SerializeToString()
    try:
        with _quiet_output():
            session = ort.InferenceSession(data, _qnn_options(devices, fallback=False))
        return _logged_runner(session, Placement("qnn"))
    except Exception as exc:
        refusal = first_line(exc)
    try:
        with _captured_stderr() as log:
            session = ort.InferenceSession(data, _qnn_options(devices, fallback=True, severity=0))
    except Exception:  # QNN fails even on the part it takes: its first refusal is the reason
        cells = sorted({node.op_type for node in model.graph.node if node.op_type in RECURRENT_OPS})
        hint = f" (its {'/'.join(cells)} cells stay in float, which QNN HTP does not run)" if cells else ""
        raise BitsplitError(f"QNN HTP cannot load the model{hint}: {refusal}") from None
    reasons = {op: reason.strip() for op, reason in QNN_REASON.findall(log.read())}
    log.close()
    dynamic = dynamic_inputs(model)
    hint = f"; inputs {', '.join(dynamic)} are dynamic and QNN needs static shapes (--input-shape)" if dynamic else ""
    fallbacks = [(node.op_type, node.name, reasons.get(node.op_type, "not taken by QNN") + hint)
                 for subgraph in session.get_provider_graph_assignment_info() if subgraph.ep_name != QNN_EP
                 for node in subgraph.get_nodes()]
    return _logged_runner(session, Placement("qnn", whole=not fallbacks, fallbacks=fallbacks))


def _openvino_runner(model: onnx.ModelProto) -> Runner:
    """The model compiled by OpenVINO for its CPU plugin; weighted layers that did not get an
    integer runtime precision are the fallbacks."""
    ov = _require("openvino")
    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="onnx-bitsplit-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, path)
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU")
        except Exception as exc:
            raise BitsplitError(f"OpenVINO cannot load the model: {cause_line(exc)}") from None
    fallbacks, products = [], _activation_products(model)
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        weighted = kind in OPENVINO_WEIGHTED and op.get_friendly_name() not in products
        if weighted and precision not in INTEGER_PRECISIONS:
            fallbacks.append((kind, op.get_friendly_name(), f"runs in {precision}"))
    request = compiled.create_infer_request()
    names = [output.get_any_name() for output in compiled.outputs]

    def run(feed):
        results = request.infer(feed)
        return [np.asarray(results[output]) for output in compiled.outputs]

    return Runner(run, names, Placement("openvino", whole=not fallbacks, fallbacks=fallbacks))


def _activation_products(model: onnx.ModelProto) -> set[str]:
    """The MatMuls of two activations (attention's scores and context): no weight, and OpenVINO's
    CPU plugin runs them in f32 whatever their quantizers, so they do not count as weighted layers."""
    constants = {t.name for t in model.graph.initializer}
    dequantized = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return {node.name for node in model.graph.node if node.op_type == "MatMul"
            and not any(dequantized.get(name, name) in constants for name in node.input)}


class _captured_stderr:
    """The process's file descriptors (2, where onnxruntime's C++ logger writes, or others)
    redirected to a temporary file, readable after the block."""

    descriptors = (2,)

    def __enter__(self):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.file = tempfile.TemporaryFile(mode="w+")
        self.saved = [os.dup(fd) for fd in self.descriptors]
        for fd in self.descriptors:
            os.dup2(self.file.fileno(), fd)
        return self.file

    def __exit__(self, *exc):
        for fd, saved in zip(self.descriptors, self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        return False


class _quiet_output(_captured_stderr):
    """Standard output and error of native code discarded for the block."""

    descriptors = (1, 2)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.file.close()
        return False

