"""Low-rank split of MatMul/Gemm/Conv weights: W[K,N] ~= U[K,r] @ V[r,N], plain or activation-aware.

The algebra (plain SVD, whitening by the activations' second moment, the exact output-error
curve, the least-squares re-fit) is in :mod:`onnxopt.compress.lowrank_math`; the graph rewrite in
:mod:`onnxopt.compress.lowrank_graph`. This module picks the candidates, streams the calibration
activations through onnxruntime into ``X^T X`` per input (never all activations at once),
chooses the ranks and records what each split costs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
import tqdm

from onnxopt import _ir_utils
from onnxopt.compress import lowrank_graph as lg
from onnxopt.compress import lowrank_math as lm
from onnxopt.config import option
from onnxopt.pass_base import OptPass, PassReport, register
from onnxopt.quant import sensitivity
from onnxopt.runtime import feedgen
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.data import Dataset

__all__ = ["LowRankConfig", "LowRankPass"]

logger = logging.getLogger(__name__)

_OPS = frozenset({"MatMul", "Gemm", "Conv", "Gather"})
_DEFAULT_OPS = frozenset({"MatMul", "Gemm", "Conv"})  # Gather (embeddings) on request: the lowrank recipe
_Stats = tuple[np.ndarray, float]  # (X^T X in float64, mean rows per feed)
_GRAM_BLOCK = 1 << 21  # activation values (float64: 16 MiB) stacked per input before one X^T X update


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """Options of the lowrank pass."""

    method: Literal["auto", "aware", "plain"] = option(
        "auto", "aware: whiten by calibration X^T X; plain: SVD of W; auto: aware if data is given"
    )
    rank_mode: Literal["ratio", "energy", "error", "global", "budget"] = option(
        "ratio",
        "rank rule: fixed ratio, kept energy, per-layer error budget, global target, or budget "
        "(the largest global target whose model meets the context's --min-cosine/--max-error, "
        "measured in onnxruntime on --eval data, else --calib, else generated feeds)",
    )
    rank_ratio: float = option(0.25, "ratio mode: keep ceil(rank_ratio * min(K, N)) singular values")
    energy: float = option(0.99, "energy mode: keep this fraction of sum(sigma^2)")
    max_rel_error: float = option(0.05, "error mode: largest relative output error per layer")
    target: float = option(0.5, "global mode: fraction of the candidate layers' cost to remove")
    target_metric: Literal["params", "flops"] = option("params", "global mode: what target counts")
    min_saving: float = option(0.1, "split only if r*(K+N) < (1 - min_saving)*K*N; < 0 allows growth")
    min_elements: int = option(4096, "leave weights with fewer elements alone")
    damping: float = option(1e-4, "aware: add damping * mean(diag X^T X) to the diagonal")
    refit: bool = option(False, "least-squares re-fit of V on calibration data after choosing U")
    compensate: bool = option(
        False, "error-compensated fit: after choosing the ranks, run the split model on the calibration "
        "data and refit every split layer (closed form) so that its input there, X', reproduces the "
        "original layer output X W (upstream splits' error included); one extra pair of model runs"
    )
    spatial: bool = option(False, "also split k x k Conv into k x 1 then 1 x k (weight SVD)")
    exact_rows: bool = option(
        True, "Gather with calibration data: the table rows the calibration data reads (its frequent "
        "tokens) stay exact and only the other rows are factored (two int32 [V] index maps)"
    )
    op_types: frozenset[str] = option(
        _DEFAULT_OPS, "ops to split: MatMul, Gemm, Conv, and Gather (a [V, D] embedding table; not by default)"
    )
    max_feeds: int = option(256, "calibration feeds used for activation statistics")
    default_min_cosine: float = option(
        0.99, "budget mode: output cosine to the input model when the context gives no budget"
    )
    search_steps: int = option(8, "budget mode: bisection steps over the global target (one model run each)")
    eval_feeds: int = option(32, "budget mode: feeds each trial model is measured on")
    sensitivity: bool = option(
        True, "budget mode: split each layer alone once (at half its pay-off rank), measure the model "
        "output, and scale that layer's error curve by it, so layers the output is sensitive to keep rank"
    )

    def __post_init__(self) -> None:
        checks = {
            "rank_ratio": (0.0 < self.rank_ratio <= 1.0, "(0, 1]"),
            "energy": (0.0 < self.energy <= 1.0, "(0, 1]"),
            "max_rel_error": (0.0 <= self.max_rel_error < 1.0, "[0, 1)"),
            "target": (0.0 < self.target < 1.0, "(0, 1)"),
            "min_saving": (self.min_saving < 1.0, "(-inf, 1)"),
            "min_elements": (self.min_elements >= 0, ">= 0"),
            "damping": (0.0 <= self.damping < 1.0, "[0, 1)"),
            "max_feeds": (self.max_feeds >= 1, ">= 1"),
            "default_min_cosine": (-1.0 <= self.default_min_cosine <= 1.0, "[-1, 1]"),
            "search_steps": (self.search_steps >= 1, ">= 1"),
            "eval_feeds": (self.eval_feeds >= 1, ">= 1"),
        }
        for name, (ok, valid) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be in {valid}, got {getattr(self, name)}")
        unknown = sorted(set(self.op_types) - _OPS)
        if unknown:
            raise ValueError(f"op_types: unsupported {unknown[0]!r}; valid: {', '.join(sorted(_OPS))}")


@register("lowrank")
class LowRankPass(OptPass[LowRankConfig]):
    """Replace MatMul(x, W) / Gemm(x, W, C) / 1x1 Conv by two thinner nodes of rank r (+ bias).

    An embedding ``Gather(E, ids)`` becomes ``MatMul(Gather(U, ids), V)``; with calibration data
    (``exact_rows``) the rows it reads stay exact and only the others are factored (the ``Add`` form
    in :mod:`onnxopt.compress.lowrank_graph`).

    Changes: per split node adds initializers ``<W>.lr_u``, ``<W>.lr_v`` and one node before
        it (the original node becomes the ``V`` half and keeps its output name); drops W once
        it has no users. An embedding with exact rows also gets ``<E>.lr_cold_map``,
        ``<E>.lr_hot_map`` (int32 [V]) and ``<E>.lr_hot_rows``, four Gathers and a MatMul before
        the node, which becomes the Add. Optional k x k Conv -> k x 1, 1 x k (``spatial``).
    Preserves: graph input/output names, dtypes and shapes; opset imports; nodes in subgraphs
        (only the main graph is split); weights shared by several nodes.
    Guarantees: splits only where r*(K+N) < (1 - min_saving)*K*N; per layer the report records
        K, N, r, parameter and FLOP reduction, weight error and (with calibration data) the
        relative output error on that data; at full rank the layer is reproduced up to fp32
        rounding, and a weight of rank <= r is split exactly (tolerance "reassociate_fp32").
        With ``compensate`` every split layer is the exact rank-r least-squares fit (plus the
        damping ridge) of the original layer output from the input it sees in the split model,
        on the calibration data.
    Not exact: a truncated split changes outputs by the reported ``output_rel_error``
        (relative L2 of the layer output without its bias, on calibration data).
    """

    config_class = LowRankConfig
    lossless = False

    def requires(self, model: ir.Model) -> None:
        """Refuse method "aware" without calibration data in the context."""
        if self.config.method == "aware" and self.context.calibration is None:
            raise ir.passes.PreconditionError("lowrank method='aware' needs calibration data (--calib)")

    def call(self, model: ir.Model) -> PassReport:
        """Split every qualifying node in place; see the class docstring."""
        report = self.new_report(model)
        cfg = self.config
        cands = self._candidates(model, report)
        if not cands:
            return report
        stats = self._statistics(model, cands)
        cands = self._hot_rows(cands, stats, report)
        stats = {key: st for key, st in stats.items() if key[1][0] != "ids"}
        aware = cfg.method == "aware" or (cfg.method == "auto" and bool(stats))
        if cfg.method == "auto" and self.context.calibration is None:
            report.note("no calibration data: plain SVD of the weights")
        if not cands:
            return report
        plans = []
        quiet = self.context.quiet or len(cands) < 2
        bar = tqdm.tqdm(cands, desc="lowrank svd", unit="layer", disable=quiet, leave=False)
        for cand in bar:
            gram, rows = stats.get(cand.stats_key, (None, 0.0))
            dec = lm.decompose(cand.matrix, gram if aware else None, damping=cfg.damping)
            if aware and gram is not None and dec.note:
                report.count("aware_fallback_to_plain")
                report.note(f"{cand.label}: {dec.note}; used plain SVD")
            elif aware and gram is None and cand.kind not in ("conv-spatial", "gather"):
                report.note(f"{cand.label}: no activation statistics; used plain SVD")
            k, n = cand.matrix.shape
            limit = lg.breakeven_rank(k, n, cfg.min_saving)
            plans.append((cand, dec, gram, rows, dec.error_curve(gram), limit))
        if cfg.rank_mode == "budget":
            ranks = self._search(model, plans, report)
        else:
            ranks = self._ranks(plans, report)
        factors = self._factor_set(model, plans, ranks)
        taken = _names(model.graph)
        for (cand, dec, gram, rows, _curve, limit), rank, fac in zip(plans, ranks, factors, strict=True):
            if rank is None:
                report.skip(f"{cfg.rank_mode} mode: layer left unsplit")
                continue
            if rank > limit:
                report.skip("split would not pay: r*(K+N) >= (1 - min_saving)*K*N")
                continue
            self._split(model.graph, cand, dec, gram, rows, rank, fac, taken, report)
        if cfg.compensate and any(f is not None and f[2] == "compensated" for f in factors):
            report.note("compensated: split layers refitted on the inputs of the split model "
                        "(target: the original layer outputs on the calibration data)")
        return report

    def _hot_rows(self, cands: list[lg.Candidate], stats: dict, report: PassReport) -> list[lg.Candidate]:
        """Mark the embedding rows the calibration data reads as exact (``exact_rows``); a table
        whose every row is read, or whose remaining rows are too few, is not split."""
        out = []
        for cand in cands:
            counts = stats.get(cand.stats_key, (None,))[0] if cand.kind == "gather" else None
            if cand.kind == "gather" and self.context.calibration is not None and self.config.exact_rows \
                    and not _reads_input_rows(cand, True):
                report.note(f"{cand.label}: indices are computed, not a graph input: every row factored")
            if counts is None:
                out.append(cand)
                continue
            hot = counts > 0
            cold = cand.matrix[~hot]
            if cold.size < max(self.config.min_elements, 1) or min(cold.shape) < 2:
                report.skip("embedding: the calibration data reads (nearly) every row, nothing left to factor")
                continue
            cand.hot, cand.matrix = hot, cold
            report.note(f"{cand.label}: {int(hot.sum())} of {hot.size} rows read by the calibration data "
                        "stay exact; the other rows are factored")
            out.append(cand)
        return out

    def _candidates(self, model: ir.Model, report: PassReport | None) -> list[lg.Candidate]:
        """The splittable nodes of the main graph in graph order (skip reasons go to ``report``)."""
        cfg = self.config
        cands: list[lg.Candidate] = []
        for node in _ir_utils.iter_nodes(model, cfg.op_types):
            if node.graph is not model.graph:
                found: lg.Candidate | str = "node is in a subgraph (only the main graph is split)"
            else:
                found = lg.find_candidate(
                    node, min_elements=cfg.min_elements, spatial=cfg.spatial, pass_name=self.name
                )
            if not isinstance(found, str):
                cands.append(found)
            elif report is not None:
                report.skip(found)
        return cands

    def _statistics(self, model: ir.Model, cands: list[lg.Candidate]) -> dict[tuple, _Stats]:
        """Per activation key: (X^T X in float64, mean rows per feed), streamed feed by feed.

        Cached in ``context.cache`` under the model's digest, so a later lowrank pass on the
        same model and data (another rank rule, say) does not run onnxruntime again.
        """
        data = self.context.calibration
        keys = {c.stats_key for c in cands if c.activation is not None and c.activation.name
                and (c.kind != "gather" or _reads_input_rows(c, self.config.exact_rows))}
        if data is None or not keys:
            return {}
        if len(data) > self.config.max_feeds:
            data = data.take(self.config.max_feeds)
        digest = _digest(model)
        scope = ("lowrank.gram", digest, id(self.context.calibration), len(data))
        cache = self.context.cache.setdefault(scope, {}) if digest else {}
        missing = {key for key in keys if key not in cache}
        if missing:
            cache.update(self._collect(model, data, missing))
        return {key: cache[key] for key in keys if key in cache}

    def _collect(self, model: ir.Model, data: Dataset, keys: set[tuple]) -> dict[tuple, _Stats]:
        names = sorted({name for name, _ in keys})
        grams: dict[tuple, np.ndarray] = {}
        rows: dict[tuple, int] = dict.fromkeys(keys, 0)
        pending: dict[tuple, list[np.ndarray]] = {key: [] for key in keys}

        def flush(key: tuple) -> None:
            # One X^T X over many feeds' rows: a sentence gives ~20 rows, and a [20, K] product
            # into a [K, K] sum is bound by memory traffic (MPNet ran at 1.3 feeds/s); stacked, it is BLAS-bound.
            x = np.concatenate(pending[key]) if len(pending[key]) > 1 else pending[key][0]
            pending[key] = []
            grams[key] = grams[key] + x.T @ x if key in grams else x.T @ x

        quiet = self.context.quiet
        feeds = tqdm.tqdm(data, desc="lowrank stats", unit="feed", disable=quiet, leave=False)
        count = 0
        for captured in runtime.capture(model, feeds, names):
            count += 1
            for key in keys:
                if key[1][0] == "ids":  # an embedding's indices: how often each row is read
                    counts = lg.index_counts(captured[key[0]], key[1][1])
                    grams[key] = grams[key] + counts if key in grams else counts
                    continue
                x = lg.rows_of(np.asarray(captured[key[0]]), key[1]).astype(np.float64)
                pending[key].append(x)
                rows[key] += x.shape[0]
                if sum(len(b) for b in pending[key]) * x.shape[1] >= _GRAM_BLOCK:
                    flush(key)
        for key, blocks in pending.items():
            if blocks:
                flush(key)
        return {key: (grams[key], rows[key] / max(count, 1)) for key in grams}

    def _ranks(self, plans: list, report: PassReport) -> list[int | None]:
        cfg = self.config
        if cfg.rank_mode != "global":
            out: list[int | None] = []
            for cand, dec, _gram, _rows, curve, _limit in plans:
                k, n = cand.matrix.shape
                if cfg.rank_mode == "ratio":
                    out.append(min(lm.rank_for_ratio(cfg.rank_ratio, k, n), dec.max_rank))
                elif cfg.rank_mode == "energy":
                    out.append(lm.rank_for_energy(dec.sigma, cfg.energy))
                else:
                    out.append(lm.rank_for_error(curve, cfg.max_rel_error))
            return out
        budgets, what = self._layer_budgets(plans, report)
        ranks, removed = lm.allocate_ranks(budgets, cfg.target)
        report.note(
            f"global target: removed {removed:.1%} of the candidate layers' {what} "
            f"(target {cfg.target:.1%})"
        )
        return ranks

    def _layer_budgets(self, plans: list, report: PassReport) -> tuple[list[lm.LayerBudget], str]:
        """One :class:`LayerBudget` per plan (cost in parameters or FLOPs) and what it counts."""
        flops = self.config.target_metric == "flops"
        if flops and any(rows <= 0 for _c, _d, _g, rows, _cu, _l in plans):
            report.note("target_metric=flops needs activation statistics for every layer; "
                        "counted parameters")
            flops = False
        budgets = [
            lm.LayerBudget(curve, *cand.matrix.shape, limit, rows if flops else 1.0)
            for cand, _dec, _gram, rows, curve, limit in plans
        ]
        return budgets, "FLOPs" if flops else "parameters"

    def _check_feeds(self, model: ir.Model, report: PassReport) -> list[dict[str, np.ndarray]] | None:
        """Feeds the budget is measured on: evaluation, else calibration, else generated."""
        ctx = self.context
        n = self.config.eval_feeds
        if ctx.evaluation is not None:
            return [dict(f) for f in ctx.evaluation.take(n)]
        if ctx.calibration is not None:
            report.note("budget measured on the calibration data (the ranks were fitted on it); "
                        "pass --eval DATA for held-out data")
            return [dict(f) for f in ctx.calibration.take(n)]
        try:
            feeds = feedgen.runnable_feeds(model, min(n, 8), seed=ctx.seed, cache=ctx.cache)
        except Exception as err:  # noqa: BLE001 - any reason the model cannot run is reported
            report.note(f"budget mode: no feeds the model runs on ({str(err).splitlines()[0][:200]}); "
                        "nothing split")
            return None
        report.note("budget measured on generated feeds (no --eval/--calib data): real inputs may differ")
        return [dict(f) for f in feeds]

    def _search(self, model: ir.Model, plans: list, report: PassReport) -> list[int | None]:
        """Ranks of the largest global target whose split model meets the budget (bisection).

        Each trial allocates ranks for a target fraction of the candidate layers' cost (the
        cheapest output error per removed parameter first, as ``global`` mode), splits a clone
        and runs it in onnxruntime on the check feeds. Nothing split (target 0) always meets
        the budget, so the bisection keeps the best trial that met it. Layers whose first paying
        split is a large step (:func:`_chunky`: an embedding table) make the allocation jump, so
        the search runs a second time with them left whole and keeps whichever removes more.
        """
        ctx, cfg = self.context, self.config
        budget = sensitivity.Budget.from_bounds(
            min_cosine=ctx.min_cosine, max_error=ctx.max_error, metric=ctx.metric,
            min_metric=ctx.min_metric, default_min_cosine=cfg.default_min_cosine,
        )
        nothing: list[int | None] = [None] * len(plans)
        feeds = self._check_feeds(model, report)
        if feeds is None:
            return nothing
        feeds = feeds + self._unread_row_feeds(plans, feeds, report)
        reference = sensitivity.run_outputs(model, feeds)
        budgets, what = self._layer_budgets(plans, report)
        if cfg.sensitivity and budget.metric is None:
            budgets = self._weigh(model, plans, budgets, reference, feeds, budget, report)
        variants = [("", budgets)]
        chunky = _chunky(budgets)
        if chunky and len(chunky) < sum(b.max_rank >= 1 for b in budgets):  # the allocation jumps past them: also search with them left whole
            labels = ", ".join(plans[i][0].label for i in chunky)
            whole = [dataclasses.replace(b, max_rank=0) if i in chunky else b for i, b in enumerate(budgets)]
            variants.append((f" (without {labels})", whole))
        seen: dict[tuple, sensitivity.Measurement] = {}
        results = [self._bisect(model, plans, layers, feeds, reference, budget, seen, report, what, tag)
                   for tag, layers in variants]
        best, best_removed, best_m, tag = max(results, key=lambda r: r[1])
        met = best_m.cosine if best_m is not None else 1.0
        report.count("budget_met")
        if len(variants) > 1:
            report.note(f"budget search: {'kept' if tag else 'split'} "
                        f"{', '.join(plans[i][0].label for i in chunky)} "
                        "(searched with and without: the first split that pays removes over "
                        f"{_CHUNK:.0%} of the candidate {what} at once)")
        report.note(
            f"budget {budget.describe()}: kept ranks removing {best_removed:.1%} of the candidate "
            f"{what} (measured cosine {met:.6f} on {len(feeds)} feeds); splits pay only where "
            "r < K*N/(K+N), the rest stay whole"
        )
        return best

    def _unread_row_feeds(self, plans: list, feeds: list[dict[str, np.ndarray]], report: PassReport) -> list:
        """Copies of the check feeds that read the embedding rows the calibration data did not.

        With ``exact_rows`` the rows the check data reads are exact, so without these feeds the
        budget would not see the factored rows at all (check data = calibration data: none of
        them). In each copy ``UNREAD_SHARE`` of the token ids are replaced by seeded random unread
        rows; both models run the same copy, so the budget measures what those rows cost.
        """
        rng = np.random.default_rng(self.context.seed)
        tables = [p[0] for p in plans if p[0].kind == "gather" and p[0].hot is not None]
        if not tables:
            return []
        out = []
        for feed in feeds:
            copy = dict(feed)
            for cand in tables:
                name = cand.activation.name
                if name not in copy:
                    continue
                ids = np.array(copy[name])
                hit = rng.random(ids.shape) < UNREAD_SHARE
                ids[hit] = rng.choice(np.flatnonzero(~cand.hot), int(hit.sum()))
                copy[name] = ids.astype(feed[name].dtype)
            out.append(copy)
        report.note(f"budget also checked on {len(out)} copies of the check feeds with {UNREAD_SHARE:.0%} of "
                    "the token ids replaced by rows the calibration data did not read")
        return out

    def _bisect(
        self, model: ir.Model, plans: list, budgets: list[lm.LayerBudget], feeds: list, reference: list,
        budget: sensitivity.Budget, seen: dict, report: PassReport, what: str, tag: str,
    ) -> tuple[list[int | None], float, sensitivity.Measurement | None, str]:
        """Bisection over the global target: (ranks, fraction removed, measurement, ``tag``)."""
        ctx, cfg = self.context, self.config
        _ranks, most = lm.allocate_ranks(budgets, 1.0 - 1e-9)  # the most that can be removed
        lo, hi = 0.0, most
        best: list[int | None] = [None] * len(plans)
        best_removed, best_m = 0.0, None
        steps = tqdm.trange(cfg.search_steps, desc="lowrank budget", unit="trial",
                            disable=ctx.quiet, leave=False)
        for step in steps:
            target = hi if step == 0 else (lo + hi) / 2  # the most first: often it already fits
            if target <= 0.0:
                break
            ranks, removed = lm.allocate_ranks(budgets, target)
            key = tuple(ranks)
            if key not in seen:
                trial = self._trial(model, plans, ranks, compensate=True)
                seen[key] = sensitivity.measure(reference, sensitivity.run_outputs(trial, feeds), budget)
            m = seen[key]
            report.note(f"budget search{tag}: removing {removed:.1%} of the candidate {what}: "
                        f"cosine {m.cosine:.6f}, max abs {m.max_abs:.4g} ({'fits' if m.ok else 'over'})")
            if m.ok:
                if removed > best_removed:
                    best, best_removed, best_m = ranks, removed, m
                lo = target
                if step == 0:
                    break
            else:
                hi = target
        return best, best_removed, best_m, tag

    def _weigh(
        self, model: ir.Model, plans: list, budgets: list[lm.LayerBudget], reference: list,
        feeds: list, budget: sensitivity.Budget, report: PassReport,
    ) -> list[lm.LayerBudget]:
        """Scale each layer's error curve by its measured effect on the model output.

        The curve is the layer's own relative output error; what the budget sees is the model's.
        Layer l alone at its probe rank p (half its pay-off rank) costs the model ``loss_l``;
        ``1 - cosine`` grows as the square of a small relative error (``max abs`` linearly), so
        the curve is scaled by ``sqrt(loss_l) / curve_l[p]`` (``loss_l / curve_l[p]``).
        """
        out = list(budgets)
        quiet = self.context.quiet
        bar = tqdm.tqdm(list(enumerate(budgets)), desc="lowrank sensitivity", unit="layer",
                        disable=quiet, leave=False)
        for i, layer in bar:
            probe = max(1, layer.max_rank // 2)
            if layer.max_rank < 1 or layer.curve[probe] <= 0:
                continue
            ranks: list[int | None] = [None] * len(plans)
            ranks[i] = probe
            m = sensitivity.measure(reference, sensitivity.run_outputs(self._trial(model, plans, ranks), feeds), budget)
            if not np.isfinite(m.loss):
                out[i] = dataclasses.replace(layer, max_rank=0)  # never split: it breaks the model
                continue
            loss = max(m.loss, 0.0)
            scale = (np.sqrt(loss) if budget.max_error is None else loss) / float(layer.curve[probe])
            out[i] = dataclasses.replace(layer, curve=np.asarray(layer.curve) * scale)
            plans[i][0].alone = (probe, m.cosine)
        report.note(f"budget search: each of {len(budgets)} layers measured alone at half its pay-off rank")
        return out

    def _trial(self, model: ir.Model, plans: list, ranks: list[int | None], *, compensate: bool = False) -> ir.Model:
        """A clone of ``model`` with ``ranks`` applied (the candidates are found again in it).

        ``compensate``: with the factors of :meth:`_factor_set` (the configured fit), else the
        direct ones (the per-layer sensitivity probes: one split layer sees its original input).
        """
        factors = (self._factor_set(model, plans, ranks) if compensate
                   else self._direct_factors(plans, ranks))
        return self._apply(model, plans, factors)

    def _apply(self, model: ir.Model, plans: list, factors: list) -> ir.Model:
        """A clone of ``model`` with every non-None ``(U, V, how)`` of ``factors`` split in."""
        clone = model.clone()
        cands = self._candidates(clone, None)
        taken = _names(clone.graph)
        labels = {plan[0].label for plan in plans}
        cands = [c for c in cands if c.label in labels]  # without the tables _hot_rows left whole
        for (cand, *_rest), twin, fac in zip(plans, cands, factors, strict=True):
            if twin.label != cand.label:
                raise RuntimeError(f"lowrank: clone candidate {twin.label} != {cand.label}")
            twin.hot, twin.matrix = cand.hot, cand.matrix
            if fac is not None:
                lg.apply_split(clone.graph, twin, fac[0], fac[1], self.name, taken)
        return clone

    def _direct_factors(self, plans: list, ranks: list[int | None]) -> list:
        """Per plan ``(U, V, how)`` from its own decomposition, or None where it stays whole."""
        return [
            None if rank is None or rank > limit else self._factors(cand, dec, gram, rank)
            for (cand, dec, gram, _rows, _curve, limit), rank in zip(plans, ranks, strict=True)
        ]

    def _factor_set(self, model: ir.Model, plans: list, ranks: list[int | None]) -> list:
        """The factors to split with: direct, or error-compensated when ``compensate`` is on.

        Compensated (one Jacobi sweep): the model split with the direct factors is run on the
        calibration data next to ``model``; per split layer ``G' = X'^T X'`` and ``C = X'^T X``
        give the closed-form rank-r fit of :func:`lowrank_math.compensated_target` (module
        docstring there). Layers without activations (embedding tables, spatial convs) keep the
        direct factors.
        """
        factors = self._direct_factors(plans, ranks)
        data = self.context.calibration
        if not self.config.compensate or data is None:
            return factors
        wanted = {plans[i][0].stats_key for i, f in enumerate(factors)
                  if f is not None and plans[i][0].kind != "gather"
                  and plans[i][0].activation is not None and plans[i][0].activation.name}
        if not wanted:
            return factors
        if len(data) > self.config.max_feeds:
            data = data.take(self.config.max_feeds)
        split = self._apply(model, plans, factors)
        cross = _cross_statistics(model, split, data, wanted)
        for i, fac in enumerate(factors):
            cand, _dec, _gram, _rows, _curve, _limit = plans[i]
            if fac is None or cand.stats_key not in cross:
                continue
            gram_in, c = cross[cand.stats_key]
            target = lm.compensated_target(cand.matrix, gram_in, c, damping=self.config.damping)
            dec = lm.decompose(target, gram_in, damping=self.config.damping)
            if dec.note:  # the split model's activations cannot whiten: keep the direct factors
                continue
            u, v = dec.factors(ranks[i])
            dtype = cand.weight.const_value.dtype.numpy()
            factors[i] = (u.astype(dtype), v.astype(dtype), "compensated")
        return factors

    def _factors(
        self, cand: lg.Candidate, dec: lm.Decomposition, gram: np.ndarray | None, rank: int
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """``U``, ``V`` in the weight's dtype, and how ``V`` was fitted ("direct" or "refit")."""
        u, v = dec.factors(rank)
        refit = self.config.refit and gram is not None
        if refit:
            v = lm.refit_v(cand.matrix, u, gram)
        dtype = cand.weight.const_value.dtype.numpy()
        return u.astype(dtype), v.astype(dtype), "refit" if refit else "direct"

    def _split(
        self,
        graph: ir.Graph,
        cand: lg.Candidate,
        dec: lm.Decomposition,
        gram: np.ndarray | None,
        rows: float,
        rank: int,
        factors: tuple[np.ndarray, np.ndarray, str],
        taken: set[str],
        report: PassReport,
    ) -> None:
        u, v, how = factors
        refit = how == "refit"
        k, n = cand.matrix.shape
        before, after = lg.split_cost(cand, rank)
        out_err = lm.output_rel_error(cand.matrix, u, v, gram) if gram is not None else None
        lg.apply_split(graph, cand, u, v, self.name, taken)
        report.count("split")
        report.count(f"split_{cand.kind}")
        report.record(
            cand.label,
            op=cand.node.op_type,
            kind=cand.kind,
            K=k,
            N=n,
            rank=rank,
            method=dec.method + ("+compensated" if how == "compensated" else ""),
            refit=refit,
            params_before=before,
            params_after=after,
            param_reduction=1.0 - after / before,
            flops_per_feed_before=2.0 * rows * before if rows else None,
            flops_per_feed_after=2.0 * rows * after if rows else None,
            flop_reduction=1.0 - after / before,
            weight_rel_error=lm.weight_rel_error(cand.matrix, u, v),
            output_rel_error=out_err,
            alone_rank_cosine=cand.alone,
            exact_rows=int(cand.hot.sum()) if cand.hot is not None else None,
        )
        logger.debug("lowrank: %s K=%d N=%d r=%d output error %s", cand.label, k, n, rank, out_err)


