"""An artifact's manifest: reading it and checking every file against its checksums.

Plain Python (no torch), so `peakc inspect` starts at once; `peakc.runtime.artifact` builds
loading and writing on it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from peakc.errors import PeakcError
from peakc.version import __version__

FORMAT = "peakc-artifact"
# 2: generation artifacts may omit their zero KV-cache inputs (manifest "zero_inputs") and
# artifacts may hold several backends' and stages' programs; 1 (every input stored) still reads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an artifact folder, after checking it is one, of this format version."""
    if not directory.is_dir():
        raise PeakcError(f"artifact folder not found: {directory}")
    path = directory / MANIFEST
    if not path.is_file():
        raise PeakcError(f"{directory} is not a peakc artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeakcError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PeakcError(f"{path} is not a peakc artifact manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise PeakcError(
            f"artifact {directory} has format version {version}; this peakc "
            f"({__version__}) reads versions {readable}"
        )
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its sha256, and no unlisted file."""
    listed = manifest.get("files", {})
    present = set(_list_files(directory)) - {MANIFEST}
    for rel in listed:
        if rel not in present:
            raise PeakcError(f"artifact {directory} is incomplete: {rel} is missing")
        verify_file(directory, manifest, rel)
    extra = sorted(present - set(listed))
    if extra:
        raise PeakcError(f"artifact {directory} has an unexpected file: {extra[0]}")


def verify_file(directory: Path, manifest: dict[str, Any], rel: str) -> None:
    """One file the manifest lists, present with its sha256: for readers of one small file
    of an artifact (`peakc estimate` reads the report) that need not hash its weights."""
    digest = manifest.get("files", {}).get(rel)
    if digest is None:
        raise PeakcError(f"artifact {directory}: {rel} is not listed in its manifest")
    if not (directory / rel).is_file():
        raise PeakcError(f"artifact {directory} is incomplete: {rel} is missing")
    if sha256_file(directory / rel) != digest:
        raise PeakcError(f"artifact {directory}: {rel} was changed (checksum mismatch)")


def _list_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB chunks): what the manifest lists."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
