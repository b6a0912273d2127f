"""The manifest of a prepared folder (``manifest.json``): every setting, the inputs' sizes and
digests, the vocabulary, and each shard's example count and digest. Its ``key`` (a digest of the
settings and the inputs) is the cache key: the same corpus with the same settings is prepared
once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bertlite.data.shards import file_sha1
from bertlite.errors import DataError
from bertlite.io import atomic_write_text

MANIFEST = "manifest.json"
#: bump when the layout of prepared folders changes
MANIFEST_VERSION = 1


def settings_key(settings: dict[str, Any], inputs: list[dict[str, Any]]) -> str:
    """The cache key of a preparation: what shapes the shards, and the inputs' content."""
    blob = json.dumps({"version": MANIFEST_VERSION, "settings": settings,
                       "inputs": [(i["size"], i["sha1"]) for i in inputs]}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read ({err}); prepare the folder again") from None


def is_prepared(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a prepared folder, checked: a version this bertlite reads, every shard
    present with its size (and with ``verify``, its SHA-1 digest)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared data folder (no {MANIFEST}); make one with "
                        "`bertlite prepare CORPUS --out FOLDER`")
    manifest = read_json(path)
    version = manifest.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise DataError(f"{path} has version {version!r}, newer than this bertlite reads "
                        f"({MANIFEST_VERSION}); upgrade bertlite or prepare the corpus again")
    for shard in manifest["shards"]:
        file = folder / shard["file"]
        if not file.is_file():
            raise DataError(f"shard {file} listed in {path} is missing; prepare the corpus "
                            "again (the same command resumes)")
        if file.stat().st_size != shard["bytes"] or (verify and file_sha1(file) != shard["sha1"]):
            raise DataError(f"shard {file} does not match its digest in {path} (changed or "
                            "damaged); delete it and run the same `bertlite prepare` again")
    return manifest
