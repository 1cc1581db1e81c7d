"""calibration_method=auto: per-tensor range choice measured in onnxruntime (onnxopt.quant.range_search)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.quantize import QuantizeConfig, QuantizePass

from onnxopt.context import PassContext
from onnxopt.quant import calibration, range_search
from onnxopt.runtime import data
from tests.conftest import load_model, model_path


def _conv_relu_head(rng) -> ir.Model:
    """Conv -> Relu -> Conv whose input has rare large peaks: clipping and not clipping compete."""
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "W2"], ["y"], name="c2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def _feeds(rng, n: int) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(n):
        x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
        x[0, :, rng.integers(0, 16), rng.integers(0, 16)] *= 30.0  # one rare peak per feed
        out.append({"x": x})
    return out


def test_auto_is_never_worse_than_the_best_whole_table_on_its_check_feeds(rng, tmp_path):
    model = _conv_relu_head(rng)
    feeds = _feeds(rng, 6)
    tables = calibration.collect_methods(model, feeds, quiet=True, asymmetric=True)
    assert set(tables) == set(calibration.METHODS)

    def build(ranges):  # the pass's own Q/DQ insertion, from a saved table of these ranges
        trial = model.clone()
        path = tmp_path / "table.json"
        calibration.CalibrationTable(dict(ranges), "minmax", len(feeds)).save(path)
        cfg = QuantizeConfig(calib_table=str(path), latency_runs=0, sqnr_samples=0, reduce_range="false")
        QuantizePass(cfg, PassContext(quiet=True))(trial)
        return trial

    choice = range_search.choose(tables, build, model, feeds[:4], max_tensors=8)
    # Greedy with acceptance only on a strict drop, on the same feeds and the same onnxruntime:
    # the chosen loss is at most the best whole table's, with no tolerance needed.
    assert choice.loss <= min(choice.whole.values())
    assert choice.whole[choice.start] == min(choice.whole.values())
    assert choice.trials >= len(calibration.METHODS)
    assert set(choice.table.ranges) == set(tables["minmax"].ranges)


def test_quantize_auto_records_the_choice_and_holds_on_held_out_digits():
    m = load_model("digits_cnn.onnx")
    sig = data.input_signature(m)
    calib = data.load_data(model_path("digits_cnn_calib.npz"), sig).take(32)
    ctx = PassContext(calibration=calib, quiet=True)
    report = QuantizePass(QuantizeConfig(calibration_method="auto", latency_runs=0, sqnr_samples=0,
                                         reduce_range="false"), ctx)(m)
    rec = next(r for r in report.records if r["item"] == "auto_calibration")
    assert rec["start"] in calibration.METHODS and rec["loss"] <= min(rec["whole"].values())
    assert any(note.startswith("calibration auto:") for note in report.notes)
