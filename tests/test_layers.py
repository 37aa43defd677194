"""The house rules of CONTRIBUTING.md, checked: every module of jam_core sits on a layer and
imports only from layers below it (so there is no import cycle and no upward import), each
module imports alone, and plugins import nothing of jam but the public API that
``jam_core/__init__.py`` lists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import jam_core

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "jam_core"

# Lowest first. A module may import only from layers strictly below its own; a package's
# __init__ sits on the layer of its lowest module. The CLI is the top: nothing imports it.
LAYERS: list[set[str]] = [
    {"jam_core", "jam_core.errors"},
    {"jam_core.units", "jam_core.model"},
    {"jam_core.objects", "jam_core.fs", "jam_core.history.auto"},  # auto: on the hook's path, imports only errors and units
    {"jam_core.daemon", "jam_core.daemon.fanotify", "jam_core.daemon.client"},
    {"jam_core.stub"},
    {"jam_core.root"},
    {"jam_core.catalog", "jam_core.history", "jam_core.history.snapshot"},
    {"jam_core.scan", "jam_core.history.index", "jam_core.history.prune"},
    {"jam_core.hookspecs", "jam_core.placement"},
    {"jam_core.manager"},
    {"jam_core.ops", "jam_core.ops.pipeline", "jam_core.ops.common", "jam_core.policy", "jam_core.policy.pins",
     "jam_core.hook", "jam_core.hook.settings"},
    {"jam_core.hook.index", "jam_core.hook.visit", "jam_core.ops.remotes"},
    {"jam_core.hook.marks", "jam_core.ops.refs"},
    {"jam_core.policy.records"},
    {"jam_core.ops.stash", "jam_core.ops.copies"},  # copies: below history.store, whose push completes remotes
    {"jam_core.history.chunks"},  # stores and copies chunks; checkout assembles an object from them
    {"jam_core.ops.checkout", "jam_core.ops.status", "jam_core.ops.doctor", "jam_core.history.store"},
    {"jam_core.policy.plan", "jam_core.hook.fetch", "jam_core.ops.browse",
     "jam_core.history.restore", "jam_core.history.clone"},
    {"jam_core.ops.demo", "jam_core.ops.gc", "jam_core.history.sync"},
    {"jam_core.daemon.marks"},
    {"jam_core.daemon.worker"},
    {"jam_core.daemon.supervisor"},
    {"jam_core.testing", "jam_core.testing.backend"},
    {"jam_core.tui"},  # and every jam_core.tui.* module: one layer; nothing but the CLI imports it
    {"jam_core.cli"},  # and every jam_core.cli.* module: one layer, they may import each other
]


def _layer_of(module: str) -> int:
    if module.startswith("jam_core.cli"):
        return len(LAYERS) - 1
    if module.startswith("jam_core.tui"):
        return len(LAYERS) - 2
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise AssertionError(f"{module} is on no layer: add it to tests/test_layers.py's LAYERS (and CONTRIBUTING.md)")


def _modules() -> dict[str, Path]:
    out = {}
    for path in CORE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every jam_core module ``path`` imports, at any depth of the file (imports inside
    functions count: they are what keeps start-up light, not a way around the layers)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "jam_core" or n.startswith("jam_core."))
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The jam_core module a dotted import name refers to (a public name of ``jam_core``
    resolves to the module that defines it)."""
    if name in modules:
        return name
    head, _, attr = name.rpartition(".")
    if head == "jam_core" and attr in jam_core._LAZY:
        return jam_core._LAZY[attr]
    if head in modules:
        return None  # a name inside that module: the module itself is counted on its own
    return None


def test_every_module_imports_only_from_layers_below_it():
    modules = _modules()
    bad = []
    for module, path in sorted(modules.items()):
        mine = _layer_of(module)
        for name in _imports(path, module):
            target = _resolve(name, modules)
            if target is None or target == module:
                continue
            if module.startswith("jam_core.cli") and target.startswith("jam_core.cli"):
                continue
            if module.startswith("jam_core.tui") and target.startswith("jam_core.tui"):
                continue
            if path.name == "__init__.py" and target.startswith(module + "."):
                continue  # a package may re-export its own modules
            if _layer_of(target) >= mine and not (target == "jam_core" and name == "jam_core"):
                bad.append(f"{module} (layer {mine}) imports {target} (layer {_layer_of(target)})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_every_module_imports_alone():
    """A hidden cycle shows as an ImportError when a module is the first one imported."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for module in sorted(_modules()):
        if module.startswith("jam_core.testing"):
            continue  # imports pytest: checked by the conformance tests themselves
        res = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0, f"import {module} alone failed:\n{res.stderr}"


@pytest.mark.parametrize("plugin", sorted(p.name for p in (REPO / "plugins").iterdir() if p.is_dir()
                                          and p.name.startswith("jam_")))
def test_plugins_import_only_the_public_api(plugin):
    public = set(jam_core._LAZY) | {"hookimpl", "PROJECT", "__version__"}
    bad = []
    for path in sorted((REPO / "plugins" / plugin).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jam_core"):
                if node.module != "jam_core":
                    bad.append(f"{path.name}: from {node.module} import ...")
                else:
                    bad.extend(f"{path.name}: {a.name} is not public" for a in node.names if a.name not in public)
            elif isinstance(node, ast.Import):
                bad.extend(f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("jam_core."))
    assert not bad, f"{plugin} reaches into jam_core's internals:\n" + "\n".join(bad)


def test_every_public_name_resolves():
    for name in jam_core._LAZY:
        assert getattr(jam_core, name) is not None
