"""Fuzz the command line with damaged inputs, hostile paths and signals.

    python tools/fuzz.py --runs 2000

Each run builds a fresh folder (a small valid model and calibration data), damages one thing at
random and runs `onnx-bitsplit` on it:
- model: byte flips, truncations, swapped or duplicated chunks of the model file;
- calibration: NaN/Inf values, arrays of the wrong shape, type or size (a tiny .npz declaring
  gigabytes), empty, truncated or degenerate images (1xN strips, huge declared sizes);
- paths: the output, the report or the output's weights file aliasing an input (the same path,
  a `..` spelling, a symbolic or hard link, the calibration file) or each other, a folder, a FIFO;
- signal: SIGINT, SIGTERM or SIGHUP sent to a real process at a random moment once it handles
  them (a process killed before its entry point runs is no finding);
- options: one to three options given values of the wrong type, out of range, NaN, infinite,
  negative, huge or empty (each must be a usage error) or valid ones.
Every run is checked: the exit code is one the README documents (0, 1, 2, 3, 129, 130, 143), and
2 for an option value that is not valid; a process ended by a signal (a crash) is a violation; a
failure prints exactly one `Error:` line and no traceback; every input file is unchanged (hash);
nothing is left beside the inputs but the outputs of a successful run, and those load in
onnxruntime; peak memory stays below the limit given with --max-memory (plus the interpreter's
own). Exits non-zero if any run breaks a rule.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnx_bitsplit.cli import main as run_command

DOCUMENTED_EXITS = {0, 1, 2, 3, 129, 130, 143}
MAX_MEMORY = "256M"
RSS_ALLOWANCE = 1536 * 2**20  # the interpreter, numpy, onnx and onnxruntime themselves
KINDS = ("model", "calibration", "paths", "signal", "options")
WRONG = ["", "x", "nan", "inf", "-inf", "-1", "1e30", "3.5", "0x10", "1,2", "🙂"]
# option -> (values it must refuse, values it takes); every value of WRONG is refused too, except
# those an option takes (listed among them)
OPTIONS = {
    "--wbits": (["0", "1", "9", "4.0"], ["2", "4", "8"]),
    "--abits": (["4", "12", "32"], ["8", "16"]),
    "--weight-storage": (["int2", "INT4 ", "float"], ["int4", "int8"]),
    "--first-last-wbits": (["1", "9", "Same"], ["same", "8"]),
    "--depthwise-wbits": (["12"], ["same", "4"]),
    "--bits-per-layer": (["conv=99", "=4", "conv=", "conv=four"], ["conv=8", "op:Gemm=4"]),
    "--size-budget": (["0", "1.5", "-0.2"], ["0.5", "1"]),
    "--compensation-blend": (["2", "-0.1"], ["0", "0.5", "1"]),
    "--damping": (["101", "-1"], ["0", "0.3", "3.5"]),
    "--iterations": (["-5"], ["0", "3"]),
    "--sample-rows": (["-2"], ["0", "100"]),
    "--seed": (["-3"], ["0", "7"]),
    "--batch-size": (["0", "-1"], ["1", "3"]),
    "--calib-count": (["0"], ["1", "4"]),
    "--max-memory": (["1", "1K", "0G", "-4G", "lots"], ["64M", "1G", "1e30"]),
    "--input-size": (["axb", "0x8", "8", "1x2x3"], ["8x8"]),
    "--input-shape": (["1x2x5", "y=1x2x5x5", "1x2x0x5", "2x2x5x5"], ["1x2x5x5", "x=1x2x5x5"]),
    "--mean": (["1,2", "1,2,3,4"], ["0", "1,2,3", "-1", "1e30", "3.5"]),
    "--std": (["0", "1,0,1"], ["1", "2,2,2", "-1", "1e30", "3.5"]),
    "--crop-ratio": (["0", "1.5"], ["1", "0.5"]),
    "--preset": (["imagenet"], ["torch", "raw"]),
    "--layout": (["nhcw"], ["nchw"]),
    "--resize": (["stretch"], ["crop", "letterbox", "pad", "fit"]),
}


def seed_model() -> bytes:
    """Conv -> Relu -> Gemm on a 2x5x5 RGB-free input, small enough that a run takes milliseconds."""
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


def rgb_model() -> bytes:
    """Conv 3x3 (3->4) on an RGB 8x8 input, for image calibration folders."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "rgb",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], init)
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


