"""All-or-nothing checkpoints.

SpeechBrain's ``Checkpointer.save_checkpoint`` creates ``CKPT+<stamp>/``, writes
its ``CKPT.yaml`` first and the parameter files after it. A save interrupted
in between (Ctrl-C, a killed rank, a full disk) leaves a folder that lists as
a checkpoint, and every later run tries to resume from it and fails
(``KeyError`` for the missing file). :class:`AtomicCheckpointer` writes the
whole checkpoint in a staging folder that SpeechBrain does not list, and
renames it into place after every file is written, so an interrupted save
leaves the previous checkpoints as they were. Staging folders left by
interrupted saves are removed by the next save.
"""

import logging
import os
import shutil

from speechbrain.utils.checkpoints import (
    DEFAULT_SAVE_HOOKS,
    METAFNAME,
    PARAMFILE_EXT,
    Checkpoint,
    Checkpointer,
    get_default_hook,
)
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process

logger = logging.getLogger(__name__)

#: Prefix of a checkpoint folder being written (not a checkpoint: its name does
#: not start with SpeechBrain's ``CKPT``).
STAGING_PREFIX = "partial."


class AtomicCheckpointer(Checkpointer):
    """A ``Checkpointer`` whose saves land whole or not at all (same arguments)."""

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):  # noqa: B006 - SpeechBrain's signature
        """Save every recoverable into a staging folder, then rename it into place."""
        final = staging = None
        if if_main_process():
            self.remove_interrupted_saves()
            final = (
                self._new_checkpoint_dirpath()
                if name is None
                else self._custom_checkpoint_dirpath(name)
            )
            staging = final.with_name(STAGING_PREFIX + final.name)
            staging.mkdir(parents=True)
        final, staging = ddp_broadcast((final, staging), src=0)

        for key, obj in self.recoverables.items():
            path = staging / f"{key}{PARAMFILE_EXT}"
            hook = self.custom_save_hooks.get(key) or get_default_hook(obj, DEFAULT_SAVE_HOOKS)
            if hook is None:
                raise RuntimeError(
                    f"Don't know how to save {type(obj)}: register a save hook for {key!r}"
                )
            hook(obj, path)
        ddp_barrier()  # every rank's files are written

        checkpoint = None
        if if_main_process():
            # The meta file last: without it SpeechBrain does not list a folder.
            saved_meta = self._save_checkpoint_metafile(staging / METAFNAME, meta, end_of_epoch)
            _sync_folder(staging, files=True)
            if final.exists():  # a custom name saved again
                shutil.rmtree(final)
            os.rename(staging, final)
            _sync_folder(final.parent)
            files = {key: final / f"{key}{PARAMFILE_EXT}" for key in self.recoverables}
            checkpoint = Checkpoint(final, saved_meta, files)
            kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
            logger.log(verbosity, f"Saved an {kind} checkpoint in {final}")
        ddp_barrier()  # no rank goes on before the checkpoint is in place
        return checkpoint

    def remove_interrupted_saves(self):
        """Delete staging folders of saves that never finished."""
        if not self.checkpoints_dir.is_dir():
            return
        for path in self.checkpoints_dir.iterdir():
            if path.is_dir() and path.name.startswith(STAGING_PREFIX):
                logger.info("Removing an interrupted checkpoint save: %s", path)
                shutil.rmtree(path)


def _sync_folder(path, files=False):
    """Flush a folder's entries (and, with ``files``, its files) to disk, so
    that a machine crash cannot keep the rename but lose the contents."""
    for child in path.iterdir() if files else []:
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
