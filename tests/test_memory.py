"""The process's memory figures: its own, not its launcher's."""

import subprocess
import sys

import numpy as np

from onnx_bitsplit.memory import peak_rss, release_freed_memory, resident_bytes


def test_peak_memory_is_the_conversions_own_not_its_launchers():
    """getrusage's peak survives exec: a conversion started by a large process would report it."""
    ballast = np.ones(1 << 27)  # 1 GiB, touched
    child = subprocess.run([sys.executable, "-c", "from onnx_bitsplit.memory import peak_rss; print(peak_rss())"],
                           capture_output=True, text=True, check=True)
    assert ballast.sum() > 0 and 0 < int(child.stdout) < 2**29


def test_resident_and_peak_memory_count_what_is_touched():
    before = resident_bytes()
    ballast = np.ones(1 << 23)  # 64 MiB, touched
    held = resident_bytes()
    assert held - before > 48 * 2**20 and peak_rss() >= held
    del ballast
    release_freed_memory()  # numpy's large blocks are mapped: freed at once, trimmed or not
    assert resident_bytes() < held - 48 * 2**20
