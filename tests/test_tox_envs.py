"""Which env of the tox matrix runs each test (tests/_tox_envs.py): real pytest runs of small
test files under the matrix of each env, and the guard failing a test no env would run.

The two envs are simulated in one interpreter: the frameworks are stand-in modules
(``standin_torch``, ``standin_mxnet``) and what an env "installs" is which of them its skips
let through, so both envs' views are tested wherever this file runs."""

from __future__ import annotations

import dataclasses

import pytest
from _tox_envs import Matrix, ToxEnvs

pytest_plugins = ["pytester"]

#: the backends (named here once: the tests below are backend-neutral, they run in one env)
TORCH, MXNET = "torch", "mxnet"
FRAMEWORKS = {TORCH: "standin_torch", MXNET: "standin_mxnet"}
#: as tox.ini sets it, with a file of its own as test_scale.py has
NEUTRAL = "py311-torch, test_balanced.py=py311-mxnet"

FILES = {
    "standin_torch": 'VERSION = "2.13"\n',
    "standin_mxnet": 'VERSION = "1.9.1"\n',
    # the conftest's skip_unless_backend, over the stand-ins "installed" in this env
    "standin": """
        import os
        import pytest
        from _tox_envs import not_installed

        FRAMEWORKS = {"torch": "standin_torch", "mxnet": "standin_mxnet"}

        def skip_unless_backend(name):
            if FRAMEWORKS[name] not in os.environ["STANDIN_INSTALLED"].split(","):
                pytest.skip(not_installed(name, FRAMEWORKS[name]), allow_module_level=True)
        """,
    "test_neutral": """
        def test_arithmetic():
            assert sum([1, 2]) == 3
        """,
    "test_torch_only": """
        from standin import skip_unless_backend

        skip_unless_backend("torch")
        import standin_torch as torch

        def test_kernel():
            assert torch.VERSION == "2.13"
        """,
    "test_mxnet_only": """
        from standin import skip_unless_backend

        skip_unless_backend("mxnet")
        import standin_mxnet as mx

        def test_array():
            assert mx.VERSION == "1.9.1"
        """,
    "test_parametrized": """
        def test_each_backend(backend_name):
            assert backend_name in ("torch", "mxnet")
        """,
    "test_named": """
        from standin import skip_unless_backend

        def test_names_mxnet():
            skip_unless_backend("mxnet")
        """,
    "test_lost": """
        import pytest
        from standin import skip_unless_backend

        def _needs_the_other_framework():
            skip_unless_backend("mxnet")

        def test_hidden_need():
            _needs_the_other_framework()

        @pytest.mark.every_env
        def test_marked():
            _needs_the_other_framework()
        """,
    "test_balanced": """
        import pytest
        import standin_torch as torch

        def test_peak():
            assert torch.VERSION

        def test_each(backend_name):
            assert backend_name

        @pytest.mark.parametrize("name", ["torch", "mxnet"])
        def test_by_name(name):
            assert name
        """,
}

