"""Layer rules import-linter cannot check: `signalbox.operator` is a namespace package (its
folder has no `__init__.py`, so it can never shadow the stdlib module `operator`), and grimp
does not see namespace packages. The rules that involve it are checked here from the source;
the rest are import-linter contracts in pyproject.toml."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_operator_does_not_import_the_data_plane():
    offenders = {
        f"{path.name}: {name}"
        for path in (ROOT / "operator").glob("*.py")
        for name in imported_modules(path)
        if name.startswith(("signalbox.extproc", "extproc", "grpc", "envoy"))
    }
    assert offenders == set()


def test_the_check_sees_imports():
    assert "signalbox.core.models" in imported_modules(ROOT / "operator" / "handlers.py")


def test_data_plane_and_core_do_not_import_the_operator():
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for folder in (ROOT / "extproc", ROOT / "src" / "signalbox" / "core")
        for path in folder.glob("*.py")
        for name in imported_modules(path)
        if name.startswith("signalbox.operator")
    }
    assert offenders == set()
