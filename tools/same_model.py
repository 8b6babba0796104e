"""Compare two ONNX files: are they the same bytes, or the same model up to tensor and node names
and metadata (the same nodes in the same order, the same initializers bit for bit)?

    python tools/same_model.py A.onnx B.onnx
"""

import hashlib
import sys

import onnx

def canon(path):
    m = onnx.load(path)
    names = {}
    def c(n):
        if n == "": return ""
        if n not in names: names[n] = f"t{len(names)}"
        return names[n]
    for i in m.graph.input: c(i.name)
    for n in m.graph.node:
        for x in n.input: c(x)
        for x in n.output: c(x)
    for n in m.graph.node:
        n.name = ""
        n.input[:] = [c(x) for x in n.input]; n.output[:] = [c(x) for x in n.output]
    for t in m.graph.initializer: t.name = c(t.name)
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]: v.name = c(v.name)
    inits = sorted(m.graph.initializer, key=lambda t: t.name)
    del m.graph.initializer[:]; m.graph.initializer.extend(inits)
    del m.metadata_props[:]
    return m.SerializeToString()
a, b = sys.argv[1:3]
ha, hb = (hashlib.sha256(open(p,'rb').read()).hexdigest() for p in (a, b))
print("bytes identical" if ha == hb else "bytes differ", end="; ")
print("same up to names/metadata" if canon(a) == canon(b) else "MODEL DIFFERS")
