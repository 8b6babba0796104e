"""Model files: safe loading (external data confined to the model's folder) and atomic saving.

A model's external-data `location` is attacker-controlled text: it is checked before anything is
read (no absolute paths, no `..`, no symlinks, nothing that resolves outside the model's folder;
cf. CVE-2024-27318), and the output's weights file is always written by this module beside the
output under a name it chooses, never at a location taken from a model (cf. CVE-2025-51480).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model, set_external_data

from .errors import BitsplitError, ModelError, first_line, signals_held

PROTOBUF_LIMIT = 2**31 - 2**24  # a serialized ModelProto must stay under 2 GiB; keep a margin
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the weights file


def load_model(path: str | Path, *, max_bytes: int | None = None) -> onnx.ModelProto:
    """Read an ONNX model and its external data, refusing data outside the model's folder, and
    (with max_bytes) external data larger than that, before reading it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model '{path}' does not exist or is not a file")
    model = _read_proto(path)
    if not model.graph.node:
        raise ModelError(f"'{path}' holds no ONNX graph (empty, or not an ONNX model)")
    folder = path.parent.resolve()
    external = [t for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        check_external_location(tensor, folder)
    if max_bytes is not None:
        size = sum(_external_size(tensor, folder) for tensor in external)
        if size > max_bytes:
            raise ModelError(f"the external data of '{path}' is {size / 2**30:.2f} GiB, over the memory limit for "
                             f"the model's weights, {max_bytes / 2**30:.2f} GiB (a quarter of --max-memory)")
    if external:
        try:
            load_external_data_for_model(model, str(folder))
        except Exception as exc:
            raise ModelError(f"cannot read the external data of '{path}': {first_line(exc)}") from None
    return model


def _read_proto(path: Path) -> onnx.ModelProto:
    """The model file's protobuf, its external data not read."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read '{path}' as an ONNX model: {first_line(exc)}") from None


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


def _external_size(tensor: onnx.TensorProto, folder: Path) -> int:
    """Bytes the tensor's external data reads: its length, or the rest of the file without one."""
    entries = {e.key: e.value for e in tensor.external_data}
    if entries.get("length", "").isdigit():
        return int(entries["length"])
    offset = int(entries["offset"]) if entries.get("offset", "").isdigit() else 0
    return max((folder / entries["location"]).stat().st_size - offset, 0)


def model_files(path: str | Path) -> list[Path]:
    """The model file and the external-data files it reads (confined as load_model confines them)."""
    path = Path(path)
    model = _read_proto(path)
    folder = path.parent.resolve()
    files = [path]
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            check_external_location(tensor, folder)
            files.append(folder / next(e.value for e in tensor.external_data if e.key == "location"))
    return list(dict.fromkeys(files))


def check_output_paths(outputs: dict[str, Path | None], inputs: list[Path]) -> None:
    """Refuse, before any work, outputs that could not be written or would destroy a file the
    run reads (the model, its external data, calibration data) or another output of the run.

    Files are compared by identity (device and inode: hard links, symbolic links and `..`
    spellings included); outputs that do not exist yet by their resolved paths.

    Args:
        outputs: role ('output', 'report', ...) -> path; None for an output not asked for.
        inputs: every file the run reads.
    """
    read = {_identity(p): p for p in inputs if p.exists()}
    claimed: dict[str, str] = {}
    for role, path in outputs.items():
        if path is None:
            continue
        if path.is_dir():
            raise BitsplitError(f"the {role} path '{path}' is a folder")
        if path.exists() and not path.is_file():
            raise BitsplitError(f"the {role} path '{path}' is not a regular file (a device, FIFO or socket); refused")
        if path.exists() and _identity(path) in read:
            raise BitsplitError(f"the {role} path '{path}' is the input file '{read[_identity(path)]}'; "
                                "inputs are never overwritten")
        key = str(_identity(path)) if path.exists() else os.path.realpath(path)
        if key in claimed:
            raise BitsplitError(f"the {role} path '{path}' is the same file as the {claimed[key]}")
        claimed[key] = role
        folder = path.parent
        if not folder.is_dir():
            raise BitsplitError(f"the {role} folder '{folder}' does not exist")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError:
            raise BitsplitError(f"the {role} folder '{folder}' is not writable") from None


def _identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


class OutputFiles:
    """Files written as one transaction: each to a temporary file beside its final path; once all
    are complete, all are renamed into place. On any failure before that (a full disk, Ctrl-C, a
    signal) every temporary file is removed and no final path is touched.

        with OutputFiles() as files:
            save_model(model, path, files=files)
            files.write(report_path, text.encode())
    """

    def __init__(self):
        self.staged: list[tuple[Path, Path]] = []  # (temporary, final)

    def __enter__(self) -> "OutputFiles":
        return self

    def open(self, path: Path):
        """A binary file object for `path`'s temporary file."""
        self.current = path
        with signals_held():  # a signal between creating the file and recording it would leave it behind
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            self.staged.append((Path(temporary), path))
        return os.fdopen(handle, "wb")

    def sha256(self, path: Path) -> str:
        """The SHA-256 of what is staged for `path`."""
        return next(file_sha256(temporary) for temporary, final in self.staged if final == path)

    def size(self, path: Path) -> int:
        """Bytes staged so far for `path` (0 when nothing is)."""
        return next((temporary.stat().st_size for temporary, final in self.staged if final == path), 0)

    def write(self, path: Path, data: bytes) -> None:
        with self.open(path) as file:
            file.write(data)

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None:
                mode = 0o666 & ~_umask()  # mkstemp's 0600 is for the temporaries only
                for temporary, final in self.staged:
                    os.chmod(temporary, mode)
                with signals_held():  # all renames or none: a signal waits until they are done
                    for index, (temporary, final) in enumerate(self.staged):
                        os.replace(temporary, final)
                        self.staged[index] = (final, final)
        except OSError as exc:
            kind, value = OSError, exc
        finally:
            with signals_held():  # a second signal must not cut the clean-up short
                for temporary, final in self.staged:
                    if temporary != final:
                        temporary.unlink(missing_ok=True)
        if kind is not None and issubclass(kind, OSError):  # a full disk, a vanished folder
            raise BitsplitError(f"cannot write '{getattr(self, 'current', '?')}': {value.strerror or value}") from None
        return False


def save_model(model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None,
               files: OutputFiles | None = None) -> Path | None:
    """Write the model atomically: temporary files beside `path`, then renames.

    Args:
        external_data: store tensors in `<name>.data` beside the output; None decides by size
            (a protobuf cannot exceed 2 GiB).
        files: the transaction to stage the files in; without one they are written at once.

    Returns:
        The weights file's path when one was written.
    """
    path = Path(path)
    if external_data is None:
        external_data = sum(len(t.raw_data) for t in _tensors(model)) > PROTOBUF_LIMIT
    data_path = weights_path(path) if external_data else None
    with OutputFiles() if files is None else nullcontext(files) as staged:
        if data_path:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            with staged.open(data_path) as file:
                _externalize(copy, data_path.name, file)
            model = copy
        try:
            staged.write(path, model.SerializeToString())
        except ValueError as exc:  # protobuf's 2 GiB limit
            raise BitsplitError(f"cannot write '{path}': {first_line(exc)}") from None
    return data_path


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_path(path: Path) -> Path:
    """Where the weights of a model saved at `path` with external data go."""
    return path.with_name(path.name + ".data")


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def bodies(*roots) -> Iterator[onnx.GraphProto | onnx.FunctionProto]:
    """The graphs and functions given and every subgraph inside them (If, Loop, Scan bodies)."""
    pending = list(reversed(roots))
    while pending:
        body = pending.pop()
        yield body
        for node in body.node:
            for attribute in node.attribute:
                pending += [attribute.g] if attribute.HasField("g") else list(attribute.graphs)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs, then what its subgraphs (If, Loop, Scan bodies) read
    from the enclosing graphs by name, without listing them as inputs."""
    reads = [name for name in node.input if name]
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.HasField("g") else attribute.graphs:
            defined = ({value.name for value in body.input} | {tensor.name for tensor in body.initializer}
                       | {name for inner in body.node for name in inner.output})
            reads += [name for inner in body.node for name in node_reads(inner) if name not in defined]
    return list(dict.fromkeys(reads))


def model_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every tensor the model holds, graph, subgraphs and model-local functions alike, with a name
    for it: initializers, sparse initializers' values, attribute tensors (a Constant node's value
    is named after its output when it has no name of its own)."""
    for body in bodies(model.graph, *model.functions):
        yield from ((tensor, tensor.name) for tensor in getattr(body, "initializer", ()))
        yield from ((sparse.values, sparse.values.name) for sparse in getattr(body, "sparse_initializer", ()))
        for node in body.node:
            output = node.output[0] if node.op_type == "Constant" and node.output else ""
            for attribute in node.attribute:
                for tensor in [attribute.t] if attribute.HasField("t") else attribute.tensors:
                    yield tensor, tensor.name or output


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    return (tensor for tensor, _ in model_tensors(model))
