"""The rules the package layout keeps (docs/architecture.md), checked on the source's syntax trees.

- Engines (``onnxopt/quant``, ``onnxopt/compress``, ``onnxopt/distill``) never import
  ``onnxopt.pass_base`` or ``onnxopt.context``.
- No pass module builds a pass by name (``pass_base.make`` / ``get``) or imports another pass
  module; ``passes/__init__.py`` imports them all (that is how they register) but builds none.
- ``onnxopt/recipes.py`` is the only library module that constructs ``Recipe`` objects.
"""

from __future__ import annotations

import ast
import pathlib

import onnxopt.passes
import pytest

import onnxopt

PACKAGE = pathlib.Path(onnxopt.__file__).resolve().parent
PASSES = pathlib.Path(onnxopt.passes.__file__).resolve().parent
ENGINES = ("quant", "compress", "distill")
FRAMEWORK = ("onnxopt.pass_base", "onnxopt.context")
REGISTRY_CALLS = frozenset({"make", "get"})


def _module_name(path: pathlib.Path) -> str:
    """Dotted name of a library file (``passes/`` is installed as ``onnxopt.passes``)."""
    if path.is_relative_to(PASSES):
        parts = ["onnxopt", "passes", *path.relative_to(PASSES).with_suffix("").parts]
    else:
        parts = ["onnxopt", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, absolute; ``from X import Y`` gives X and X.Y (Y may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def registry_calls(source: str) -> list[str]:
    """Calls that build or look up a pass by name: ``pass_base.make(...)``, ``make(...)`` imported from it."""
    tree = ast.parse(source)
    registry_modules = {"onnxopt.pass_base", "onnxopt.passes"}
    local = set()  # names bound to make/get of the registry by `from ... import`
    modules = set()  # names bound to the registry modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in registry_modules:
            local.update(a.asname or a.name for a in node.names if a.name in REGISTRY_CALLS)
        if isinstance(node, ast.ImportFrom) and node.module == "onnxopt":
            modules.update(a.asname or a.name for a in node.names if a.name in ("pass_base", "passes"))
        if isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name in registry_modules)
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in local:
            calls.append(f"{func.id}() at line {node.lineno}")
        elif (isinstance(func, ast.Attribute) and func.attr in REGISTRY_CALLS
              and ast.unparse(func.value) in modules):
            calls.append(f"{ast.unparse(func)}() at line {node.lineno}")
    return calls


def recipe_constructions(source: str) -> list[int]:
    """Lines where ``Recipe(...)`` or ``<module>.Recipe(...)`` is called."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name == "Recipe":
                lines.append(node.lineno)
    return lines


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_scans_see_the_library():
    # A scan that finds no files would pass every rule below.
    for sub in ENGINES:
        assert _files(PACKAGE / sub), sub
    assert len(_files(PASSES)) > 10
    assert recipe_constructions((PACKAGE / "recipes.py").read_text())


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_import_neither_the_pass_base_nor_the_context(engine):
    problems = []
    for path in _files(PACKAGE / engine):
        imported = imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")
        problems += [f"{path.relative_to(PACKAGE.parent)} imports {m}" for m in sorted(imported)
                     if any(m == f or m.startswith(f + ".") for f in FRAMEWORK)]
    assert not problems, "\n".join(problems)


def test_passes_build_no_pass_by_name_and_import_no_other_pass():
    pass_modules = {_module_name(p) for p in _files(PASSES) if p.name != "__init__.py"}
    assert "onnxopt.passes.quantize" in pass_modules and "onnxopt.passes.mixed" in pass_modules
    problems = []
    for path in _files(PASSES):
        source, name = path.read_text(), _module_name(path)
        problems += [f"{path.name}: {call}" for call in registry_calls(source)]
        if path.name == "__init__.py":
            continue  # imports every pass module: that is how they register
        imported = imported_modules(source, name)
        problems += [f"{path.name} imports {m}" for m in sorted(imported & pass_modules) if m != name]
    assert not problems, "\n".join(problems)


def test_recipes_are_constructed_only_in_recipes_py():
    problems = []
    for path in _files(PACKAGE) + _files(PASSES):
        if path == PACKAGE / "recipes.py":
            continue
        problems += [f"{path}:{line}" for line in recipe_constructions(path.read_text())]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_each_kind_of_violation():
    # The scanners on small sources: every form of a broken rule is found, the allowed forms are not.
    quant = "onnxopt.quant.static"
    assert "onnxopt.pass_base" in imported_modules("from onnxopt import pass_base", quant)
    assert "onnxopt.context" in imported_modules("from onnxopt.context import PassContext", quant)
    assert "onnxopt.context" in imported_modules("import onnxopt.context", quant)
    assert "onnxopt.pass_base" in imported_modules("from .. import pass_base", quant)
    assert "onnxopt.passes.quantize" in imported_modules("from .quantize import QuantizeConfig", "onnxopt.passes.mixed")
    assert "onnxopt.passes.quantize" in imported_modules("from onnxopt.passes import quantize", "onnxopt.passes.mixed")
    assert registry_calls("from onnxopt import pass_base\npass_base.make('quantize', {})")
    assert registry_calls("from onnxopt.pass_base import make\nmake('quantize')")
    assert registry_calls("from onnxopt.passes import get as find\nfind('quantize')")
    assert registry_calls("import onnxopt.pass_base\nonnxopt.pass_base.get('x')")
    assert not registry_calls("from onnxopt.pass_base import OptPass\nd = {}\nd.get('x')")
    assert recipe_constructions("from onnxopt import recipes\nrecipes.Recipe('x', '', ())") == [2]
    assert recipe_constructions("r = Recipe('x', '', ())") == [1]
