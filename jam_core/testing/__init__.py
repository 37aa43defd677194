"""Test kits for people who extend jam.

``jam_core.testing.backend.BackendConformance`` is the conformance kit every backend runs
(dir, sftp, and any third-party one): subclass it as ``TestMyBackend`` in a pytest module,
give it the ``remote`` and ``pm`` fixtures and the fault-injection hooks, and run pytest.
See CONTRIBUTING.md, "Writing a backend".

Only for tests: ``jam`` itself never imports this package (it needs pytest).
"""

from __future__ import annotations

__all__ = ["BackendConformance"]

try:  # the kit's plain asserts explain themselves, as a test module's do
    import pytest

    pytest.register_assert_rewrite("jam_core.testing.backend")
except ImportError:  # pragma: no cover - the kit needs pytest anyway
    pass


def __getattr__(name: str):
    if name == "BackendConformance":
        from jam_core.testing.backend import BackendConformance

        return BackendConformance
    raise AttributeError(f"module 'jam_core.testing' has no attribute {name!r}")
