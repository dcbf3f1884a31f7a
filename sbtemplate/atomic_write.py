"""Write a file all at once: a reader, or a crash, never sees it half-written.

Every writer goes through a temporary file in the target's folder, named
after the process and the thread (two writers never share one), flushed and
fsynced, then ``os.replace``-d over the target. On any error the temporary
file is removed and the target keeps its previous content.
"""

import contextlib
import json
import os
import threading
from pathlib import Path


def temporary_name(path):
    """The temporary file next to ``path`` that this process and thread writes."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextlib.contextmanager
def replacing(path, mode="w", **open_kwargs):
    """Open a temporary file for writing; on success it replaces ``path``.

    For writers that stream (e.g. ``csv.writer``); ``open_kwargs`` go to ``open``.
    The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with replacing(path, "wb") as handle:
        handle.write(data)


def write_text(path, text, encoding="utf-8"):
    """Write ``text`` to ``path`` atomically."""
    with replacing(path, "w", encoding=encoding) as handle:
        handle.write(text)


def write_json(path, data, indent=2, **json_kwargs):
    """Write ``data`` as JSON (and a final newline) to ``path`` atomically.

    The data is serialised before anything is written, so data that JSON
    cannot hold leaves the target as it was.
    """
    write_text(path, json.dumps(data, indent=indent, **json_kwargs) + "\n")
