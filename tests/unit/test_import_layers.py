"""The import layers hold: nothing imports from a layer above its own (typing-only imports too).

Layers, lowest first: errors / events / objects / clock, the schema package (qapi), nbd,
block, jobs, export, qmp, daemon, cli. The check reads every module's AST, so an import
guarded by ``if TYPE_CHECKING:`` or written inside a function counts like any other. Outside
jobs/ no module may import blockmirror code inside a function either (such imports only
dodge cycles that the layering forbids).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src" / "blockmirror"

#: module prefix -> layer (longest prefix wins)
LAYERS: dict[str, int] = {
    "blockmirror": 0,  # the package itself: version constants only
    "blockmirror.errors": 0,
    "blockmirror.events": 0,
    "blockmirror.objects": 0,
    "blockmirror.clock": 0,
    "blockmirror.qapi": 1,
    "blockmirror.nbd": 2,
    "blockmirror.block": 3,
    "blockmirror.jobs": 4,
    "blockmirror.export": 5,
    # chardevs open sockets and files beside the NBD server; the monitor and the CLI use them
    "blockmirror.chardev": 5,
    "blockmirror.qmp": 6,
    # a test harness that builds a Daemon and serves QMP for it: it wires the daemon layer
    "blockmirror.qmp.testing": 7,
    "blockmirror.daemon": 7,
    "blockmirror.cli": 8,
    # the test kit (pytest plugin, in-process daemon handles) drives a whole daemon
    "blockmirror.testing": 8,
}

#: known upward imports in jobs/ (being rewritten by the lead; delete entries as they go):
#: (importing module, imported module)
ALLOWED_UPWARD: set[tuple[str, str]] = set()

#: known function-local imports in jobs/ (same: delete entries as they go)
ALLOWED_LOCAL_PREFIX = "blockmirror.jobs"


def layer_of(module: str) -> int:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    assert best, f"{module} is in no layer: add it to LAYERS"
    return LAYERS[best]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every blockmirror import."""
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                # "from blockmirror.qapi import checks" imports a module of that package
                out.append((base, child.lineno, func))
            visit(child, func)

    visit(tree, False)
    return [(m, line, f) for m, line, f in out if m == "blockmirror" or
            m.startswith("blockmirror.")]


def all_modules() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for p in SRC.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for name, _ in all_modules():
        layer_of(name)


def test_nothing_imports_from_a_layer_above() -> None:
    bad = []
    for name, path in all_modules():
        own = layer_of(name)
        tree = ast.parse(path.read_text(), str(path))
        for target, line, _ in imports(tree, name, path.name == "__init__.py"):
            if layer_of(target) > own and (name, target) not in ALLOWED_UPWARD:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} (layer {own}) imports "
                           f"{target} (layer {layer_of(target)})")
    assert not bad, "\n".join(bad)


def test_the_schema_package_is_a_leaf() -> None:
    """qapi/ imports nothing of blockmirror's but itself."""
    for name, path in all_modules():
        if name.startswith("blockmirror.qapi"):
            tree = ast.parse(path.read_text(), str(path))
            targets = {t for t, _, _ in imports(tree, name, path.name == "__init__.py")}
            assert all(t.startswith("blockmirror.qapi") for t in targets), (name, targets)


def test_allow_list_has_no_stale_entries() -> None:
    """An allowed import that is gone must leave the list, so the list only ever shrinks."""
    seen = set()
    for name, path in all_modules():
        tree = ast.parse(path.read_text(), str(path))
        seen |= {(name, target) for target, _, _ in imports(tree, name, path.name == "__init__.py")}
    assert seen >= ALLOWED_UPWARD, ALLOWED_UPWARD - seen


def test_no_function_local_imports() -> None:
    bad = []
    for name, path in all_modules():
        if name.startswith(ALLOWED_LOCAL_PREFIX):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for target, line, local in imports(tree, name, path.name == "__init__.py"):
            if local:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target} in a function")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_guarded_and_local_imports() -> None:
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
           "    from blockmirror.daemon import Daemon\n"
           "def f():\n    from blockmirror.cli import main\n")
    found = imports(ast.parse(src), "blockmirror.block.x", False)
    assert ("blockmirror.daemon", 3, False) in found
    assert ("blockmirror.cli", 5, True) in found
    assert layer_of("blockmirror.block.x") < layer_of("blockmirror.daemon")
    assert layer_of("blockmirror.clock") == 0 and layer_of("blockmirror.jobs.job") == 4
