"""Shared fixtures: the backend matrix, the real WikiText-2 data, the book's d2l package; and
which env of the tox matrix runs the backend-neutral tests (see tox.ini)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
import types
from pathlib import Path

import pytest

from bertlite.registry import BUILTIN

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_DIR = Path(os.environ.get("BERTLITE_TEST_WIKITEXT",
                                   REPO.parent / "shared" / "data" / "wikitext-2"))
#: the backends the shared suite is parametrized over (tox sets one per env)
BACKEND_NAMES = [name.strip() for name in
                 os.environ.get("BERTLITE_TEST_BACKENDS", ",".join(BUILTIN)).split(",")
                 if name.strip()]
#: where set (tox.ini), the env that runs the backend-neutral tests, then any per-file
#: exceptions: "py311-torch, test_scale.py=py311-mxnet"; the other envs skip them
_NEUTRAL = [part.strip() for part in os.environ.get("BERTLITE_TEST_NEUTRAL_ENV", "").split(",")
            if part.strip()]
NEUTRAL_ENV = next((part for part in _NEUTRAL if "=" not in part), "")
NEUTRAL_FILES = dict(part.split("=", 1) for part in _NEUTRAL if "=" in part)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "every_env: run in every env of the matrix, although the test names no "
        "backend (it needs a framework other than the one it is parametrized over, or its result "
        "depends on what the env installs)")


def _uses_backends(item, names: list[str], *, named: bool = True) -> bool:
    """Whether ``item`` depends on the backends ``names``: parametrized over them (the
    ``backend``/``backend_name`` fixtures or a parameter naming one), marked ``every_env``, or
    (``named``) in a module that imports their framework, or naming one (or ``BACKEND_NAMES``)
    in its source or in a fixture it uses. In doubt a test counts as dependent (two envs run
    it, never none)."""
    if "backend_name" in item.fixturenames or item.get_closest_marker("every_env"):
        return True
    frameworks = {BUILTIN[name][2] for name in names if name in BUILTIN}
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


def _neutral_env(item) -> str:
    """The env that runs ``item`` if it is backend-neutral ("": every env)."""
    return NEUTRAL_FILES.get(item.path.name, NEUTRAL_ENV)


def _is_neutral_env(item) -> bool:
    return bool(_neutral_env(item)) and os.environ.get("TOX_ENV_NAME") == _neutral_env(item)


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the tests that do not depend on this env's backends (core-only, PyTorch-only, ...)
    where another env is named to run them: that env runs them, once for the whole matrix. In a
    file named on its own, only the tests parametrized over the backends run in every env (the
    env named for it has all the rest needs)."""
    for item in items:
        where = _neutral_env(item)
        named = item.path.name not in NEUTRAL_FILES
        if (where and os.environ.get("TOX_ENV_NAME") != where
                and not _uses_backends(item, BACKEND_NAMES, named=named)):
            item.add_marker(pytest.mark.skip(reason=f"backend-neutral: runs in the {where} env "
                                                    "(BERTLITE_TEST_NEUTRAL_ENV, tox.ini)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The guard that nothing is lost across the matrix: in its neutral env, a test skipped
    because another env's framework is missing here must count as using that env's backend
    (else that env skips it as backend-neutral and no env runs it): it fails, naming the fix."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and isinstance(report.longrepr, tuple) and _is_neutral_env(item)):
        return
    reason = str(report.longrepr[2])
    for name in BUILTIN:
        if (name not in BACKEND_NAMES and f"{BUILTIN[name][2]} is not installed" in reason
                and not _uses_backends(item, [name])):
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} needs {name} ({reason}), but the env testing "
                               f"{name} would skip it as backend-neutral: name the backend in "
                               "the test or mark it @pytest.mark.every_env")


def framework_installed(name: str) -> bool:
    return importlib.util.find_spec(BUILTIN[name][2]) is not None


def skip_unless_backend(name: str) -> None:
    if not framework_installed(name):
        pytest.skip(f"backend {name!r} skipped: {BUILTIN[name][2]} is not installed "
                    f'(pip install "bertlite[{name}]")', allow_module_level=True)


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request) -> str:
    skip_unless_backend(request.param)
    return request.param


@pytest.fixture
def backend(backend_name):
    from bertlite.registry import get_backend

    return get_backend(backend_name)


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    if not (WIKITEXT_DIR / "wiki.valid.tokens").is_file():
        pytest.skip(f"real WikiText-2 data not found in {WIKITEXT_DIR} "
                    "(set BERTLITE_TEST_WIKITEXT to the folder of wiki.valid.tokens)")
    return WIKITEXT_DIR


@pytest.fixture(scope="session")
def wikitext_train_dir(wikitext_dir, tmp_path_factory) -> Path:
    """A folder whose wiki.train.tokens is the real validation split (for the book's code,
    which always reads the train split)."""
    folder = tmp_path_factory.mktemp("wikitext") / "wikitext-2"
    folder.mkdir()
    for split, source in (("train", "valid"), ("valid", "valid"), ("test", "test")):
        (folder / f"wiki.{split}.tokens").symlink_to(wikitext_dir / f"wiki.{source}.tokens")
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session gets its own preparation cache; no test reads the user's."""
    monkeypatch.setenv("BERTLITE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _stub_module(name: str) -> types.ModuleType:
    """A module whose every public attribute is a harmless placeholder."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return types.SimpleNamespace()

    module.__getattr__ = __getattr__
    return module


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def import_d2l(framework: str):
    """The book's reference code, d2l 0.17.6, with the modules it imports but bertlite's tests
    never use (torchvision fails beside CPU torch here; pandas, IPython, ...) stubbed while it
    imports; the stubs are removed again so that nothing else ever sees them."""
    if importlib.util.find_spec("d2l") is None:
        pytest.skip("d2l 0.17.6 (the book's code) is not installed: "
                    "pip install --no-deps d2l==0.17.6")
    skip_unless_backend(framework)
    if f"d2l.{framework}" in sys.modules:
        return sys.modules[f"d2l.{framework}"]
    stubs = [name for name in ("PIL", "PIL.Image", "pandas", "requests", "IPython",
                               "IPython.display", "matplotlib_inline",
                               "matplotlib_inline.backend_inline")
             if name not in sys.modules and _missing(name)]
    if framework == "torch":
        try:
            import torchvision  # noqa: F401
        except Exception:
            for name in ("torchvision", "torchvision.transforms"):
                sys.modules.pop(name, None)
                stubs.append(name)
    saved = {name: sys.modules.get(name) for name in stubs}
    try:
        for name in stubs:
            sys.modules[name] = _stub_module(name)
        for name in stubs:
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, sys.modules[name])
        return importlib.import_module(f"d2l.{framework}")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
