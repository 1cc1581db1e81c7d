from __future__ import annotations

import importlib
import pkgutil

import onnxopt.passes
import pytest

from onnxopt import pass_base


def test_every_pass_module_registers_exactly_one_pass():
    before = {}
    for info in pkgutil.iter_modules(onnxopt.passes.__path__):
        module = importlib.import_module(f"onnxopt.passes.{info.name}")
        registered = [
            cls for cls in pass_base.all_passes().values() if cls.__module__ == module.__name__
        ]
        before[info.name] = len(registered)
    assert before, "no pass modules found"
    assert all(n == 1 for n in before.values()), before


def test_unknown_pass_lists_known_names():
    with pytest.raises(KeyError) as err:
        pass_base.get("simplfy")
    message = err.value.args[0]
    assert "unknown pass 'simplfy'" in message and "simplify" in message


def test_duplicate_name_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        pass_base.register("simplify")(type("Dup", (pass_base.OptPass,), {}))


def test_pass_repr_is_readable():
    p = pass_base.make("simplify", {"cse": "false"})
    assert repr(p).startswith("simplify(SimplifyConfig(") and "cse=False" in repr(p)


def test_names_are_kebab_case_and_documented():
    for name, cls in pass_base.all_passes().items():
        assert name == name.lower() and " " not in name and "_" not in name
        doc = cls.__doc__ or ""
        for section in ("Changes:", "Preserves:", "Guarantees:", "Not exact:"):
            assert section in doc, f"{name} docstring lacks {section}"
