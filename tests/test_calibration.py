"""Calibration: streamed ranges through onnxruntime, histogram thresholds, table I/O, caching."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.context import PassContext
from onnxopt.errors import DataError
from onnxopt.quant import calibration
from onnxopt.quant.calibration import CalibrationTable, collect_ranges, threshold_from_histogram
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.data import Dataset

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 16] x) => (float[N, 8] y) <float[16, 8] w = {%s}> {
    h = MatMul(x, w)
    r = Relu(h)
    y = Mul(r, r)
}
"""


def _model(rng: np.random.Generator) -> ir.Model:
    w = rng.standard_normal((16, 8)).astype(np.float32)
    return ir.from_onnx_text(TEXT % ",".join(f"{v:.6f}" for v in w.ravel()))


def _feeds(rng: np.random.Generator, n: int = 6) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal((4 + i, 16)).astype(np.float32)} for i in range(n)]


def _reference_minmax(model: ir.Model, feeds, name: str) -> tuple[float, float]:
    arrays = [got[name] for got in runtime.capture(model, feeds, [name])]
    return min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)


def test_minmax_matches_the_tensors_onnxruntime_computes(rng):
    model = _model(rng)
    feeds = _feeds(rng)
    table = collect_ranges(model, feeds, quiet=True)
    assert set(table.ranges) == {"x", "h", "r", "y"}
    assert table.num_samples == len(feeds) and table.method == "minmax"
    for name in ("x", "h", "r", "y"):
        np.testing.assert_allclose(table.ranges[name], _reference_minmax(model, feeds, name), rtol=1e-6)
    assert table.ranges["r"][0] == 0.0
    assert table.absmax("h") == max(abs(v) for v in table.ranges["h"])


