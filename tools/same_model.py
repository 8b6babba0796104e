"""Compare two ONNX files: are they the same bytes, or the same model up to tensor and node names
(the same nodes in the same order, the same initializers bit for bit, the same metadata)?

    python tools/same_model.py A.onnx B.onnx

A refactoring that renames generated tensors must still give the same model: the second answer.
"""

import hashlib
import sys

import onnx


def canonical(path: str) -> bytes:
    """The model serialized with every name replaced by its order of first appearance (graph
    inputs, then node inputs and outputs), node names cleared, initializers sorted."""
    model = onnx.load(path)
    graph = model.graph
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if name and name not in names:
            names[name] = f"t{len(names)}"
        return names.get(name, "")

    for value in graph.input:
        rename(value.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = rename(value.name)
    initializers = sorted(graph.initializer, key=lambda tensor: tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model.SerializeToString()


def main(first: str, second: str) -> int:
    same_bytes = hashlib.sha256(open(first, "rb").read()).digest() == hashlib.sha256(open(second, "rb").read()).digest()
    same_model = canonical(first) == canonical(second)
    print("the same bytes" if same_bytes else "different bytes", end="; ")
    print("the same model up to names" if same_model else "different models")
    return 0 if same_model else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
