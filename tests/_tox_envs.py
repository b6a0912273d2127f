"""Which env of the tox matrix runs each test (see tox.ini), and the guard that none is lost.

A test parametrized over the env's backends (the ``backend``/``backend_name`` fixtures or a
parameter naming one), or naming its framework (importing it, or a backend's name in its source
or in a fixture it uses), runs in that env. The backend-neutral rest runs once, in the env
``BERTLITE_TEST_NEUTRAL_ENV`` names (per file where a file is named); the other envs skip it.
The guard: in its neutral env, a test that skips for want of another env's framework without
naming it fails (that env would skip it as backend-neutral, so no env would run it).

The conftest registers :class:`ToxEnvs` with the :class:`Matrix` of the environment; this
module is apart so that the classification is tested on test files of its own
(tests/test_tox_envs.py).
"""

from __future__ import annotations

import inspect
import os
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest

from bertlite.registry import BUILTIN

#: the framework (top-level module) of each built-in backend
FRAMEWORKS = {name: spec[2] for name, spec in BUILTIN.items()}


def not_installed(name: str, framework: str) -> str:
    """Why a test skips where backend ``name``'s ``framework`` is missing (the guard reads
    "FRAMEWORK is not installed" in it)."""
    return (f"backend {name!r} skipped: {framework} is not installed "
            f'(pip install "bertlite[{name}]")')


@dataclass(frozen=True)
class Matrix:
    """This env of the matrix: its name (``TOX_ENV_NAME``, "" outside tox), the backends it
    tests, the env that runs the backend-neutral tests and the per-file exceptions."""

    env: str = ""
    backends: tuple[str, ...] = tuple(BUILTIN)
    neutral_env: str = ""
    neutral_files: Mapping[str, str] = field(default_factory=dict)
    frameworks: Mapping[str, str] = field(default_factory=lambda: dict(FRAMEWORKS))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Matrix:
        """The matrix tox.ini sets: ``BERTLITE_TEST_BACKENDS`` ("torch"), and
        ``BERTLITE_TEST_NEUTRAL_ENV`` ("py311-torch, test_scale.py=py311-mxnet")."""
        backends = [name.strip() for name in
                    environ.get("BERTLITE_TEST_BACKENDS", ",".join(BUILTIN)).split(",")
                    if name.strip()]
        parts = [part.strip() for part in environ.get("BERTLITE_TEST_NEUTRAL_ENV", "").split(",")
                 if part.strip()]
        return cls(env=environ.get("TOX_ENV_NAME", ""), backends=tuple(backends),
                   neutral_env=next((part for part in parts if "=" not in part), ""),
                   neutral_files=dict(part.split("=", 1) for part in parts if "=" in part))

    def uses_backends(self, item: pytest.Item, names: Iterable[str], *,
                      named: bool = True) -> bool:
        """Whether ``item`` depends on the backends ``names``: parametrized over them (the
        ``backend``/``backend_name`` fixtures or a parameter naming one), marked ``every_env``,
        or (``named``) in a module that imports their framework, or naming one (or
        ``BACKEND_NAMES``) in its source or in a fixture it uses. In doubt a test counts as
        dependent (two envs run it, never none)."""
        names = list(names)
        if "backend_name" in item.fixturenames or item.get_closest_marker("every_env"):
            return True
        frameworks = {self.frameworks[name] for name in names if name in self.frameworks}
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(value, str) and value in names for value in params.values()):
            return True
        if not named:
            return False
        module = getattr(item, "module", None)
        if module is not None and any(
                isinstance(value, types.ModuleType) and value.__name__.split(".")[0] in frameworks
                for value in vars(module).values()):
            return True
        words = "|".join(re.escape(word) for word in {*names, *frameworks})
        pattern = re.compile(rf"""["']({words})["']|BACKEND_NAMES""")
        functions = [getattr(item, "function", None)]
        for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
            functions += [d.func for d in defs if d.baseid]  # not pytest's own fixtures
        for function in functions:
            try:
                if function is not None and pattern.search(inspect.getsource(function)):
                    return True
            except (OSError, TypeError):
                return True
        return False

    def neutral_env_of(self, item: pytest.Item) -> str:
        """The env that runs ``item`` if it is backend-neutral ("": every env)."""
        return self.neutral_files.get(item.path.name, self.neutral_env)

    def skip_reason(self, item: pytest.Item) -> str | None:
        """Why this env skips ``item`` (it is backend-neutral and another env is named to run
        it), or None where it runs here. In a file named on its own, only the tests
        parametrized over the backends run in every env (the env named for it has all the rest
        needs)."""
        where = self.neutral_env_of(item)
        named = item.path.name not in self.neutral_files
        if where and self.env != where and not self.uses_backends(item, self.backends,
                                                                  named=named):
            return f"backend-neutral: runs in the {where} env (BERTLITE_TEST_NEUTRAL_ENV, tox.ini)"
        return None

    def lost(self, item: pytest.Item, reason: str) -> str | None:
        """The guard: where ``item`` skipped here for ``reason``, the failure message if no
        env would run it (this is its neutral env, it needs another env's framework and does
        not name it), else None."""
        where = self.neutral_env_of(item)
        if not where or self.env != where:
            return None
        for name, framework in self.frameworks.items():
            if (name not in self.backends and f"{framework} is not installed" in reason
                    and not self.uses_backends(item, [name])):
                return (f"{item.nodeid} needs {name} ({reason}), but the env testing {name} "
                        "would skip it as backend-neutral: name the backend in the test or "
                        "mark it @pytest.mark.every_env")
        return None


class ToxEnvs:
    """The pytest plugin applying a :class:`Matrix`: skips at collection, the guard on the
    reports of skipped tests."""

    def __init__(self, matrix: Matrix) -> None:
        self.matrix = matrix

    def pytest_configure(self, config: pytest.Config) -> None:
        config.addinivalue_line(
            "markers", "every_env: run in every env of the matrix, although the test names no "
            "backend (it needs a framework other than the one it is parametrized over, or its "
            "result depends on what the env installs)")

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            reason = self.matrix.skip_reason(item)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report = outcome.get_result()
        if report.skipped and isinstance(report.longrepr, tuple):
            message = self.matrix.lost(item, str(report.longrepr[2]))
            if message is not None:
                report.outcome = "failed"
                report.longrepr = message