def test_iterators_readers_and_lists_give_the_same_table(rng):
    model = _model(rng)
    feeds = _feeds(rng)

    class Reader:  # the onnxruntime CalibrationDataReader protocol
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    base = collect_ranges(model, feeds, ["h", "y"], "percentile", quiet=True)
    assert collect_ranges(model, iter(feeds), ["h", "y"], "percentile", quiet=True) == base
    assert collect_ranges(model, Reader(), ["h", "y"], "percentile", quiet=True) == base
    assert collect_ranges(model, Dataset.from_feeds(feeds), ["h", "y"], "percentile", quiet=True) == base


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_clip_inside_minmax_and_chunking_does_not_change_them(rng, method):
    model = _model(rng)
    feeds = _feeds(rng)
    mm = collect_ranges(model, feeds, quiet=True)
    big = collect_ranges(model, feeds, method=method, quiet=True, exact=True)
    small = collect_ranges(model, feeds, method=method, quiet=True, exact=True, max_chunk_bytes=1)
    assert big == small
    # Tensors this small are binned whole by the one-pass sketch: the same thresholds, up to the
    # search grids (MSE tries 128 thresholds over the histogram's range, which may be 2x wider).
    one_pass = collect_ranges(model, feeds, method=method, quiet=True)
    for name, rng_ in big.ranges.items():
        np.testing.assert_allclose(one_pass.ranges[name], rng_, atol=mm.absmax(name) / 32)
    for name, (lo, hi) in big.ranges.items():
        assert mm.ranges[name][0] <= lo <= 0.0 or lo == mm.ranges[name][0]
        assert hi <= mm.ranges[name][1]
        assert hi > 0.3 * mm.ranges[name][1]  # clipping, not collapse


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_one_pass_sketch_of_large_tensors_agrees_with_exact_histograms(rng, method):
    # 3 x 200k values per feed: the sketch bins ~120k strided samples of |x| (step 5).
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 200000] x) => (float[N, 200000] y) { y = Mul(x, x) }
    """
    model = ir.from_onnx_text(text)
    feeds = [{"x": (rng.standard_t(4, (3, 200000)) * (1 + i)).astype(np.float32)} for i in range(4)]
    # The sketch bins into 4096 bins; the KL search depends on the bin count, so compare alike.
    exact = collect_ranges(model, feeds, ["x", "y"], method, percentile=99.99, quiet=True, exact=True, num_bins=4096)
    sketch = collect_ranges(model, feeds, ["x", "y"], method, percentile=99.99, quiet=True)
    rtol = {"x": 0.05, "y": 0.15}  # y = x^2 of a t(4) variable: its tail is estimated from samples
    for name in ("x", "y"):
        lo, hi = exact.ranges[name]
        np.testing.assert_allclose(sketch.ranges[name], exact.ranges[name], rtol=rtol[name], atol=0.01 * (hi - lo))


def test_one_pass_histogram_grows_its_range_by_merging_bins():
    h = calibration._Histogram(bins=8)
    h.add(1.0, np.array([1.0, 0.5], np.float32), 2)
    assert h.top == 1.0 and h.counts.sum() == 2
    h.add(3.5, np.array([0.1, 3.5], np.float32), 4)  # 2 sampled of 4 values: weight 2 each
    assert h.top == 4.0 and h.counts.sum() == pytest.approx(6.0)
    assert h.counts[-1] == 2  # 3.5 in the last of 8 bins over [0, 4]
    assert list(h.counts[:2]) == [2, 2]  # 0.1 (x2) in [0, 0.5); 0.5 and 1.0, merged twice, in [0.5, 1)


def test_thresholds_on_hand_made_histograms():
    uniform = np.ones(1000, dtype=np.int64)
    assert threshold_from_histogram(uniform, 10.0, "percentile", percentile=50.0) == pytest.approx(5.0, abs=0.02)
    assert threshold_from_histogram(uniform, 10.0, "percentile", percentile=100.0) == pytest.approx(10.0)
    # A lone outlier at the top bin: MSE clips it, percentile 99.99 keeps 1 value in 1e4.
    spiky = np.zeros(2048, dtype=np.int64)
    spiky[:200] = 1000
    spiky[-1] = 1
    t = threshold_from_histogram(spiky, 100.0, "mse")
    assert 200 * 100.0 / 2048 * 0.9 < t < 50.0
    assert threshold_from_histogram(np.zeros(16, dtype=np.int64), 3.0, "mse") == 3.0
    with pytest.raises(ValueError, match="unknown calibration method"):
        threshold_from_histogram(uniform, 1.0, "kl")


def test_mse_threshold_of_a_gaussian_is_a_few_sigma(rng):
    x = np.abs(rng.standard_normal(200_000))
    top = float(x.max())
    hist = np.bincount(np.minimum((x * 2048 / top).astype(int), 2047), minlength=2048)
    t = threshold_from_histogram(hist, top, "mse")
    assert 2.5 < t < top


def test_bad_arguments_are_one_line_errors(rng):
    model = _model(rng)
    feeds = _feeds(rng, 1)
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        collect_ranges(model, feeds, method="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="percentile must be in"):
        collect_ranges(model, feeds, method="percentile", percentile=0)
    with pytest.raises(KeyError, match="nope"):
        collect_ranges(model, feeds, ["nope"])
    with pytest.raises(DataError, match="no feeds"):
        collect_ranges(model, [], ["h"])


def test_table_round_trips_through_json(tmp_path, rng):
    table = collect_ranges(_model(rng), _feeds(rng), quiet=True)
    path = tmp_path / "calib.json"
    table.save(path)
    assert CalibrationTable.load(path) == table
    (tmp_path / "bad.json").write_text('{"ranges": {}}')
    with pytest.raises(DataError, match="invalid calibration table"):
        CalibrationTable.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        CalibrationTable.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="low > high"):
        CalibrationTable({"a": (1.0, 0.0)})


def test_cached_ranges_are_reused(rng):
    model = _model(rng)
    ctx = PassContext(calibration=Dataset.from_feeds(_feeds(rng)), quiet=True)
    first = calibration.cached_ranges(model, ctx.calibration, ["h"], "minmax", cache=ctx.cache, quiet=True)
    assert calibration.cached_ranges(model, ctx.calibration, ["h"], "minmax", cache=ctx.cache, quiet=True) is first
    assert any(isinstance(k, tuple) and k[:2] == ("calibration", "minmax") for k in ctx.cache)
    with pytest.raises(DataError, match="calibration data is needed"):
        calibration.cached_ranges(model, None, ["h"], cache={})


def test_infinite_and_nan_activations_get_no_range_and_do_not_crash():
    # Conformance node/test_attention_causal_boolmask_nan_robustness_expanded crashed the
    # histogram phase (an infinite bound made the bin index negative).
    import onnx

    from onnxopt.quant import calibration
    from onnxopt.runtime.data import Dataset
    from onnxopt.testing.conformance.cases import node_cases

    case = next(c for c in node_cases(["attention"]) if c.name == "test_attention_causal_boolmask_nan_robustness_expanded")
    model = ir.serde.deserialize_model(onnx.load_from_string(case.model))
    feeds = Dataset.from_feeds([feed for feed, _ in case.data_sets])
    table = calibration.collect_ranges(model, feeds, method="percentile", quiet=True)
    assert table.ranges and all(np.isfinite(lo) and np.isfinite(hi) for lo, hi in table.ranges.values())


def test_cached_ranges_are_not_reused_for_a_rewritten_model():
    from onnxopt.context import PassContext
    from onnxopt.quant import calibration
    from onnxopt.runtime.data import Dataset

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 2] x) => (float[2, 2] y) <float[2, 2] w = {1., 0., 0., 1.}> {
        y = MatMul (x, w)
    }
    """
    model = ir.from_onnx_text(text)
    ctx = PassContext(calibration=Dataset.from_feeds([{"x": np.ones((2, 2), np.float32)}]), quiet=True)
    first = calibration.cached_ranges(model, ctx.calibration, ["y"], cache=ctx.cache, quiet=True)
    assert calibration.cached_ranges(model, ctx.calibration, ["y"], cache=ctx.cache, quiet=True) is first  # unchanged model: reused
    w = model.graph.initializers["w"]
    w.const_value = ir.tensor(np.full((2, 2), 3.0, np.float32), name="w")  # a pass rewrites the weight
    second = calibration.cached_ranges(model, ctx.calibration, ["y"], cache=ctx.cache, quiet=True)
    assert second is not first and second.ranges["y"][1] == 6.0


