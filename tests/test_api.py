"""quantize() and quantize_file(): a conversion from start to end on tiny models, its inputs
untouched, its errors one line, its work linear in the layers."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import (INPUT, calibration_feeds, conv_bn_model, conv_model, feeds_for, gemm_model, inverted_residual_model,
                    matmul_model)
from onnx_bitsplit import QuantConfig, quantize, quantize_file
from onnx_bitsplit.errors import BitsplitError, CalibrationError, ModelError
from runs import outputs, sqnr_db

BUILDERS = {
    "conv": conv_model,
    "conv_no_bias": lambda: conv_model(bias=False),
    "grouped_conv": lambda: conv_model(groups=4),
    "depthwise_conv": lambda: conv_model(groups=16),
    "conv_bn": conv_bn_model,
    "gemm": gemm_model,
    "gemm_transposed": lambda: gemm_model(trans_b=0),
    "matmul": matmul_model,
}


@pytest.mark.parametrize("kind", BUILDERS)
def test_w8_is_close_to_float_in_onnxruntime(kind):
    model = BUILDERS[kind]()
    quantized, report = quantize(model, calibration_feeds(model), QuantConfig(wbits=8))
    onnx.checker.check_model(quantized, full_check=True)
    assert all(node.domain in ("", "ai.onnx") for node in quantized.graph.node)
    held_out = calibration_feeds(model, count=8, seed=7)
    assert sqnr_db(outputs(model, held_out), outputs(quantized, held_out)) > 25
    assert len(report.layers) == sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)


def test_input_model_is_untouched():
    model = conv_bn_model()
    before = model.SerializeToString()
    quantize(model, calibration_feeds(model, count=4))
    assert model.SerializeToString() == before


def test_bad_calibration_and_models_raise_one_line_errors():
    model = conv_model()
    with pytest.raises(CalibrationError, match="empty"):
        quantize(model, [])
    with pytest.raises(CalibrationError, match="shape"):
        quantize(model, [{"x": np.zeros((1, 3, 12, 12), np.float32)}])
    with pytest.raises(CalibrationError, match="no value for input"):
        quantize(model, [{"image": np.zeros((1, 8, 12, 12), np.float32)}])
    no_layers = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])]))
    with pytest.raises(ModelError, match="no Conv, Gemm or MatMul"):
        quantize(no_layers, [{"x": np.zeros((1, 4), np.float32)}])


def test_model_without_layers(folder, invoke, snapshot, assert_refused):
    graph = helper.make_graph([helper.make_node("Relu", [INPUT], ["y"])], "g",
                              [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])])
    onnx.save(helper.make_model(graph), folder / "relu.onnx")
    before = snapshot(folder)
    result = invoke(folder / "relu.onnx", folder / "q.onnx", "--calib", folder / "calib.npy")
    assert_refused(result, "no Conv, Gemm or MatMul", folder, before)


def test_a_model_computing_nan_is_refused(folder, run, snapshot, assert_refused):
    """Bad data never reaches a model silently: a conversion that meets NaN stops with one line."""
    model = conv_model()
    bias = next(t for t in model.graph.initializer if t.name == "b2")
    bias.CopyFrom(numpy_helper.from_array(np.full(16, np.nan, np.float32), "b2"))
    model.graph.node.insert(1, helper.make_node("Mul", ["c1", "nan"], ["c1n"], name="poison"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
    model.graph.node[2].input[0] = "c1n"
    onnx.save(model, folder / "nan.onnx")
    before = snapshot(folder)
    assert_refused(run(folder / "nan.onnx", folder / "q.onnx", "--calib", folder / "calib.npy"),
                   "NaN or infinite", folder, before)


def test_file_to_file_api_with_a_path_and_a_reader_of_the_model(tmp_path):
    """quantize() takes a path too; quantize_file() writes atomically with the command's checks."""
    model = conv_model()
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    quantized, _ = quantize(tmp_path / "model.onnx", calibration_feeds(model, 4))
    assert quantized.graph.node
    report = quantize_file(tmp_path / "model.onnx", tmp_path / "q.onnx",
                           lambda loaded: calibration_feeds(loaded, 4), report_path=tmp_path / "r.json")
    assert report.files["output"] == str(tmp_path / "q.onnx") and report.quant_bytes == (tmp_path / "q.onnx").stat().st_size
    assert json.loads((tmp_path / "r.json").read_text())["files"]["input"] == str(tmp_path / "model.onnx")
    with pytest.raises(BitsplitError, match="is the input file"):
        quantize_file(tmp_path / "model.onnx", tmp_path / "weights.bin", calibration_feeds(model, 4))


