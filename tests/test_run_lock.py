"""One run per output folder: a second run fails at once, naming the holder."""

import os
import subprocess
import sys

import pytest

from sbtemplate.run_lock import OutputFolderInUse, hold_output_folder, release_output_folder

TRY_LOCK = "from sbtemplate.run_lock import hold_output_folder as h; import sys; h(sys.argv[1]); print('locked')"


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    hold_output_folder(tmp_path)
    try:
        other = subprocess.run(
            [sys.executable, "-c", TRY_LOCK, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode != 0
        assert (
            "OutputFolderInUse" in other.stderr
            and f"in use by pid {os.getpid()} on " in other.stderr
        )
    finally:
        release_output_folder(tmp_path)
    again = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and again.stdout.strip() == "locked", again.stderr


def test_the_lock_dies_with_its_process(tmp_path):
    """A killed run leaves nothing to clean up: the next run takes the folder."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            TRY_LOCK + "; sys.stdout.flush(); import time; time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderInUse, match=f"pid {holder.pid} "):
            hold_output_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    hold_output_folder(tmp_path)
    release_output_folder(tmp_path)
