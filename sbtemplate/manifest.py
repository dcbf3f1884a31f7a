"""sha256 manifests of published model folders.

The Hub and URL servers advertise these digests and the fetch layer checks
every downloaded file against them, so a truncated or corrupted download is
never kept in a cache.
"""

import hashlib
import json
from pathlib import Path

from sbtemplate import atomic_write

MANIFEST_NAME = "manifest.json"


def sha256_file(path, chunk_size=1 << 20):
    """Hex sha256 of a file, read in ``chunk_size``-byte chunks (never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder):
    """Write ``manifest.json`` = {file name: {sha256, size}} for a folder's regular files."""
    folder = Path(folder)
    entries = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST_NAME or not path.is_file():
            continue
        entries[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    atomic_write.write_json(folder / MANIFEST_NAME, entries, sort_keys=True)
    return entries


def read_manifest(folder):
    """A published folder's ``{file: {sha256, size}}``; FileNotFoundError without a manifest."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {MANIFEST_NAME} in {folder}: was the model published?")
    return json.loads(path.read_text())
