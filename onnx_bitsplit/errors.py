"""User-facing errors: one line that names the culprit."""


class BitsplitError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with 1."""


class ModelError(BitsplitError):
    """The model cannot be read, is invalid, or has nothing this tool can quantize."""


class CalibrationError(BitsplitError):
    """The calibration data is missing, unreadable, or does not fit the model."""
