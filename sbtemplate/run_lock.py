"""One run per output folder.

Two runs on one ``output_folder`` overwrite each other's log and
``hyperparams.yaml``, and each one's Checkpointer deletes or resumes from
the other's checkpoints. :func:`hold_output_folder` takes an exclusive lock
on ``<output_folder>/.run.lock`` for the rest of the process (the operating
system drops it when the process ends, however it ends, so a killed run
leaves nothing to clean up) and writes who holds it; a second run fails at
once with an error that names the holder.
"""

import fcntl
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".run.lock"

# Locks this process holds: the open files must live as long as the run.
_held = {}


class OutputFolderInUse(RuntimeError):
    """Another run holds the output folder."""


def hold_output_folder(folder):
    """Lock ``folder`` for this process, or raise :class:`OutputFolderInUse`."""
    folder = Path(folder).resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputFolderInUse(
            f"output folder {folder} is in use by {holder}; wait for that run to end, "
            f"or give this one another --output_folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"pid {os.getpid()} on {socket.gethostname()} since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({shlex.join(sys.argv)})\n"
    )
    handle.flush()
    _held[folder] = handle


def release_output_folder(folder):
    """Give the lock back before the process ends (for callers that run several jobs)."""
    handle = _held.pop(Path(folder).resolve(), None)
    if handle is not None:
        handle.close()
