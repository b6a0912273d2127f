"""The ``pip install`` command that adds an optional part (an extra) to *this* installation.

bertlite may be installed from a package index, from a local folder or wheel, or in editable
mode from a clone (or merely be on ``sys.path`` as a source tree); a hint such as
``pip install "bertlite[mxnet]"`` works only in the first case, so every "not installed" message
asks this module for the command that fits.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["install_command", "installation"]

DISTRIBUTION = "bertlite"


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def installation() -> tuple[str, Path | None]:
    """How bertlite is installed: ``("index", None)``, ``("editable", checkout)``,
    ``("local", folder_or_wheel)``, ``("url", None)`` or ``("source", checkout)`` (not
    installed, imported from a source tree)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "source", Path(__file__).resolve().parent.parent
    text = dist.read_text("direct_url.json")  # PEP 610: present when not from an index
    if not text:
        return "index", None
    try:
        direct = json.loads(text)
    except ValueError:
        return "index", None
    path = _local_path(str(direct.get("url", "")))
    if path is None:
        return "url", None
    if direct.get("dir_info", {}).get("editable"):
        return "editable", path
    return "local", path


def install_command(extra: str) -> str:
    """The command that installs bertlite's extra ``extra`` for the way bertlite is installed."""
    mode, path = installation()
    if mode in ("editable", "source") and path is not None:
        return f'pip install -e "{path}[{extra}]"'
    if mode == "local" and path is not None and path.exists():
        return f'pip install "{path}[{extra}]"'
    return f'pip install "bertlite[{extra}]"'
