"""onnx-bitsplit: low-bit QDQ ONNX models by Bit-Split and Stitching post-training quantization."""

import importlib

__version__ = "0.1.0"
_EXPORTS = {"quantize": "api", "quantize_file": "api", "QuantConfig": "config", "Report": "report", "LayerReport": "report",
            "ImageFolderReader": "calibration", "NpyReader": "calibration", "BitsplitError": "errors"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """The public names, imported on first use: onnx and onnxruntime take a second to import, and
    the command's entry point (__main__) must be able to catch Ctrl-C while they do."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
