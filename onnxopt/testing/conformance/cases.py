"""The ONNX backend conformance cases, built in memory from the ``onnx`` wheel.

Two sources, as onnx's own backend runner uses them:
    - node cases: the generators in ``onnx.backend.test.case.node`` build each one-node model
      with its inputs and expected outputs when their module is imported (numpy seeded with 0
      before every generator, so the cases are the same on every run);
    - model folders under ``onnx/backend/test/data``: ``simple``, ``pytorch-converted`` and
      ``pytorch-operator`` (``model.onnx`` + ``test_data_set_*``), and ``light`` (a model and
      its expected output; the input is ``arange(n) / n``, as in onnx's runner).
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import pkgutil
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.backend.test.loader as onnx_loader
from onnx import numpy_helper

__all__ = [
    "DATA_SUITES",
    "Case",
    "folder_cases",
    "light_cases",
    "node_cases",
    "node_modules",
]

DATA_DIR = pathlib.Path(onnx_loader.DATA_DIR)
DATA_SUITES = ("simple", "pytorch-converted", "pytorch-operator")


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case: a serialized model and its data sets.

    Attributes:
        name: the onnx test name (``test_abs``).
        suite: ``node``, ``light``, ``simple``, ``pytorch-converted`` or ``pytorch-operator``.
        model: the serialized ``ModelProto``.
        data_sets: per data set, (feed by input name, expected outputs in graph order).
        rtol: the case's relative tolerance (onnx's runner default 1e-3).
        atol: the case's absolute tolerance (onnx's runner default 1e-7).
    """

    name: str
    suite: str
    model: bytes
    data_sets: tuple[tuple[dict[str, Any], list[Any]], ...]
    rtol: float = 1e-3
    atol: float = 1e-7

    @property
    def key(self) -> str:
        """``suite/name``, unique over all suites."""
        return f"{self.suite}/{self.name}"


def _normalize(item: Any) -> Any:
    if isinstance(item, onnx.TensorProto):
        return numpy_helper.to_array(item)
    if isinstance(item, np.generic):
        return np.asarray(item)  # onnxruntime takes arrays, not numpy scalars
    return item


def _feed(model: onnx.ModelProto, inputs: Sequence[Any]) -> dict[str, Any]:
    # Positional, as onnx's runner does: the i-th value feeds the i-th graph input.
    names = [v.name for v in model.graph.input]
    return {names[i]: _normalize(x) for i, x in enumerate(inputs)}


def node_modules() -> list[str]:
    """Names of the generator modules in ``onnx.backend.test.case.node`` (sorted)."""
    import onnx.backend.test.case.node as pkg

    prefix = pkg.__name__ + "."
    walk = pkgutil.walk_packages(pkg.__path__, prefix)  # includes the ai_onnx_ml/ subpackage
    names = (m.name[len(prefix) :] for m in walk if not m.ispkg)
    return sorted(n for n in names if not any(part.startswith("_") for part in n.split(".")))


def node_cases(modules: Iterable[str] | None = None) -> list[Case]:
    """Node cases of the given generator modules (all of them when ``None``), sorted by name.

    Importing a generator module runs its exports; the cases it adds to onnx's global list are
    kept per module, so later calls in the same process return the same cases.
    """
    import onnx.backend.test.case.node as pkg

    found: list[Case] = []
    for name in node_modules() if modules is None else modules:
        if name not in _BY_MODULE:
            start = len(pkg._NodeTestCases)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the generators overflow casts on purpose
                with np.errstate(all="ignore"):
                    importlib.import_module(f"{pkg.__name__}.{name}")
            _BY_MODULE[name] = [_node_case(tc) for tc in pkg._NodeTestCases[start:]]
        found += _BY_MODULE[name]
    return sorted(found, key=lambda c: c.name)


# Cases per generator module: a module runs its generators once per process, at import.
_BY_MODULE: dict[str, list[Case]] = {}


def _node_case(tc: Any) -> Case:
    model = tc.model
    data_sets = tuple(
        (_feed(model, inputs), [_normalize(o) for o in outputs]) for inputs, outputs in tc.data_sets
    )
    return Case(tc.name, "node", model.SerializeToString(), data_sets, tc.rtol, tc.atol)


def _load_value(path: pathlib.Path, type_proto: onnx.TypeProto) -> Any:
    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def folder_cases(suites: Sequence[str] = DATA_SUITES) -> list[Case]:
    """Cases of the model folders (``model.onnx`` + ``test_data_set_*``) of ``suites``."""
    found = []
    for suite in suites:
        for tc in onnx_loader.load_model_tests(kind=suite):
            folder = pathlib.Path(tc.model_dir)
            raw = (folder / "model.onnx").read_bytes()
            model = onnx.load_from_string(raw)
            data_sets = []
            for ds in sorted(folder.glob("test_data_set_*")):
                n_in = len(list(ds.glob("input_*.pb")))
                n_out = len(list(ds.glob("output_*.pb")))
                inputs = {
                    model.graph.input[i].name: _load_value(ds / f"input_{i}.pb", model.graph.input[i].type)
                    for i in range(n_in)
                }
                outputs = [
                    _load_value(ds / f"output_{i}.pb", model.graph.output[i].type) for i in range(n_out)
                ]
                data_sets.append((inputs, outputs))
            found.append(Case(tc.name, suite, raw, tuple(data_sets), tc.rtol, tc.atol))
    return sorted(found, key=lambda c: c.key)


def light_cases() -> list[Case]:
    """The ``light`` models (small stand-ins of the model zoo) with their expected outputs."""
    found = []
    for tc in onnx_loader.load_model_tests(kind="real"):
        if not (tc.url or "").startswith("onnx/backend/test/data/light/"):
            continue
        path = DATA_DIR / "light" / pathlib.Path(tc.url).name
        raw = path.read_bytes()
        model = onnx.load_from_string(raw)
        inits = {i.name for i in model.graph.initializer}
        feed = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
            n = int(np.prod(shape))
            feed[vi.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
        outputs = []
        for i in range(len(model.graph.output)):
            out = path.with_name(f"{path.stem}_output_{i}.pb")
            outputs.append(_load_value(out, model.graph.output[i].type))
        found.append(Case(tc.name, "light", raw, ((feed, outputs),), tc.rtol, tc.atol))
    return sorted(found, key=lambda c: c.key)