def _reads_input_rows(cand: lg.Candidate, exact_rows: bool) -> bool:
    """Whether an embedding's read rows are kept exact: ``exact_rows`` and indices that are a graph
    input. Computed indices (positions) cannot be steered to the other rows by the check data, so
    the budget would not see them; such a table is factored whole, as without data."""
    return exact_rows and cand.activation is not None and cand.activation.is_graph_input()


# Share of token ids replaced by unread embedding rows in the budget's extra check feeds: 30 % of
# the 32 held-out MiniLM sentences' tokens were not read by 256 calibration sentences of another
# domain (docs/benchmarks.md); a check at that rate covers a comparable shift in the user's data.
UNREAD_SHARE = 0.3

_CHUNK = 0.02  # a layer whose smallest paying split removes more than this share is "chunky"


def _chunky(budgets: list[lm.LayerBudget]) -> list[int]:
    """Layers whose first paying split (at ``max_rank``) removes over ``_CHUNK`` of the total cost.

    The Lagrangian allocation can only take such a layer in one large step (an embedding table
    of a small encoder is half its parameters), so every target between "without it" and
    "with it" lands on "with it"; the budget search therefore also tries them left whole.
    """
    total = sum(b.k * b.n * b.weight for b in budgets)
    if total <= 0:
        return []
    return [i for i, b in enumerate(budgets)
            if b.max_rank >= 1 and (b.k * b.n - b.max_rank * (b.k + b.n)) * b.weight / total > _CHUNK]


