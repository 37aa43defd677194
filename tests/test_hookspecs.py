"""Every hook is documented, called by the core, and named in the docs (as datasette checks)."""

from __future__ import annotations

import inspect
import re

import pytest

from jam_core import hookspecs
from tests.conftest import REPO

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "jam_spec")]


def test_the_four_core_hooks_exist():
    assert {"select", "place", "stash", "fetch"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert doc.splitlines()[0].strip(), f"{name} has no summary line"
    assert "Called" in doc, f"{name}: say when the hook is called"
    for param in inspect.signature(fn).parameters:
        assert re.search(rf"\b{param}\b", doc), f"{name}: parameter {param!r} is not documented"
    annotations = inspect.signature(fn).parameters
    assert all(p.annotation is not inspect.Parameter.empty for p in annotations.values()), name


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_called_by_the_core_and_named_in_the_docs(name):
    core = "\n".join(p.read_text() for p in (REPO / "jam_core").rglob("*.py"))
    assert f"pm.hook.{name}(" in core, f"the core never calls the {name} hook"
    docs = (REPO / "README.md").read_text() + (REPO / "CONTRIBUTING.md").read_text()
    assert f"`{name}`" in docs, f"{name} is not named in README.md or CONTRIBUTING.md"
