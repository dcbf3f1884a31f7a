"""finetune.py with Ctrl-C arriving on every rank in the middle of its second
checkpoint save: after the checkpoint's files are written, before it is in
place (a terminal's Ctrl-C sends SIGINT to the whole process group).

    torchrun --nproc_per_node=2 tests/interrupted_finetune.py finetune.yaml ...
"""

import runpy
import sys
from pathlib import Path

from sbtemplate import checkpoints

FINETUNE = Path(__file__).resolve().parent.parent / "finetune.py"
real_barrier = checkpoints.ddp_barrier
calls = 0


def interrupting_barrier():
    """The first barrier of the second save (each save has two)."""
    global calls
    calls += 1
    if calls == 3:
        raise KeyboardInterrupt
    real_barrier()


checkpoints.ddp_barrier = interrupting_barrier
sys.argv = [str(FINETUNE)] + sys.argv[1:]
runpy.run_path(str(FINETUNE), run_name="__main__")
