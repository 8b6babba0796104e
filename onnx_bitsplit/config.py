"""QuantConfig: every option of a conversion, typed and validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import BitsplitError
from .qdq_format import ACTIVATION_BITS, WEIGHT_STORAGE

MIN_BITS = 2
MAX_BITS = 8
TENSOR_SHARE = 4  # the share of the memory budget one tensor may take (tensor_limit)
DEFAULT_MEMORY = 4 << 30  # the default budget: peak memory stays near it on a laptop or a CI runner
TARGETS = ("generic", "cpu", "openvino", "qnn")  # the runtimes a file is for (QuantConfig.target)
# the weight storage each runs: INT8 for CPU runtimes' integer kernels, INT4 for the NPU and disk
TARGET_STORAGE = {"generic": "int4", "cpu": "int8", "openvino": "int8", "qnn": "int4"}
TARGET_PROVIDERS = {"generic": "cpu", "cpu": "cpu", "openvino": "openvino", "qnn": "qnn"}  # check's default


def _check_bits(what: str, bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise BitsplitError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Options of one conversion.

    Attributes:
        wbits: weight bits of the quantized layers. Defaults to 4.
        abits: activation bits (per tensor, unsigned: qdq_format): 8 or 16. Defaults to 8.
        first_last_wbits: weight bits of the first and last quantized layer; None keeps them at
            `wbits`. Defaults to 8 (the paper's setting).
        depthwise_wbits: weight bits of depthwise Convs (one output channel per group); None keeps
            them at `wbits`. A depthwise row has only kh·kw weights (9 for 3x3) for its 4-bit grid,
            and these layers hold about 1% of a model's weights. Defaults to 8 (docs/benchmarks.md, Ablation).
        layer_wbits: weight bits by node name, fnmatch pattern ('*depthwise*'), operator type
            ('op:Gemm') or '@depthwise' (every depthwise Conv); overrides everything above. An
            exact name wins over patterns; among patterns, the first that matches. A pattern that
            matches no layer is an error.
        exclude: nodes kept in float, by the same kind of patterns as layer_wbits: layers (listed
            in the report with the pattern that excluded them) or any other node, which then
            reads and writes float. Defaults to none.
        size_budget: choose each layer's bits (4 or 8, by measured sensitivity) so that the
            output is at most this fraction of the float model's size; replaces wbits,
            first_last_wbits and depthwise_wbits, layer_wbits still apply. None: no budget. Defaults to None.
        error_compensation: take the layer inputs from the partially quantized network and the
            target from the float one. Defaults to True.
        compensation_blend: with error compensation, X~ = blend·(quantized-network input) +
            (1 - blend)·(float input); below 1 it keeps the solve from fitting the calibration
            set's particular quantization errors (docs/benchmarks.md, How the compensation blend was chosen).
            Defaults to 0.5.
        bias_correction: shift each bias by the mean output error of its layer. Defaults to True.
        equalization: fold per-channel factors into each Conv -> Conv pair (the paper's ECAQ,
            equalize.py) before solving. Defaults to False.
        iterations: at most this many alternations of scales and bit-plane sweeps; 0 keeps the
            round-to-nearest integers and scales of the initialisation. Defaults to 10.
        damping: ridge on the Gram matrices, as a fraction of their mean diagonal; it pulls the
            solution toward the float weights where the calibration data says little; it keeps
            error compensation from fitting the calibration set (docs/benchmarks.md, Ablation). Defaults to 0.3.
        sample_rows: patch rows (output positions over all calibration samples) each layer's
            statistics are estimated from: a seeded uniform sample of this many (divided by the
            groups of a grouped Conv), or of 64 per weight column if that is more; None uses
            every row. Bounds the statistics' cost at any image size and calibration count
            (docs/benchmarks.md, What the row sample and the seed cost). Defaults to 65536.
        seed: the seed of the samples a conversion draws (each layer's patch rows, each
            tensor's values for its quantizer): the same seed gives the same model; other seeds
            show how much a result owes to the samples (docs/benchmarks.md, What the row sample and
            the seed cost). Defaults to 0.
        batch_size: calibration samples run through onnxruntime at once where every input's batch
            axis is dynamic (calibration.batch_feeds); None: as many as make about 4 MiB of input
            (calibration.RUN_INPUT_BYTES). Defaults to None.
        calib_count: use at most this many calibration samples. Defaults to 256.
        input_shapes: static shapes for the model's inputs by name, e.g. {"input": (1, 3, 224, 224)};
            the output has them and calibration runs at them (NPUs need static shapes).
            Defaults to none: dynamic dimensions stay dynamic.
        max_memory: the memory budget in bytes. The cached tensors of the two streams stay
            within a quarter of it (the rest goes to files in work_dir), and any single thing
            read or folded (a calibration array, an image, a constant the graph computes) larger
            than it is refused with an error before it is allocated. None: 4 GiB, or half of
            the machine's memory if that is less. Defaults to None.
        work_dir: the folder for the tensors past the budget (a temporary folder inside it,
            removed on every exit). None: the system's temporary folder; the command uses the
            output's folder. Defaults to None.
        target: the runtime the file is for, one of TARGETS: "cpu" (onnxruntime) and "openvino"
            store weights as INT8, which their integer kernels run; "qnn" (Qualcomm's HTP) needs
            static shapes and, where a layer would write 16 bits from 8 (a transformer's residual
            stream), 16-bit activations throughout; "generic" is a file every one of them loads.
            Defaults to "generic".
        weight_storage: "int4" stores weights of 2 to 4 bits as INT4 (the smallest file, for
            NPUs and disk), "int8" stores the same values as INT8, which CPU runtimes run with
            integer kernels. Wider weights are INT8 either way. None: the target's
            (TARGET_STORAGE). Defaults to None.
    """

    wbits: int = 4
    abits: int = 8
    first_last_wbits: int | None = 8
    depthwise_wbits: int | None = 8
    layer_wbits: dict[str, int] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    size_budget: float | None = None
    error_compensation: bool = True
    compensation_blend: float = 0.5
    bias_correction: bool = True
    equalization: bool = False
    iterations: int = 10
    damping: float = 0.3
    sample_rows: int | None = 65536
    seed: int = 0
    batch_size: int | None = None
    calib_count: int = 256
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    target: str = "generic"
    weight_storage: str | None = None
    max_memory: int | None = None
    work_dir: str | None = None

    def __post_init__(self) -> None:
        _check_bits("wbits", self.wbits)
        if self.abits not in ACTIVATION_BITS:  # QuantizeLinear saturates at its integer type's range
            raise BitsplitError(f"abits must be one of {', '.join(map(str, ACTIVATION_BITS))}, got {self.abits!r}")
        if self.max_memory is not None and self.max_memory < 2**20:
            raise BitsplitError(f"max_memory must be at least 1 MiB, got {self.max_memory} bytes")
        if self.target not in TARGETS:
            raise BitsplitError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.weight_storage is None:  # a frozen dataclass: the default is resolved once, here
            object.__setattr__(self, "weight_storage", TARGET_STORAGE[self.target])
        if self.weight_storage not in WEIGHT_STORAGE:
            raise BitsplitError(f"weight_storage must be one of {', '.join(WEIGHT_STORAGE)}, got {self.weight_storage!r}")
        for name, shape in self.input_shapes.items():
            if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
                raise BitsplitError(f"input shape of '{name}' must be positive integers, got {shape!r}")
        if self.first_last_wbits is not None:
            _check_bits("first_last_wbits", self.first_last_wbits)
        if self.depthwise_wbits is not None:
            _check_bits("depthwise_wbits", self.depthwise_wbits)
        for name, bits in self.layer_wbits.items():
            _check_bits(f"bits of layer '{name}'", bits)
        if self.size_budget is not None and not 0.0 < self.size_budget <= 1.0:
            raise BitsplitError(f"size_budget must be a fraction in (0, 1], got {self.size_budget}")
        if self.iterations < 0:
            raise BitsplitError(f"iterations must be 0 or more, got {self.iterations}")
        if not 0.0 <= self.compensation_blend <= 1.0:
            raise BitsplitError(f"compensation_blend must be in [0, 1], got {self.compensation_blend}")
        if not 0.0 <= self.damping <= 100.0:
            raise BitsplitError(f"damping must be in [0, 100], got {self.damping}")
        if self.sample_rows is not None and self.sample_rows < 1:
            raise BitsplitError(f"sample_rows must be at least 1, got {self.sample_rows}")
        if self.seed < 0:
            raise BitsplitError(f"seed must be 0 or more, got {self.seed}")
        if self.batch_size is not None and self.batch_size < 1:
            raise BitsplitError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.calib_count < 1:
            raise BitsplitError(f"calib_count must be at least 1, got {self.calib_count}")


def tensor_limit(max_memory: int | None) -> int:
    """The most one tensor may take, read (a calibration array, the model's weights) or computed
    (an activation, a constant to fold): a quarter of the budget, since a step holds several."""
    return memory_limit(max_memory) // TENSOR_SHARE


def memory_limit(max_memory: int | None) -> int:
    """The memory budget: max_memory, or DEFAULT_MEMORY, or half of the machine's physical memory
    if that is less."""
    if max_memory is not None:
        return max_memory
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        physical = 2 * DEFAULT_MEMORY
    return min(DEFAULT_MEMORY, physical // 2)
