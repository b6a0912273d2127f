"""Shared fixtures: the backend matrix, the real WikiText-2 data, the book's d2l package; and
which env of the tox matrix runs the backend-neutral tests (tests/_tox_envs.py, tox.ini)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
from _tox_envs import Matrix, ToxEnvs, not_installed

from bertlite.registry import BUILTIN

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_DIR = Path(os.environ.get("BERTLITE_TEST_WIKITEXT",
                                   REPO.parent / "shared" / "data" / "wikitext-2"))
#: this env of the tox matrix (tox.ini): the backends the shared suite is parametrized over
#: and the env that runs the backend-neutral tests (tests/_tox_envs.py)
MATRIX = Matrix.from_environ()
BACKEND_NAMES = list(MATRIX.backends)


def pytest_configure(config) -> None:
    config.pluginmanager.register(ToxEnvs(MATRIX), "bertlite-tox-envs")


def framework_installed(name: str) -> bool:
    return importlib.util.find_spec(BUILTIN[name][2]) is not None


def skip_unless_backend(name: str) -> None:
    if not framework_installed(name):
        pytest.skip(not_installed(name, BUILTIN[name][2]), allow_module_level=True)


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
