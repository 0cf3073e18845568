"""The package's shape holds: no import cycles anywhere in hl7bridge (the layers are checked by lint-imports), and
no SQL outside ``store``."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import hl7bridge


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("hl7bridge")
    cycles = sorted(
        f"{module} -> {imported} -> ... -> {module}"
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    assert cycles == []


#: What a module outside ``store`` may take from SQLAlchemy: the types of what ``store`` hands out, URL parsing and
#: its errors. Statements (select, update, text, ...) are built in ``store`` alone, the one package that touches
#: the database.
SQLALCHEMY_OUTSIDE_STORE = {
    "sqlalchemy": {"make_url"},
    "sqlalchemy.engine": {"Connection", "Engine", "make_url"},
    "sqlalchemy.exc": None,
}


def test_only_store_builds_sql() -> None:
    package = Path(hl7bridge.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [
                    f"{path.relative_to(package)}: import {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] == "sqlalchemy"
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
                allowed = SQLALCHEMY_OUTSIDE_STORE.get(node.module or "", set())
                if allowed is not None:
                    found += [f"{path.relative_to(package)}: from {node.module} import {a.name}"
                              for a in node.names if a.name not in allowed]  # fmt: skip
    assert found == []
