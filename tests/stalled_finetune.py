"""finetune.py whose rank 1 stalls at its first training batch (as a rank
does when its process is stopped, swapped out or stuck on a dead file system).

    torchrun --nproc_per_node=2 tests/stalled_finetune.py finetune.yaml ...
"""

import os
import runpy
import sys
import time
from pathlib import Path

import speechbrain as sb

FINETUNE = Path(__file__).resolve().parent.parent / "finetune.py"

if os.environ.get("RANK") == "1":

    def stalled_fit_batch(self, batch):
        time.sleep(3600)

    # finetune.py's Brain does not override fit_batch: SpeechBrain's is the one it runs.
    sb.Brain.fit_batch = stalled_fit_batch

sys.argv = [str(FINETUNE)] + sys.argv[1:]
runpy.run_path(str(FINETUNE), run_name="__main__")