def _calibration_case(folder: Path, rng: np.random.Generator) -> list[str]:
    """A damaged calibration input in `folder`; returns the command's arguments."""
    model, output = folder / "model.onnx", folder / "out.onnx"
    data = rng.normal(size=(4, 2, 5, 5)).astype(np.float32)
    case = rng.integers(9)
    if case == 0:
        data.flat[rng.integers(data.size)] = [np.nan, np.inf, -np.inf][rng.integers(3)]
    elif case == 1:
        data = data.astype([np.int64, np.float16, np.uint8, bool][rng.integers(4)])
    elif case == 2:
        data = data[..., : int(rng.integers(0, 5))]
    elif case == 3:
        data = np.zeros((0, 2, 5, 5), np.float32)
    if case <= 3:
        np.save(folder / "calib.npy", data)
        return [str(model), str(output), "--calib", str(folder / "calib.npy")]
    if case == 4:  # small on disk, gigabytes declared
        np.savez_compressed(folder / "calib.npz", x=np.zeros((int(rng.integers(2, 64)), 2, 512, 512), np.float32))
        return [str(model), str(output), "--calib", str(folder / "calib.npz")]
    if case == 5:
        (folder / "calib.npy").write_bytes(mutate((folder / "calib.npy").read_bytes(), rng))
        return [str(model), str(output), "--calib", str(folder / "calib.npy")]
    # images for an RGB model: degenerate shapes, damaged files, odd modes
    model.write_bytes(rgb_model())
    images = folder / "images"
    images.mkdir()
    width, height = [(1, 40000), (40000, 1), (3, 3), (8, 8)][rng.integers(4)]
    mode = ["RGB", "L", "RGBA", "P", "I;16"][rng.integers(5)]
    Image.new(mode, (width, height)).save(images / "a.png")
    if case == 7:
        (images / "a.png").write_bytes(mutate((images / "a.png").read_bytes(), rng))
    if case == 8:
        (images / "b.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(int(rng.integers(0, 64))))
    return [str(model), str(output), "--calib", str(images)]


def _options_case(folder: Path, rng: np.random.Generator) -> tuple[list[str], bool]:
    """The seed model and calibration with one to three options, each given a value it must
    refuse (3 times in 10) or one it takes; whether one of them must be refused."""
    args = [str(folder / "model.onnx"), str(folder / "out.onnx"), "--calib", str(folder / "calib.npy")]
    refused = False
    for option in rng.choice(sorted(OPTIONS), size=int(rng.integers(1, 4)), replace=False):
        bad, good = OPTIONS[option]
        invalid = bool(rng.random() < 0.3)
        pool = bad + [w for w in WRONG if w not in good] if invalid else good
        value = pool[rng.integers(len(pool))]
        args += [str(option), value]
        refused |= invalid
    return args, refused


def _paths_case(folder: Path, rng: np.random.Generator) -> list[str]:
    """Outputs that alias an input or each other in some spelling, or cannot be written."""
    model, calib = folder / "model.onnx", folder / "calib.npy"
    victim = [model, calib][rng.integers(2)]
    spelling = rng.integers(5)
    if spelling == 0:
        alias = victim
    elif spelling == 1:
        alias = folder / ".." / folder.name / victim.name
    elif spelling == 2:
        alias = folder / f"link-{victim.name}"
        alias.symlink_to(victim)
    elif spelling == 3:
        alias = folder / f"hard-{victim.name}"
        os.link(victim, alias)
    else:
        alias = folder / "special"
        os.mkfifo(alias) if rng.integers(2) else alias.mkdir()
    role = rng.integers(4)
    if role == 0:
        return [str(model), str(alias), "--calib", str(calib)]
    if role == 1:
        return [str(model), str(folder / "out.onnx"), "--calib", str(calib), "--report", str(alias)]
    if role == 2:  # the output's weights file is a hard link to the input
        os.link(victim, folder / "out.onnx.data")
        return [str(model), str(folder / "out.onnx"), "--calib", str(calib), "--external-data"]
    return [str(model), str(folder / "out.onnx"), "--calib", str(calib), "--report", str(folder / "out.onnx")]


def _hashes(folder: Path) -> dict[str, str]:
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _check(folder: Path, before: dict, args: list[str], code: int, output: str) -> str | None:
    """The rule a run broke, or None."""
    if code < 0:
        return f"ended by signal {-code} (a crash): {output[-300:]!r}"
    if code not in DOCUMENTED_EXITS:
        return f"exit code {code}: {output[-300:]!r}"
    if "Traceback" in output:
        return f"traceback: {output[-300:]!r}"
    # a run that ended well, or was interrupted after its outputs were complete, may leave them
    outputs = {"out.onnx", "out.onnx.data", "report.json"} if code == 0 or code >= 128 else set()
    after = _hashes(folder)
    if code >= 128 and "out.onnx" in after and ("report.json" in after) != ("--report" in args):
        return f"interrupted with a partial set of outputs: {sorted(after)}"
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    if changed:
        return f"inputs changed: {changed}"
    left = set(after) - set(before) - outputs
    if left:
        return f"files left: {sorted(left)}"
    if code == 0 or code >= 128:
        if (folder / "out.onnx").exists():
            try:
                ort.InferenceSession(str(folder / "out.onnx"), providers=["CPUExecutionProvider"])
            except Exception as exc:
                return f"output does not load: {exc!r}"
        if code == 0:
            return None
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if len(lines) != 1 or not lines[0].startswith("Error:"):
        return f"exit {code}, output {output!r}"
    return None


def _in_process(args: list[str]) -> tuple[int, str]:
    with CliRunner().isolation() as (_, _, output):
        try:
            run_command(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, output.getvalue().decode(errors="replace")


def _with_signal(args: list[str], rng: np.random.Generator, timeout: int) -> tuple[int, str]:
    """The command as a real process, sent a random signal at a random moment once its entry
    point handles it (before, the signal's default action ends Python: no finding); the heavy
    imports take about a second, and the conversion about as long again."""
    process = subprocess.Popen([sys.executable, "-m", "onnx_bitsplit", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    signum = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP][rng.integers(3)]
    delay = float(rng.uniform(0.0, 2.0))
    # SIGTERM's handler is the entry point's (Python itself catches SIGINT from its own start-up,
    # before the entry point runs): all three are installed at once
    if not wait_until_caught(process.pid, signal.SIGTERM, timeout):
        process.kill()
        return -1, "no handler installed"
    time.sleep(delay)
    process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return -1, "hang"
    return process.returncode, output


def wait_until_caught(pid: int, signum: int, timeout: float = 30.0) -> bool:
    """Wait until the process has a handler for `signum` (Linux's /proc; elsewhere a fixed wait);
    False if it never had one in `timeout` seconds or ended first."""
    status, deadline = Path(f"/proc/{pid}/status"), time.monotonic() + timeout
    if not Path("/proc/self/status").exists():
        time.sleep(0.3)
        return True
    while time.monotonic() < deadline:
        try:
            caught = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
        except (OSError, StopIteration):  # it has ended
            return True
        if int(caught, 16) >> (signum - 1) & 1:
            return True
        time.sleep(0.001)
    return False


def run_fuzz(runs: int, seed: int = 0, timeout: int = 60, kinds=KINDS) -> tuple[list[str], dict]:
    """The violations found in `runs` runs, and how each kind of run ended (exit code counts)."""
    rng = np.random.default_rng(seed)
    original = seed_model()
    violations, outcomes = [], {}
    peak_before = _peak_rss()  # a process that already peaked higher (a test session) keeps that mark
    for run in range(runs):
        kind = kinds[rng.integers(len(kinds))]
        with tempfile.TemporaryDirectory(prefix="fuzz-") as name:
            folder = Path(name) / "work"
            folder.mkdir()
            (folder / "model.onnx").write_bytes(mutate(original, rng) if kind == "model" else original)
            np.save(folder / "calib.npy", rng.normal(size=(4, 2, 5, 5)).astype(np.float32))
            refused = False
            if kind == "calibration":
                args = _calibration_case(folder, rng)
            elif kind == "options":
                args, refused = _options_case(folder, rng)
            elif kind == "paths":
                args = _paths_case(folder, rng)
            else:
                args = [str(folder / "model.onnx"), str(folder / "out.onnx"), "--calib", str(folder / "calib.npy")]
            args += ["--quiet"] + (["--max-memory", MAX_MEMORY] if "--max-memory" not in args else []) + (
                ["--report", str(folder / "report.json")] if "--report" not in args else [])
            before = _hashes(folder)
            code, output = _with_signal(args, rng, timeout) if kind == "signal" else _in_process(args)
            violation = _check(folder, before, args, code, output)
            if violation is None and refused and code != 2:
                violation = f"an invalid option value was not a usage error: exit {code}, {output[-300:]!r}"
            if violation:
                violations.append(f"run {run} ({kind}): {violation}; arguments {args[4:]}")
            outcomes.setdefault(kind, {}).setdefault(code, 0)
            outcomes[kind][code] += 1
    peak = _peak_rss()
    if peak > max(peak_before, RSS_ALLOWANCE + int(MAX_MEMORY[:-1]) * 2**20):
        violations.append(f"peak RSS {peak / 2**20:.0f} MiB over the limit")
    return violations, outcomes


def _peak_rss() -> int:
    """The highest resident memory of this process or any child it waited for, in bytes."""
    return max(resource.getrusage(who).ru_maxrss * 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=60, help="seconds a run may take")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    args = parser.parse_args()
    violations, outcomes = run_fuzz(args.runs, args.seed, args.timeout, tuple(args.kinds.split(",")))
    for violation in violations:
        print(violation)
    for kind, codes in outcomes.items():
        print(f"{kind}: " + ", ".join(f"exit {code}: {count}" for code, count in sorted(codes.items())))
    print(f"{args.runs} runs, {len(violations)} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
