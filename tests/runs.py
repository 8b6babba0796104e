"""Models run in onnxruntime and their outputs compared: the helpers the test files share."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def outputs(model: onnx.ModelProto, feeds: list[dict], output: int = 0) -> np.ndarray:
    """The model's output number `output` on each feed, joined along the batch axis (CPU provider)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[output] for feed in feeds])


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(||reference||² / ||reference - test||²); inf when they are equal."""
    noise = ((reference - test) ** 2).sum()
    return 10 * np.log10((reference ** 2).sum() / noise) if noise > 0 else np.inf


def model_sqnr_db(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list[dict], output: int = 0) -> float:
    """sqnr_db of the quantized model's output against the float model's, over all the feeds'
    values (the feeds may differ in size)."""
    def values(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, feed)[output].ravel() for feed in feeds])

    return sqnr_db(values(model), values(quantized))
