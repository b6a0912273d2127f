"""The install hints fit how bertlite is installed: each case is a real ``*.dist-info`` folder
(with or without PEP 610's ``direct_url.json``) found first on ``sys.path`` of a new process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bertlite
from bertlite.install import install_command, installation

ROOT = Path(bertlite.__file__).resolve().parent.parent


def _hint_with_distribution(tmp_path: Path, direct_url: dict | None) -> tuple[str, str]:
    dist = tmp_path / "site" / "bertlite-9.9.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bertlite\nVersion: 9.9\n")
    if direct_url is not None:
        (dist / "direct_url.json").write_text(json.dumps(direct_url))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bertlite.install import "
            "install_command, installation; print(installation()[0]); "
            "print(install_command('mxnet'))")
    out = subprocess.run([sys.executable, "-c", code, str(dist.parent)], check=True,
                         capture_output=True, text=True, cwd=tmp_path).stdout.splitlines()
    return out[0], out[1]


@pytest.mark.parametrize("case", ["index", "editable", "local-folder", "local-wheel", "vcs"])
def test_hint_fits_the_installation(tmp_path, case):
    checkout = tmp_path / "my checkout"
    checkout.mkdir()
    wheel = tmp_path / "bertlite-9.9-py3-none-any.whl"
    wheel.write_bytes(b"")
    direct, mode, expected = {
        "index": (None, "index", 'pip install "bertlite[mxnet]"'),
        "editable": ({"url": checkout.as_uri(), "dir_info": {"editable": True}}, "editable",
                     f'pip install -e "{checkout}[mxnet]"'),
        "local-folder": ({"url": checkout.as_uri(), "dir_info": {}}, "local",
                         f'pip install "{checkout}[mxnet]"'),
        "local-wheel": ({"url": wheel.as_uri(), "archive_info": {}}, "local",
                        f'pip install "{wheel}[mxnet]"'),
        "vcs": ({"url": "https://example.org/bertlite.git",
                 "vcs_info": {"vcs": "git", "commit_id": "0" * 40}}, "url",
                'pip install "bertlite[mxnet]"'),
    }[case]
    assert _hint_with_distribution(tmp_path, direct) == (mode, expected)


def test_this_installation_gets_a_working_hint():
    mode, path = installation()
    if mode in ("editable", "source"):
        assert path == ROOT and (ROOT / "setup.cfg").is_file()
        assert install_command("torch") == f'pip install -e "{ROOT}[torch]"'
    elif mode == "local":
        assert install_command("torch") == f'pip install "{path}[torch]"'
    else:
        assert install_command("torch") == 'pip install "bertlite[torch]"'