def test_progress_announces_phases_and_counts_work_per_layer():
    model = conv_model()
    announced, calls = [], []
    quantize(model, calibration_feeds(model, 4), QuantConfig(size_budget=0.5),
             progress=lambda phase, done, total, name: (calls if total else announced).append((phase, done, total, name)))
    assert [c[0] for c in announced] == ["prepare", "calibration", "sensitivity", "capture", "layers", "write"]
    assert [c[0] for c in calls] == ["sensitivity"] * 3 + ["layers"] * 3
    for phase in ("sensitivity", "layers"):
        done = [c[1] for c in calls if c[0] == phase]
        assert done == sorted(done) and done[-1] == calls[-1][2]
    # conv1 (16x8x3x3 on 12x12) does more work than conv3 (8x16x1x1 on 6x6): the bar is not per layer
    steps = np.diff([0] + [c[1] for c in calls if c[0] == "layers"])
    assert steps[0] > 10 * steps[2]


def test_the_command_spills_beside_its_output_by_default(tmp_path):
    model_path, out = tmp_path / "model.onnx", tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    model = inverted_residual_model()
    onnx.save(model, model_path)
    report = quantize_file(model_path, out, feeds_for(model, 256), QuantConfig(max_memory=2**20, batch_size=4))
    assert report.spilled_bytes > 0 and report.options["work_dir"] == str(out.parent)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]
    stamped = {p.key: p.value for p in onnx.load(out).metadata_props}["onnx-bitsplit.options"]
    assert "work_dir" not in json.loads(stamped) and str(tmp_path) not in stamped  # no local path in a shipped file


def test_sizes_count_the_external_weights_file(tmp_path, model_path, npy_dir, capsys):
    from onnx_bitsplit.cli import main as run_main
    with pytest.raises(SystemExit):
        run_main([str(model_path), str(tmp_path / "q.onnx"), "--calib", str(npy_dir), "--report", "-", "--quiet",
                  "--external-data", "--wbits", "8"])
    sizes = json.loads(capsys.readouterr().out)["sizes"]
    written = (tmp_path / "q.onnx").stat().st_size + (tmp_path / "q.onnx.data").stat().st_size
    assert sizes["quant_bytes"] == written and written > 0.2 * sizes["float_bytes"]


# work linear in the number of layers: a fixed number of sessions per layer, one graph repair

def chain_model(layers: int) -> onnx.ModelProto:
    """x -> (Conv 1x1 -> Relu) x layers -> y"""
    rng = np.random.default_rng(0)
    nodes, init, name = [], [], INPUT
    for i in range(layers):
        init.append(numpy_helper.from_array(rng.normal(0, 0.4, (8, 8, 1, 1)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [name, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        name = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 8, 4, 4])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 8, 4, 4])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_work_per_layer_is_constant(monkeypatch):
    import onnx_graphsurgeon as gs
    from onnx_bitsplit import segments
    counts = {}

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counting(segments, "make_session")  # the streams' sessions, one per segment and form
    counting(gs.Graph, "toposort")
    totals = {}
    for layers in (10, 20, 40):
        counts.clear()
        model = chain_model(layers)
        feeds = [{INPUT: np.random.default_rng(i).normal(size=(1, 8, 4, 4)).astype(np.float32)} for i in range(4)]
        quantize(model, feeds, QuantConfig(wbits=8, iterations=1))
        totals[layers] = dict(counts)
    assert totals[10]["make_session"] > 0
    assert totals[40]["make_session"] - totals[20]["make_session"] == 2 * (totals[20]["make_session"] - totals[10]["make_session"])
    assert totals[10]["toposort"] == totals[40]["toposort"]  # the graph is repaired once per edit batch, not per layer
