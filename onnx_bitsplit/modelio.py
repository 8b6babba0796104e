"""Model files: safe loading (external data confined to the model's folder) and atomic saving.

A model's external-data `location` is attacker-controlled text: it is checked before anything is
read (no absolute paths, no `..`, no symlinks, nothing that resolves outside the model's folder;
cf. CVE-2024-27318), and the output's weights file is always written by this module beside the
output under a name it chooses, never at a location taken from a model (cf. CVE-2025-51480).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model, set_external_data

from .errors import BitsplitError, ModelError

PROTOBUF_LIMIT = 2**31 - 2**24  # a serialized ModelProto must stay under 2 GiB; keep a margin
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the weights file


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX model and its external data, refusing data outside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model '{path}' does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read '{path}' as an ONNX model: {_first_line(exc)}") from None
    if not model.graph.node:
        raise ModelError(f"'{path}' holds no ONNX graph (empty, or not an ONNX model)")
    folder = path.parent.resolve()
    external = [t for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        check_external_location(tensor, folder)
    if external:
        try:
            load_external_data_for_model(model, str(folder))
        except Exception as exc:
            raise ModelError(f"cannot read the external data of '{path}': {_first_line(exc)}") from None
    return model


def check_external_location(tensor: onnx.TensorProto, folder: Path) -> None:
    """Raise ModelError unless the tensor's external data is a regular file inside `folder`."""
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    where = f"tensor '{tensor.name}': external data location '{location}'"
    parts = Path(location).parts
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in parts \
            or any(":" in part for part in parts):
        raise ModelError(f"{where} is not a plain relative path; refused")
    candidate = folder / location
    if any((folder / Path(*parts[:i + 1])).is_symlink() for i in range(len(parts))):
        raise ModelError(f"{where} goes through a symbolic link; refused")
    if not candidate.resolve().is_relative_to(folder) or not candidate.is_file():
        raise ModelError(f"{where} is not a file inside the model's folder; refused")


def save_model(model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None) -> Path | None:
    """Write the model atomically: temporary files beside `path`, then renames.

    Args:
        external_data: store tensors in `<name>.data` beside the output; None decides by size
            (a protobuf cannot exceed 2 GiB).

    Returns:
        The weights file's path when one was written.
    """
    path = Path(path)
    if external_data is None:
        external_data = sum(len(t.raw_data) for t in _tensors(model)) > PROTOBUF_LIMIT
    data_path = path.with_name(path.name + ".data") if external_data else None
    try:
        if data_path:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            with _atomic(data_path) as file:
                _externalize(copy, data_path.name, file)
            model = copy
        with _atomic(path) as file:
            file.write(model.SerializeToString())
    except (OSError, ValueError) as exc:
        raise BitsplitError(f"cannot write '{path}': {_first_line(exc)}") from None
    return data_path


def _externalize(model: onnx.ModelProto, location: str, file) -> None:
    """Move the large raw tensors of `model` into `file`, pointing them at `location`."""
    offset = 0
    for tensor in _tensors(model):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
            data = tensor.raw_data
            file.write(data)
            set_external_data(tensor, location, offset, len(data))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(data)


class _atomic:
    """A binary file written under a temporary name and renamed onto `path` only on success."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        handle, self.temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.file = os.fdopen(handle, "wb")
        return self.file

    def __exit__(self, kind, value, traceback):
        self.file.close()
        if kind is None:
            os.chmod(self.temporary, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary only
            os.replace(self.temporary, self.path)
        else:
            os.unlink(self.temporary)
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (e.g. a report)."""
    try:
        with _atomic(Path(path)) as file:
            file.write(text.encode())
    except OSError as exc:
        raise BitsplitError(f"cannot write '{path}': {_first_line(exc)}") from None


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers and attribute tensors, subgraphs included."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        yield from (sparse.values for sparse in graph.sparse_initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
