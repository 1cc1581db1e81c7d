from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt.errors import DataError
from onnxopt.runtime import data
from onnxopt.testing.builders import conv_bn_model


@pytest.fixture
def signature():
    return data.input_signature(ir.serde.deserialize_model(conv_bn_model()))


def _x(rng, n):
    return rng.standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_signature_reads_names_dtypes_and_symbolic_dims(signature):
    assert signature == [data.InputSpec("x", np.dtype(np.float32), ("N", 3, 8, 8))]


def test_npz_samples_on_axis0_are_batched_with_labels(tmp_path, rng, signature):
    x = _x(rng, 70)
    np.savez(tmp_path / "d.npz", x=x, label=np.arange(70))
    ds = data.load_data(tmp_path / "d.npz", signature, batch_size=32)
    feeds = list(ds)
    assert len(ds) == 3 and [f["x"].shape[0] for f in feeds] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    np.testing.assert_array_equal(ds.labels, np.arange(70))
    assert len(list(ds)) == 3, "a dataset can be iterated twice"


def test_npz_of_rank_plus_one_gives_one_feed_per_entry(tmp_path, rng, signature):
    x = rng.standard_normal((4, 2, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    feeds = list(data.load_data(tmp_path / "d.npz", signature))
    assert len(feeds) == 4 and feeds[1]["x"].shape == (2, 3, 8, 8)


def test_folder_of_npz_with_varying_shapes(tmp_path, rng):
    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    signature = data.input_signature(ir.serde.deserialize_model(model))
    for i, (h, w) in enumerate([(8, 8), (16, 12), (5, 9)]):
        np.savez(tmp_path / f"{i:03d}.npz", x=rng.standard_normal((1, 3, h, w)).astype(np.float32))
    feeds = list(data.load_data(tmp_path, signature))
    assert [f["x"].shape[2:] for f in feeds] == [(8, 8), (16, 12), (5, 9)]


def test_folder_of_npy_named_after_inputs(tmp_path, rng, signature):
    np.save(tmp_path / "x.npy", _x(rng, 5))
    np.save(tmp_path / "label.npy", np.arange(5))
    ds = data.load_data(tmp_path, signature, batch_size=2)
    assert len(ds) == 3 and list(ds.labels) == [0, 1, 2, 3, 4]


def test_test_data_set_folders(tmp_path, rng, signature):
    for i in range(2):
        d = tmp_path / f"test_data_set_{i}"
        d.mkdir()
        arr = _x(rng, 1)
        (d / "input_0.pb").write_bytes(onnx.numpy_helper.from_array(arr, "x").SerializeToString())
        out = np.zeros((1, 4), np.float32)
        (d / "output_0.pb").write_bytes(onnx.numpy_helper.from_array(out, "y").SerializeToString())
    ds = data.load_data(tmp_path, signature)
    assert len(ds) == 2 and ds.expected[0][0].shape == (1, 4)


def test_iterables_and_calibration_data_reader(rng, signature):
    from onnxruntime.quantization import CalibrationDataReader

    feeds = [{"x": _x(rng, 2)} for _ in range(3)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    assert len(data.load_data(feeds, signature)) == 3
    assert len(data.load_data((f for f in feeds), signature)) == 3
    got = list(data.load_data(Reader(), signature))
    assert len(got) == 3 and np.array_equal(got[2]["x"], feeds[2]["x"])


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"y": np.zeros((2, 3, 8, 8), np.float32)}, "missing input 'x'"),
        ({"x": np.zeros((2, 3, 7, 8), np.float32)}, "dim 2 is 7, expected 8"),
        ({"x": np.zeros((2, 3, 8, 8), np.float64)}, "dtype float64, model expects float32"),
        ({"x": np.zeros((2, 8, 8), np.float32)}, "rank 3"),
        ({"x": np.zeros((2, 3, 8, 8), np.float32), "z": np.zeros(2)}, "'z' is not a model input"),
    ],
)
def test_npz_errors_name_the_problem(tmp_path, signature, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        data.load_data(tmp_path / "bad.npz", signature)
    assert needle in str(err.value) and "bad.npz" in str(err.value)


def test_missing_and_unknown_sources(tmp_path, signature):
    with pytest.raises(DataError, match="data not found"):
        data.load_data(tmp_path / "nope.npz", signature)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="expected an .npz"):
        data.load_data(tmp_path / "a.txt", signature)
    with pytest.raises(DataError, match="no .npz, .npy"):
        data.load_data(tmp_path, signature)


def test_random_data_is_seeded_and_sets_symbolic_dims(signature):
    a = list(data.random_data(signature, 2, seed=3, dims={"N": 5}))
    b = list(data.random_data(signature, 2, seed=3, dims={"N": 5}))
    assert a[0]["x"].shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(a[1]["x"], b[1]["x"])


def test_take_keeps_the_labels_of_the_feeds_it_keeps(tmp_path):
    """An evaluation set cut to its first feeds (the pipeline checks at most 8) keeps those feeds'
    labels, so top-1 accuracy against labels is still reported; it used to drop them."""
    from onnxopt.runtime import validation
    from tests.conftest import model_path

    model = ir.load(model_path("digits_mlp.onnx"))
    spec = data.input_signature(model)[0]
    rng = np.random.default_rng(0)
    x = rng.random((10, *[d or 1 for d in spec.shape[1:]]), dtype=np.float32)
    labels = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", **{spec.name: x, "label": labels})
    ds = data.load_data(tmp_path / "d.npz", [spec], batch_size=4)  # feeds of 4, 4, 2 samples
    assert ds.samples_per_feed == [4, 4, 2]
    two = ds.take(2)
    np.testing.assert_array_equal(two.labels, labels[:8])
    assert sum(len(f[spec.name]) for f in two) == len(two.labels)
    report = validation.compare(model, model, tmp_path / "d.npz", max_feeds=2)
    metrics = next(iter(report.outputs["CPUExecutionProvider"].values()))
    assert metrics.ref_accuracy is not None  # labels kept: accuracy measured on the 8 samples
