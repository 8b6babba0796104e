"""The command line's value types: each option's type and range is checked as click parses it, so
a bad value is a usage error (exit 2) whose one line names the option."""

from __future__ import annotations

import math

import click

from .config import MAX_BITS, MIN_BITS
from .errors import BitsplitError
from .shapes import parse_input_shape, parse_size

MIN_MEMORY = 2**20  # QuantConfig refuses less


class FiniteFloat(click.FloatRange):
    """A float within the range that is neither NaN nor infinite."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def _describe_range(self) -> str:
        return "finite" if self.min is None and self.max is None else super()._describe_range()


class Bits(click.IntRange):
    """Weight bits, MIN_BITS to MAX_BITS; with `same`, also the word 'same' (None: take --wbits)."""

    def __init__(self, same: bool = False):
        super().__init__(MIN_BITS, MAX_BITS)
        self.same = same

    def convert(self, value, param, ctx):
        if self.same and value in ("same", None):
            return None
        return super().convert(value, param, ctx)

    def get_metavar(self, param, ctx=None) -> str:
        return f"{MIN_BITS}..{MAX_BITS}" + ("|same" if self.same else "")


class LayerBits(click.ParamType):
    """PATTERN=BITS -> (pattern, bits)."""

    name = "PATTERN=BITS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        pattern, _, bits = value.rpartition("=")
        if not pattern or not bits.isdigit() or not MIN_BITS <= int(bits) <= MAX_BITS:
            self.fail(f"expected PATTERN=BITS with BITS from {MIN_BITS} to {MAX_BITS}, got '{value}'", param, ctx)
        return pattern, int(bits)


class ByteSize(click.ParamType):
    """'512M', '4G', '1.5G' or a number of bytes; at least MIN_MEMORY."""

    name = "SIZE"
    UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = value.strip()
        number, unit = (text[:-1], self.UNITS[text[-1].lower()]) if text and text[-1].lower() in self.UNITS else (text, 1)
        try:
            size = float(number) * unit
        except ValueError:
            size = math.nan
        if not math.isfinite(size) or size <= 0:
            self.fail(f"expected a size such as 4G or 512M, got '{value}'", param, ctx)
        if size < MIN_MEMORY:
            self.fail(f"{value} is below the smallest budget, 1M", param, ctx)
        return int(size)


class Parsed(click.ParamType):
    """A value a parser of shapes.py reads (its BitsplitError is the usage error)."""

    def __init__(self, parse, metavar: str):
        self.parse, self.name = parse, metavar

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return self.parse(value)
        except BitsplitError as exc:
            self.fail(str(exc), param, ctx)


IMAGE_SIZE = Parsed(parse_size, "HxW")  # -> (height, width)
INPUT_SHAPE = Parsed(parse_input_shape, "[NAME=]DIMS")  # -> (name or '', dims), names matched with the model's later


class ChannelValues(click.ParamType):
    """One or three finite numbers, comma-separated -> three; with `nonzero`, none of them 0."""

    name = "V[,V,V]"

    def __init__(self, nonzero: bool = False):
        self.nonzero = nonzero

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(float(v) for v in value.split(","))
        except ValueError:
            self.fail(f"expected comma-separated numbers, got '{value}'", param, ctx)
        if len(values) not in (1, 3):
            self.fail(f"expected 1 or 3 numbers, got {len(values)}", param, ctx)
        if not all(math.isfinite(v) for v in values) or self.nonzero and 0.0 in values:
            self.fail(f"expected finite{' non-zero' if self.nonzero else ''} numbers, got '{value}'", param, ctx)
        return values * 3 if len(values) == 1 else values


class Fraction(click.ParamType):
    """'0.9' or '90%' -> 0.9; a number above 1 without '%' is refused (it was meant as a percent)."""

    name = "FRACTION"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            number = math.nan
        if not 0.0 <= number <= 1.0:
            self.fail(f"expected a fraction from 0 to 1 or a percent such as 90%, got '{value}'", param, ctx)
        return number
