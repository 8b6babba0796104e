"""Fuzz the command line with damaged model files.

    python tools/fuzz.py --runs 2000

Each run mutates a valid small model file at random (byte flips, truncations, swapped or
duplicated chunks), converts it with the CLI and checks the outcome: either a model that
onnxruntime loads, or exactly one `Error:` line with exit code 1; never a traceback, a hang
(--timeout seconds per run) or a file left behind. Exits non-zero on the first violation.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_bitsplit.cli import quantize_command


def seed_model() -> bytes:
    """Conv -> Relu -> Gemm, small enough that a run takes milliseconds."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(0, 0.3, (3, 36)).astype(np.float32), "w2"),
            numpy_helper.from_array(np.array([1, 36], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "seed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random damage: flip bytes, truncate, swap two chunks, or duplicate a chunk."""
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        for position in rng.integers(0, len(data), rng.integers(1, 8)):
            data[position] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        data = data[: rng.integers(0, len(data))]
    elif kind == 2:
        a, b = sorted(rng.integers(0, len(data), 2))
        size = int(rng.integers(1, 32))
        data[a:a + size], data[b:b + size] = data[b:b + size], data[a:a + size]
    else:
        a = int(rng.integers(0, len(data)))
        data[a:a] = data[a:a + int(rng.integers(1, 64))]
    return bytes(data)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_mutations(runs: int, seed: int = 0, timeout: int = 30) -> tuple[list[str], int]:
    """The violations found in `runs` mutated conversions, and how many of them converted."""
    rng = np.random.default_rng(seed)
    original = seed_model()
    violations, converted = [], 0
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            np.save(folder / "calib.npy", rng.normal(size=(4, 2, 5, 5)).astype(np.float32))
            for run in range(runs):
                violation = _one_run(folder, mutate(original, rng), timeout)
                if violation is None:
                    converted += (folder / "out.onnx").exists()
                else:
                    violations.append(f"run {run}: {violation}")
                (folder / "out.onnx").unlink(missing_ok=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return violations, converted


def _one_run(folder: Path, data: bytes, timeout: int) -> str | None:
    model, output = folder / "model.onnx", folder / "out.onnx"
    model.write_bytes(data)
    signal.alarm(timeout)
    try:
        result = CliRunner().invoke(quantize_command, [str(model), str(output), "--calib",
                                                       str(folder / "calib.npy"), "--quiet"])
    except Hang:
        return "hang"
    finally:
        signal.alarm(0)
    left = sorted(p.name for p in folder.iterdir()) != sorted(["calib.npy", "model.onnx"]
                                                              + (["out.onnx"] if result.exit_code == 0 else []))
    try:
        if "Traceback" in result.output or result.exception and not isinstance(result.exception, SystemExit):
            return f"traceback: {result.exception!r}"
        if left:
            return f"files left: {sorted(p.name for p in folder.iterdir())}"
        if result.exit_code == 0:
            ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
            return None
        lines = result.output.strip().splitlines()
        if result.exit_code != 1 or len(lines) != 1 or not lines[0].startswith("Error:"):
            return f"exit {result.exit_code}, output {result.output!r}"
        return None
    except Exception as exc:
        return f"output does not load: {exc!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=30, help="seconds a run may take")
    args = parser.parse_args()
    violations, converted = run_mutations(args.runs, args.seed, args.timeout)
    for violation in violations:
        print(violation)
    print(f"{args.runs} mutations: {converted} converted, {args.runs - converted - len(violations)} "
          f"refused with one line, {len(violations)} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
