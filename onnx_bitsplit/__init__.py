"""onnx-bitsplit: low-bit QDQ ONNX models by Bit-Split and Stitching post-training quantization."""

__version__ = "0.1.0"

from .api import quantize  # noqa: E402  (submodules read __version__)
from .calibration import ImageFolderReader, NpyReader
from .config import QuantConfig
from .errors import BitsplitError
from .report import LayerReport, Report

__all__ = ["quantize", "QuantConfig", "Report", "LayerReport", "ImageFolderReader", "NpyReader",
           "BitsplitError"]