def _cross_statistics(
    model: ir.Model, split: ir.Model, data: Dataset, keys: set[tuple]
) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Per activation key: ``(X'^T X', X'^T X)`` with X from ``model`` and X' from ``split``.

    Both models run feed by feed in lockstep (one session each), so only one feed's activations
    are alive at a time. The activation names are the same in both (a split keeps its input).
    """
    names = sorted({name for name, _ in keys})
    out: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    feeds = list(data)
    for orig, new in zip(runtime.capture(model, feeds, names), runtime.capture(split, feeds, names), strict=True):
        for key in keys:
            x = lg.rows_of(np.asarray(orig[key[0]]), key[1]).astype(np.float64)
            xs = lg.rows_of(np.asarray(new[key[0]]), key[1]).astype(np.float64)
            g, c = xs.T @ xs, xs.T @ x
            if key in out:
                g, c = out[key][0] + g, out[key][1] + c
            out[key] = (g, c)
    return out


def _digest(model: ir.Model) -> str | None:
    """SHA-256 of the serialized model (None above the in-memory limit: no caching then)."""
    if not runtime.fits_in_memory(model):
        return None
    return hashlib.sha256(ir.to_proto(model).SerializeToString()).hexdigest()


def _names(graph: ir.Graph) -> set[str]:
    taken = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    taken |= {v.name for node in graph.all_nodes() for v in node.outputs if v.name}
    taken |= {node.name for node in graph.all_nodes() if node.name}
    return taken
