"""Every ssl_kit module imports on its own, and the lower packages never import a method (issue #25).

A module that only imports because another one happened to load first breaks a user's notebook that imports
it first. One subprocess imports torch / Lightning / timm once, then, for each module, forgets every
``ssl_kit`` module and imports that one alone: the same as a fresh interpreter for anything inside ssl_kit.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import ssl_kit

PACKAGE = Path(ssl_kit.__file__).parent
# only the command line sits above the methods: nothing else may import ssl_kit.methods (DESIGN.md: evaluation
# reads encoders, not method internals)
ABOVE_METHODS = {"cli.py"}

IMPORT_EACH = r"""
import importlib, json, pkgutil, sys, warnings
warnings.simplefilter("ignore")  # timm warns when the iRPE ViT registers a second time
import torch, pytorch_lightning, timm  # noqa: F401  (third-party imports stay loaded: only ssl_kit is re-imported)
import ssl_kit
names = sorted(m.name for m in pkgutil.walk_packages(ssl_kit.__path__, "ssl_kit."))
failed = {}
for name in names:
    for key in [k for k in sys.modules if k == "ssl_kit" or k.startswith("ssl_kit.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed[name] = f"{type(err).__name__}: {err}"
print(json.dumps({"modules": names, "failed": failed}))
"""


def test_every_module_imports_on_its_own() -> None:
    out = subprocess.run([sys.executable, "-c", IMPORT_EACH], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["modules"]) > 40, result["modules"]  # the walk found the package, not an empty list
    assert result["failed"] == {}


def imported_modules(path: Path) -> set[str]:
    """Every module name a file imports (``import a.b`` and ``from a.b import c``, at any depth)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_below_the_methods_imports_one() -> None:
    files = [f for f in PACKAGE.rglob("*.py") if not f.is_relative_to(PACKAGE / "methods")
             and str(f.relative_to(PACKAGE)) not in ABOVE_METHODS]
    assert len(files) > 40
    upward = {str(f.relative_to(PACKAGE)): sorted(m for m in imported_modules(f) if m.startswith("ssl_kit.methods"))
              for f in files}
    assert {f: m for f, m in upward.items() if m} == {}


def test_methods_and_evaluation_do_not_import_each_other() -> None:
    """Both read encoders through ssl_kit.encoders (DESIGN.md); a method's pictures and monitors come from the
    run-wide callbacks, not from evaluation internals."""
    methods = {str(f.relative_to(PACKAGE)): sorted(m for m in imported_modules(f) if m.startswith("ssl_kit.eval"))
               for f in (PACKAGE / "methods").rglob("*.py")}
    assert len(methods) > 5 and {f: m for f, m in methods.items() if m} == {}


def test_nothing_imports_the_command_line() -> None:
    """ssl-pretrain's module sits on top (it imports every method): the evaluation commands share its logging and
    error handling through runtime / errors, not by importing it."""
    top = {str(f.relative_to(PACKAGE)): sorted(m for m in imported_modules(f) if m == "ssl_kit.cli")
           for f in PACKAGE.rglob("*.py") if f != PACKAGE / "cli.py"}
    assert {f: m for f, m in top.items() if m} == {}


def test_import_scan_sees_a_method_import(tmp_path: Path) -> None:
    """The scan above can fail: a nested ``from ssl_kit.methods.mae import MAE`` is found."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from ssl_kit.methods.mae import MAE\n    return MAE\n")
    assert "ssl_kit.methods.mae" in imported_modules(source)
