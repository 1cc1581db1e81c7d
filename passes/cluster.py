"""Weight clustering (weight sharing): each weight replaced by the nearest of k centroids.

The classic Deep Compression recipe (Han et al., ICLR 2016) on the ONNX graph: cluster each
selected weight tensor (or each output channel) with 1-D k-means (:mod:`onnxopt.compress.kmeans1d`),
replace every value by its centroid, and store the centroids. With calibration data the
centroids are re-fitted by least squares so that each layer's outputs match the original
layer's on the calibration activations, and biases absorb the mean output shift
(:mod:`onnxopt.compress.repair`). With ``pack`` the indices are stored as UINT8 or 4-bit tensors and
rebuilt in-graph (:mod:`onnxopt.compress.codebook`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt.compress import weight_sharing
from onnxopt.compress.codebook import Codebook, IndexDType, fit_kmeans
from onnxopt.compress.kmeans1d import Init
from onnxopt.config import option
from onnxopt.pass_base import OptPass, PassReport, register

__all__ = ["ClusterConfig", "ClusterPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClusterConfig(weight_sharing.CodebookConfig):
    """Options of the cluster pass."""

    clusters: int = option(16, "k, centroids per tensor (or per channel), 2..256")
    init: Init = option("kmeans++", "k-means initialisation: kmeans++, linear or density")  # noqa: RUF009 - a str Literal
    keep_zeros: bool = option(True, "exact zeros (pruned weights) keep a fixed zero centroid")
    repair: bool = option(False, "re-fit centroids on calibration data (skipped with a note without data)")
    index_dtype: IndexDType = option("auto", "packed index type: auto (4-bit if k <= 16), uint8, uint4")  # noqa: RUF009
    size_aware: bool = option(
        True, "with per_channel: a tensor whose per-channel codebooks (k float32 per channel plus "
        "indices) would take more bytes than its int8 per-channel form gets one codebook per tensor"
    )

    def __post_init__(self) -> None:
        if not 2 <= self.clusters <= 256:
            raise ValueError(f"clusters must be in 2..256, got {self.clusters}")
        if self.index_dtype == "uint4" and self.clusters > 16:
            raise ValueError(f"index_dtype=uint4 holds at most 16 clusters, got clusters={self.clusters}")
        super().__post_init__()


@register("cluster")
class ClusterPass(OptPass[ClusterConfig]):
    """Share weights: every selected weight takes one of ``clusters`` values per tensor/channel.

    Changes: replaces selected Conv/Gemm/MatMul weights (baked: same initializer, clustered
        values; packed: ``<W>.idx``/``<W>.idx4``/``<W>.idx4x2`` index and ``<W>.codebook``
        initializers plus Cast/Gather(Elements)/Reshape nodes that rebuild W). With repair,
        biases change (or are added to Conv/Gemm) by the mean output shift.
    Preserves: graph inputs/outputs, opset imports, weights that are not selected.
    Guarantees: ``len(unique(W)) <= clusters`` per tensor (per channel with ``per_channel``,
        except where ``size_aware`` chose one codebook for the tensor because its per-channel
        codebooks would outweigh its int8 form; records give both byte counts and the choice);
        packed and baked models give bit-identical weights; each tensor's relative weight error
        (and with repair the relative output error on calibration data before/after) is in
        the report records. Weights it cannot handle are left as they are, with a skip reason.
    Not exact: outputs change; tests bound them from the reported errors
        (tests/passes/test_cluster.py).
    """

    config_class = ClusterConfig

    def call(self, model: ir.Model) -> PassReport:
        """Transform ``model`` in place; see the class docstring."""
        report = self.new_report(model)
        cfg = self.config
        opts = dataclasses.replace(cfg.sharing_options(), size_aware_clusters=cfg.clusters if cfg.size_aware else 0)
        seed = self.context.seed

        def fit(w: np.ndarray, axis: int | None) -> Codebook:
            return fit_kmeans(w, cfg.clusters, axis, init=cfg.init, keep_zeros=cfg.keep_zeros, seed=seed)

        ctx = self.context
        shared = weight_sharing.apply(
            model, fit, opts, calibration=ctx.calibration, pass_name=self.name, quiet=ctx.quiet
        )
        report.absorb(shared)
        return report
