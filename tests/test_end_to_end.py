"""The embedded default model, end to end, on a few of its calibration images."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_bitsplit import ImageFolderReader, QuantConfig, quantize

MODELS = Path(__file__).resolve().parents[1] / "models"


def logits(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.slow
def test_default_model_w4a8_stays_close_to_float():
    model = onnx.load(MODELS / "efficientnet-lite0.onnx")
    calibration = ImageFolderReader(MODELS / "calibration", "input", (224, 224), count=8)
    quantized, report = quantize(model, calibration, QuantConfig(wbits=4, calib_count=8))

    assert len(report.layers) == 50 and report.skipped == []
    assert [layer.bits for layer in report.layers].count(4) == 32  # 48 but the 16 depthwise layers
    assert report.quant_bytes < 0.25 * report.float_bytes
    assert all(node.domain in ("", "ai.onnx") for node in quantized.graph.node)

    held_out = ImageFolderReader(MODELS / "calibration", "input", (224, 224))
    x = np.concatenate([feed["input"] for feed in held_out][8:40])
    reference, test = logits(model, x), logits(quantized, x)
    agreement = (reference.argmax(1) == test.argmax(1)).mean()
    cosine = (reference * test).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(test, axis=1)
    assert agreement >= 0.6, agreement
    assert cosine.mean() > 0.75, cosine.mean()  # a wrong layout or scale gives about 0
