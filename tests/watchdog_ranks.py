"""One rank of a hang-watchdog scenario for tests/test_watchdog.py.

    torchrun --standalone --nproc_per_node=2 tests/watchdog_ranks.py mismatch|stall|ddp|healthy MISMATCH_S STALL_S POLL_S

Collectives get a 600 s timeout, so only the watchdog can end a hang in time.
Each rank prints ``START <unix time>`` when the scenario proper begins.
"""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

from sbtemplate.distributed.watchdog import start_watchdog

TIMEOUT = datetime.timedelta(seconds=600)


def sleeping_rank(seconds):
    """A rank that stopped making progress (its stack does not change)."""
    time.sleep(seconds)


def computing_rank(seconds):
    """A slow but healthy rank: Python code running, its stack changing."""
    total, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        total += sum(i * i for i in range(1000))
    return total


def main(scenario, mismatch_s, stall_s, poll_s):
    """Run ``scenario`` on this rank, the watchdog on."""
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Like the project's evaluation group: collectives on another group than SpeechBrain's.
    eval_group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    with start_watchdog(rank, world, mismatch_s, stall_s, poll_s, label=lambda: scenario):
        dist.barrier()
        os.write(1, f"START {time.time()}\n".encode())  # one write: ranks share stdout
        if scenario == "mismatch":
            if rank == 0:
                dist.all_reduce(torch.ones(1))
            else:
                dist.all_gather_object([None] * world, rank, group=eval_group)
        elif scenario == "stall":
            if rank == 1:
                sleeping_rank(300)
            dist.barrier()
        elif scenario == "ddp":
            if rank == 1:
                sleeping_rank(300)
            model(torch.ones(2, 4)).sum().backward()  # DDP: rank 0 waits for rank 1's gradients
        elif scenario == "healthy":
            if rank == 1:
                computing_rank(3 * stall_s)
            dist.all_reduce(torch.ones(1))
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:5]))
