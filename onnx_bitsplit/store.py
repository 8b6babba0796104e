"""Batches of stream tensors within a memory budget (numpy only).

The two streams cache every tensor at the frontier for the whole calibration set: at 640x640 that is
gigabytes. Batches are kept in memory while their total stays within the budget, those needed
soonest first; the rest go to .npy files in a work folder and are mapped back when read (a sample of
patch rows then reads only the pages it touches). The folder is made on the first spill and removed
by close(), which quantize() calls on every exit, errors and signals included.
"""

from __future__ import annotations

import heapq
import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import BitsplitError, signals_held
from .memory import release_freed_memory


class Stored:
    """An array in the store: in memory (`array`) or in a file (`path`), which the store may
    change (BatchStore.put evicts)."""

    __slots__ = ("array", "path", "shape", "nbytes")

    def __init__(self, array: np.ndarray):
        self.array, self.path = array, None
        self.shape, self.nbytes = array.shape, array.nbytes


class BatchStore:
    """Keeps arrays in memory up to `budget` bytes in all, and the rest in files under `work_dir`
    (None: the system's temporary folder); release_freed() returns freed memory to the system
    once the process holds more than `trim_above` bytes (None: always)."""

    def __init__(self, budget: int, work_dir: str | Path | None = None, trim_above: int | None = None):
        self.budget = budget
        self.work_dir = work_dir
        self.trim_above = trim_above
        self.folder: Path | None = None
        self.resident = 0
        self.evictable: list[tuple[int, int, Stored]] = []  # a heap: the resident arrays needed last first
        self.order = itertools.count()  # ties in the heap: by age, never by comparing arrays
        self.dropped = 0  # resident arrays dropped since the heap was last cleared of them
        self.spilled_bytes = 0
        self.files = 0

    @classmethod
    def within(cls, memory_budget: int, work_dir: str | Path | None = None) -> "BatchStore":
        """A store for a conversion whose whole process has `memory_budget` bytes: its arrays
        take a quarter of it, the rest is for onnxruntime's runs, the model and the statistics
        (docs/scaling.md: peak memory against the budget); freed memory is kept for reuse while
        the process holds less than half of it."""
        return cls(memory_budget // 4, work_dir, trim_above=memory_budget // 2)

    def put(self, array: np.ndarray, until: int | None = None) -> Stored:
        """The array, kept in memory or written to a file. `until` is when it is last needed (any
        increasing count, e.g. the index of the last node that reads it; None: never evicted).
        When memory is full, arrays needed later than this one go to files first, the one needed
        last first: memory then serves arrays that are soon read and dropped, and fewer bytes go
        through the disk."""
        item = Stored(np.ascontiguousarray(array))
        if until is not None:
            self._evict(item.nbytes, until)
        if self.resident + item.nbytes <= self.budget:
            self.resident += item.nbytes
            if until is not None:
                heapq.heappush(self.evictable, (-until, next(self.order), item))
        else:
            self._write(item)
        return item

    def _evict(self, needed: int, until: int) -> None:
        """Write arrays needed after `until` to files, last needed first, until `needed` bytes fit."""
        while self.resident + needed > self.budget and self.evictable:
            later, _, item = self.evictable[0]
            if item.array is None or item.path is not None:  # dropped or written since
                heapq.heappop(self.evictable)
                continue
            if -later <= until:
                return
            heapq.heappop(self.evictable)
            self.resident -= item.nbytes
            self._write(item)

    def _write(self, item: Stored) -> None:
        if self.folder is None:
            with signals_held():  # a signal between making the folder and recording it would leave it behind
                self.folder = Path(tempfile.mkdtemp(prefix="onnx-bitsplit-", dir=self.work_dir))
        self.files += 1
        path = self.folder / f"{self.files}.npy"
        try:
            np.save(path, item.array)
        except OSError as exc:  # a full disk, most likely: say where, and what else can be done
            raise BitsplitError(f"cannot write tensors past the memory budget to '{self.folder}': "
                                f"{exc.strerror or exc} (choose a folder with more space, --work-dir, "
                                "or a larger --max-memory)") from None
        item.array, item.path = None, path
        self.spilled_bytes += item.nbytes

    @staticmethod
    def get(item: Stored) -> np.ndarray:
        return item.array if item.path is None else np.load(item.path, mmap_mode="r")

    def drop(self, item: Stored) -> None:
        """Forget an array: its memory counts no more, its file is deleted."""
        if item.path is not None:
            item.path.unlink(missing_ok=True)
        elif item.array is not None:
            self.resident -= item.nbytes
            self.dropped += 1
        item.array = None
        if self.dropped > len(self.evictable) // 2:  # the heap would grow with every array ever kept
            self.evictable = [entry for entry in self.evictable if entry[2].array is not None and entry[2].path is None]
            heapq.heapify(self.evictable)
            self.dropped = 0

    def release_freed(self) -> None:
        """Return freed heap memory to the system if the process holds more than trim_above:
        tensors of many sizes come and go, and what they leave free would otherwise count in the
        process's memory for the rest of the run. Below that it stays for the next tensors, which
        would fault fresh pages in instead."""
        release_freed_memory(above=self.trim_above)

    def close(self) -> None:
        """Delete the work folder and everything in it."""
        if self.folder is not None:
            with signals_held():  # a second signal must not cut the clean-up short
                shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

