"""AtomicCheckpointer: a save interrupted at any moment never leaves a half
checkpoint that a resume would load (SpeechBrain's own Checkpointer does)."""

import os

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from sbtemplate import checkpoints as atomic
from sbtemplate.checkpoints import AtomicCheckpointer


class Interrupted(BaseException):
    """Stands for Ctrl-C (KeyboardInterrupt) or a signal arriving mid-save."""


def _modules(value):
    torch.manual_seed(0)
    lm, other = torch.nn.Linear(3, 3), torch.nn.Linear(2, 2)
    with torch.no_grad():
        lm.weight.fill_(value)
        other.weight.fill_(value)
    return {"lm": lm, "other": other}


def _interrupting_hook(after_bytes):
    def hook(obj, path):
        with open(path, "wb") as out:
            out.write(b"\0" * after_bytes)  # a file cut short
        raise Interrupted

    return hook


def test_stock_checkpointer_leaves_a_half_checkpoint_that_breaks_resume(tmp_path):
    """The fault as SpeechBrain has it: CKPT.yaml is written first."""
    modules = _modules(1.0)
    saver = Checkpointer(tmp_path, recoverables=modules)
    saver.save_checkpoint()
    saver.add_recoverable("other", modules["other"], custom_save_hook=_interrupting_hook(0))
    with pytest.raises(Interrupted):
        saver.save_checkpoint()
    assert len(saver.list_checkpoints()) == 2  # the half one is listed
    with pytest.raises(Exception):  # noqa: B017 - whatever SpeechBrain raises on a half save
        Checkpointer(tmp_path, recoverables=_modules(0.0)).recover_if_possible()


@pytest.mark.parametrize("moment", ["first_file", "second_file", "meta_file", "rename"])
def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, moment):
    saver = AtomicCheckpointer(tmp_path, recoverables=_modules(1.0))
    saver.save_checkpoint()
    modules = _modules(2.0)
    saver = AtomicCheckpointer(tmp_path, recoverables=modules)
    if moment in ("first_file", "second_file"):
        name = "lm" if moment == "first_file" else "other"
        saver.custom_save_hooks[name] = _interrupting_hook(10)
    elif moment == "meta_file":

        def fail(*args, **kwargs):
            raise Interrupted

        monkeypatch.setattr(saver, "_save_checkpoint_metafile", fail)
    else:

        def fail(*args, **kwargs):
            raise Interrupted

        monkeypatch.setattr(atomic.os, "rename", fail)
    with pytest.raises(Interrupted):
        saver.save_checkpoint()
    monkeypatch.undo()

    # A rerun lists and loads only the complete checkpoint.
    fresh = _modules(0.0)
    loader = AtomicCheckpointer(tmp_path, recoverables=fresh)
    assert len(loader.list_checkpoints()) == 1
    loader.recover_if_possible()
    assert torch.all(fresh["lm"].weight == 1.0) and torch.all(fresh["other"].weight == 1.0)
    # ... and its next save clears the interrupted one's staging folder.
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(atomic.STAGING_PREFIX)]
    assert len(staging) == 1
    loader.save_checkpoint()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(atomic.STAGING_PREFIX)]
    assert len(loader.list_checkpoints()) == 2


def test_a_finished_save_is_an_ordinary_speechbrain_checkpoint(tmp_path):
    saver = AtomicCheckpointer(tmp_path, recoverables=_modules(3.0))
    saver.save_and_keep_only(meta={"loss": 1.5}, min_keys=["loss"])
    saver.save_and_keep_only(meta={"loss": 1.0}, min_keys=["loss"])
    # Stock SpeechBrain reads it (meta, files, keep-only) as its own.
    reader_modules = _modules(0.0)
    reader = Checkpointer(tmp_path, recoverables=reader_modules)
    (only,) = reader.list_checkpoints()
    assert only.meta["loss"] == 1.0
    assert sorted(os.listdir(only.path)) == ["CKPT.yaml", "lm.ckpt", "other.ckpt"]
    reader.recover_if_possible(min_key="loss")
    assert torch.all(reader_modules["lm"].weight == 3.0)


def test_saving_under_a_custom_name_twice_replaces_it(tmp_path):
    saver = AtomicCheckpointer(tmp_path, recoverables=_modules(1.0))
    saver.save_checkpoint(name="latest")
    modules = _modules(5.0)
    AtomicCheckpointer(tmp_path, recoverables=modules).save_checkpoint(name="latest")
    fresh = _modules(0.0)
    loader = AtomicCheckpointer(tmp_path, recoverables=fresh)
    assert [c.path.name for c in loader.list_checkpoints()] == ["CKPT+latest"]
    loader.recover_if_possible()
    assert torch.all(fresh["lm"].weight == 5.0)