def test_asymmetric_mse_threshold_counts_the_uint8_step_of_one_sided_tensors(rng):
    """A ReLU-like tensor on a uint8 grid: the symmetric mse rule assumes steps of t/127 where the
    grid has t/255, over-counts rounding 4x and clips too much; the asymmetric rule's range gives
    a lower MSE when the samples are really quantized (scales.quantize / dequantize)."""
    from onnxopt.quant import scales

    x = np.maximum(rng.standard_normal(200_000), 0.0) ** 2  # one-sided, heavy tail
    top = float(x.max())
    hist = np.bincount(np.minimum((x / top * 4096).astype(int), 4095), minlength=4096)

    def mse(t: float) -> float:
        scale, zero = scales.scale_zero_point(0.0, t, "uint8")
        q = scales.dequantize(scales.quantize(x, scale, zero, "uint8"), scale, zero)
        return float(np.mean((q - x) ** 2))

    sym = threshold_from_histogram(hist, top, "mse")
    asym = threshold_from_histogram(hist, top, "mse", bounds=(0.0, top))
    assert asym > sym
    # Both errors come from 200k samples of the same tensor: the comparison is exact arithmetic
    # on fixed data, not a statistical estimate, so any strict improvement is meaningful.
    assert mse(asym) < mse(sym)


@pytest.mark.parametrize("kind", ["2", "ray"])
def test_calibration_on_data_shards_gives_the_one_pass_table(kind, monkeypatch):
    """Min/max merge exactly; histograms have power-of-two ranges, so shard histograms merge into
    the one-pass histogram (floor binning commutes with merging bin pairs) up to float64 rounding
    of the weight sums (~1e-16 relative): thresholds are bin edges, so the tables are equal."""
    from onnxopt.quant import trials
    from tests.conftest import model_path

    if kind == "ray":
        pytest.importorskip("ray", reason="Ray is the optional extra: pip install 'onnxopt[ray]'")
    model = ir.load(model_path("digits_cnn.onnx"))
    from onnxopt.runtime.data import input_signature, load_data

    data = load_data(model_path("digits_cnn_calib.npz"), input_signature(model))
    feeds = [dict(f) for f in data.take(4)]  # the first here, 3 on 2 workers: unequal shards (1 + 2)
    assert len(feeds) == 4
    monkeypatch.setattr(calibration, "_SHARD_MIN_SECONDS", 0.0)  # shard even this small data
    shards = []
    real_map = trials.map_tasks
    monkeypatch.setattr(trials, "map_tasks", lambda fn, tasks, *a: shards.append(len(tasks)) or real_map(fn, tasks, *a))
    one = calibration.collect_methods(model, feeds, quiet=True)
    sharded = calibration.collect_methods(model, feeds, quiet=True, workers=trials.parse_workers(kind))
    assert shards == [2 if kind == "2" else 3]  # the 3 feeds after the first: 2 pool workers, or 1 Ray task each
    for method in calibration.METHODS:
        assert one[method].num_samples == sharded[method].num_samples == 4
        assert one[method].ranges.keys() == sharded[method].ranges.keys()
        for name, (lo, hi) in one[method].ranges.items():
            assert sharded[method].ranges[name] == pytest.approx((lo, hi), rel=1e-12, abs=0), (method, name)


def test_histograms_of_shards_merge_into_the_histogram_of_all(rng):
    x = [np.abs(rng.standard_normal(5000) * s).astype(np.float32) for s in (0.3, 5.0, 1.0, 40.0)]
    whole = calibration._Histogram()
    for a in x:
        whole.add(float(a.max()), a, a.size)
    left, right = calibration._Histogram(), calibration._Histogram()
    for a in x[:2]:
        left.add(float(a.max()), a, a.size)
    for a in x[2:]:
        right.add(float(a.max()), a, a.size)
    left.merge(right)
    assert left.top == whole.top and np.log2(whole.top) == int(np.log2(whole.top))
    np.testing.assert_array_equal(left.counts, whole.counts)  # weight 1: integer counts, exact