CONFTEST = """
    import os
    import pytest
    from standin import skip_unless_backend

    @pytest.fixture(params=os.environ["STANDIN_BACKENDS"].split(","))
    def backend_name(request):
        skip_unless_backend(request.param)
        return request.param
    """


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, matrix: Matrix,
        installed: str) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Run the files under ``matrix`` with the stand-in frameworks ``installed``: each test's
    outcome and reason, and the modules skipped whole at collection with their reason."""
    pytester.makepyfile(**FILES)
    pytester.makeconftest(CONFTEST)
    monkeypatch.setenv("STANDIN_INSTALLED", installed)
    monkeypatch.setenv("STANDIN_BACKENDS", ",".join(matrix.backends))
    recorder = pytester.inline_run(plugins=[ToxEnvs(matrix)])
    tests: dict[str, tuple[str, str]] = {}
    for report in recorder.getreports("pytest_runtest_logreport"):
        if report.when == "call" or report.outcome != "passed":
            longrepr = report.longrepr
            reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr or "")
            tests.setdefault(report.nodeid, (report.outcome, reason))
    modules = {report.nodeid: str(report.longrepr[2])
               for report in recorder.getreports("pytest_collectreport") if report.skipped}
    return tests, modules


def env_matrix(env: str, backends: str, neutral: str = NEUTRAL) -> Matrix:
    """The matrix of ``env`` as tox.ini sets it, over the stand-in frameworks."""
    matrix = Matrix.from_environ({"TOX_ENV_NAME": env, "BERTLITE_TEST_BACKENDS": backends,
                                  "BERTLITE_TEST_NEUTRAL_ENV": neutral})
    return dataclasses.replace(matrix, frameworks=FRAMEWORKS)


def outcomes(tests: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {nodeid: outcome for nodeid, (outcome, _) in tests.items()}


def test_matrix_reads_what_tox_sets():
    matrix = Matrix.from_environ({"TOX_ENV_NAME": "py311-mxnet",
                                  "BERTLITE_TEST_BACKENDS": " mxnet ,",
                                  "BERTLITE_TEST_NEUTRAL_ENV": NEUTRAL})
    assert matrix.env == "py311-mxnet" and matrix.backends == (MXNET,)
    assert matrix.neutral_env == "py311-torch"
    assert dict(matrix.neutral_files) == {"test_balanced.py": "py311-mxnet"}
    outside = Matrix.from_environ({})
    assert outside.env == "" and outside.neutral_env == "" and not outside.neutral_files
    assert set(outside.backends) == {TORCH, MXNET}


def test_the_torch_env(pytester, monkeypatch):
    """The neutral env: neutral and torch tests run, an mxnet-only file skips whole, a test
    that needs mxnet without naming it fails (the guard), a file named for the other env
    runs only its parametrized tests."""
    tests, modules = run(pytester, monkeypatch, env_matrix("py311-torch", TORCH),
                         installed="standin_torch")
    assert outcomes(tests) == {
        "test_neutral.py::test_arithmetic": "passed",
        "test_torch_only.py::test_kernel": "passed",
        "test_parametrized.py::test_each_backend[torch]": "passed",
        "test_named.py::test_names_mxnet": "skipped",
        "test_lost.py::test_hidden_need": "failed",
        "test_lost.py::test_marked": "skipped",
        "test_balanced.py::test_peak": "skipped",
        "test_balanced.py::test_each[torch]": "passed",
        "test_balanced.py::test_by_name[torch]": "passed",
        "test_balanced.py::test_by_name[mxnet]": "skipped",
    }
    assert "standin_mxnet is not installed" in modules["test_mxnet_only.py"]
    assert "standin_mxnet is not installed" in tests["test_named.py::test_names_mxnet"][1]
    assert "standin_mxnet is not installed" in tests["test_lost.py::test_marked"][1]
    message = tests["test_lost.py::test_hidden_need"][1]
    assert "test_lost.py::test_hidden_need needs mxnet" in message
    assert "would skip it as backend-neutral" in message and "every_env" in message
    assert "backend-neutral: runs in the py311-mxnet env" in tests["test_balanced.py::test_peak"][1]


def test_the_mxnet_env(pytester, monkeypatch):
    """The other env (with torch installed, as tox.ini's): neutral and torch-only tests skip
    as backend-neutral, the rest runs, the whole file named for this env too."""
    tests, modules = run(pytester, monkeypatch, env_matrix("py311-mxnet", MXNET),
                         installed="standin_torch,standin_mxnet")
    neutral = "backend-neutral: runs in the py311-torch env"
    assert outcomes(tests) == {
        "test_neutral.py::test_arithmetic": "skipped",
        "test_torch_only.py::test_kernel": "skipped",
        "test_mxnet_only.py::test_array": "passed",
        "test_parametrized.py::test_each_backend[mxnet]": "passed",
        "test_named.py::test_names_mxnet": "passed",
        "test_lost.py::test_hidden_need": "skipped",  # so no env would run it: the guard
        "test_lost.py::test_marked": "passed",
        "test_balanced.py::test_peak": "passed",
        "test_balanced.py::test_each[mxnet]": "passed",
        "test_balanced.py::test_by_name[torch]": "passed",
        "test_balanced.py::test_by_name[mxnet]": "passed",
    }
    assert not modules
    for nodeid in ("test_neutral.py::test_arithmetic", "test_torch_only.py::test_kernel",
                   "test_lost.py::test_hidden_need"):
        assert neutral in tests[nodeid][1], nodeid


def test_outside_tox_everything_runs(pytester, monkeypatch):
    """No env named (a plain pytest run): every test runs, over every backend, and a test
    that skips for a missing framework is only skipped."""
    tests, modules = run(pytester, monkeypatch, env_matrix("", "torch,mxnet", neutral=""),
                         installed="standin_torch,standin_mxnet")
    assert set(outcomes(tests).values()) == {"passed"} and not modules
    assert "test_parametrized.py::test_each_backend[mxnet]" in tests
    assert "test_parametrized.py::test_each_backend[torch]" in tests
    tests, _ = run(pytester, monkeypatch, env_matrix("", TORCH, neutral=""),
                   installed="standin_torch")
    assert tests["test_lost.py::test_hidden_need"][0] == "skipped"
