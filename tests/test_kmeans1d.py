from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from onnxopt.compress.kmeans1d import assign, kmeans1d, within_cluster_sse


def test_centroids_are_means_of_their_voronoi_intervals(rng):
    x = rng.standard_normal(20_000)
    res = kmeans1d(x, 8)
    assert len(res.centroids) == 8 and np.all(np.diff(res.centroids) > 0)
    for j, c in enumerate(res.centroids):
        np.testing.assert_allclose(x[res.labels == j].mean(), c, rtol=1e-9, atol=1e-12)
    # labels are nearest centroids and the SSE is what they give
    nearest = np.argmin(np.abs(x[:, None] - res.centroids[None, :]), axis=1)
    assert np.array_equal(nearest, res.labels)
    np.testing.assert_allclose(res.sse, np.sum((x - res.centroids[res.labels]) ** 2), rtol=1e-9)


@pytest.mark.parametrize("init", ["kmeans++", "linear", "density"])
def test_error_not_worse_than_scikit_learn(rng, init):
    x = np.concatenate([rng.standard_normal(4000), rng.laplace(3, 0.5, 2000)]).astype(np.float32)
    ours = kmeans1d(x, 16, init=init, n_init=3)
    theirs = KMeans(16, n_init=3, random_state=0).fit(x.reshape(-1, 1).astype(np.float64))
    ref = within_cluster_sse(x, theirs.cluster_centers_.ravel())
    assert ours.sse <= ref * 1.001


def test_fewer_distinct_values_than_k_is_exact():
    x = np.array([3.0, 1.0, 1.0, 2.0, 3.0])
    res = kmeans1d(x, 8)
    assert res.centroids.tolist() == [1.0, 2.0, 3.0] and res.sse == 0.0
    assert res.centroids[res.labels].tolist() == x.tolist()


def test_single_cluster_is_the_mean(rng):
    x = rng.uniform(-1, 1, 1000)
    res = kmeans1d(x, 1)
    np.testing.assert_allclose(res.centroids, [x.mean()])


def test_deterministic_and_assign(rng):
    x = rng.standard_normal(5000)
    a, b = kmeans1d(x, 5, seed=3), kmeans1d(x, 5, seed=3)
    assert np.array_equal(a.centroids, b.centroids)
    assert np.array_equal(assign(x, a.centroids), a.labels)


@pytest.mark.parametrize(("values", "k", "message"), [
    (np.ones(3), 0, "k must be >= 1"),
    (np.array([]), 2, "no values"),
    (np.array([1.0, np.nan]), 2, "finite"),
])
def test_bad_input(values, k, message):
    with pytest.raises(ValueError, match=message):
        kmeans1d(values, k)


def test_bad_init(rng):
    with pytest.raises(ValueError, match="unknown init"):
        kmeans1d(rng.standard_normal(100), 4, init="random")  # type: ignore[arg-type]
