"""The hang watchdog ends a hung 2-rank gloo run in seconds, and only a hung one.

Each scenario runs tests/watchdog_ranks.py under torchrun with small
thresholds and a 600 s collective timeout, so a run that ends in time was
ended by the watchdog. The scenarios run at the same time (about 30 s in all).
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from sbtemplate.distributed import watchdog as wd

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "tests/watchdog_ranks.py"
MISMATCH_S, STALL_S, POLL_S = 3, 4, 0.25


LIMIT_S = {"mismatch": 60, "stall": 60, "ddp": 60, "healthy": 90}


class Ranks:
    """One scenario on 2 ranks under torchrun, output to files, its end time taken when it ends."""

    def __init__(self, scenario, folder):
        torchrun = Path(sys.executable).parent / "torchrun"
        command = [str(torchrun), "--standalone", "--nproc_per_node=2", SCRIPT, scenario]
        command += [str(MISMATCH_S), str(STALL_S), str(POLL_S)]
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        self.out, self.err = folder / f"{scenario}.out", folder / f"{scenario}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True
            )
        self.ended = None
        self.waiter = threading.Thread(target=self._wait, args=(LIMIT_S[scenario],), daemon=True)
        self.waiter.start()

    def _wait(self, limit_s):
        try:
            self.proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # torchrun and its ranks: our session
            self.proc.wait()
        self.ended = time.time()

    def result(self):
        """(exit code, output, seconds from the scenario's start to the end of the run)."""
        self.waiter.join()
        stdout = self.out.read_text()
        output = stdout + self.err.read_text()
        starts = [float(t) for t in re.findall(r"START (\d+\.\d+)", stdout)]
        assert starts, f"the scenario never started:\n{output[-3000:]}"
        return self.proc.returncode, output, self.ended - max(starts)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All scenarios at once: their ranks mostly wait, so together they take about the slowest one's time."""
    folder = tmp_path_factory.mktemp("watchdog")
    started = {scenario: Ranks(scenario, folder) for scenario in LIMIT_S}
    yield started
    for ranks in started.values():
        ranks.waiter.join()


def hang_line(output):
    lines = [line for line in output.splitlines() if "ranks hang:" in line]
    assert lines, f"no hang line:\n{output[-3000:]}"
    assert lines[0].startswith("rank ") and "ERROR: [samplers/DDP] ranks hang: " in lines[0]
    return lines[0]


def test_different_collectives_end_the_run_naming_both_call_sites(runs):
    code, output, after_s = runs["mismatch"].result()
    line = hang_line(output)
    assert code != 0
    assert after_s < MISMATCH_S + 10, f"ended {after_s:.0f} s after the hang began"
    assert re.search(
        r"rank 0 \[mismatch\] waits in all_reduce at tests/watchdog_ranks\.py:\d+", line
    )
    assert re.search(
        r"rank 1 \[mismatch\] waits in all_gather_object at tests/watchdog_ranks\.py:\d+", line
    )


def test_a_rank_that_stops_making_progress_ends_the_run(runs):
    code, output, after_s = runs["stall"].result()
    line = hang_line(output)
    assert code != 0
    assert after_s < STALL_S + 10, f"ended {after_s:.0f} s after the hang began"
    assert "rank 0 [stall] waits in barrier at tests/watchdog_ranks.py:" in line
    assert re.search(
        r"rank 1 \[stall\] stopped making progress at tests/watchdog_ranks\.py:\d+ "
        r"\(sleeping_rank\) for \d+ s",
        line,
    )


def test_a_stopped_rank_is_found_while_the_other_waits_in_ddp_backward(runs):
    # DDP reduces gradients in autograd's C++ engine: no torch.distributed frame shows it
    code, output, after_s = runs["ddp"].result()
    line = hang_line(output)
    assert code != 0
    assert after_s < STALL_S + 10, f"ended {after_s:.0f} s after the hang began"
    assert (
        "rank 0 [ddp] waits in backward (DDP gradient all_reduce) at tests/watchdog_ranks.py:"
        in line
    )
    assert "rank 1 [ddp] stopped making progress at tests/watchdog_ranks.py:" in line


def test_a_slow_healthy_rank_is_waited_for(runs):
    # rank 1 computes for 3 x stall_s while rank 0 waits in all_reduce
    code, output, after_s = runs["healthy"].result()
    assert "ranks hang" not in output
    assert code == 0, output[-3000:]
    assert after_s >= 3 * STALL_S


def test_a_single_process_gets_a_no_op():
    before = threading.active_count()
    with wd.start_watchdog(0, 1) as watchdog:
        assert not watchdog.active
        assert threading.active_count() == before
    watchdog.stop()


def test_without_a_process_group_it_fails_at_the_call():
    with pytest.raises(RuntimeError, match="process group"):
        wd.start_watchdog(0, 2)


def _blocked_here(event):
    event.wait(30)


def test_the_call_site_is_the_innermost_frame_of_the_project():
    event = threading.Event()
    thread = threading.Thread(target=_blocked_here, args=(event,), daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        frame = sys._current_frames()[thread.ident]
        state = wd._describe(frame, wd._Paths(wd.DEFAULT_WRAPPERS))
    finally:
        event.set()
        thread.join()
    assert state["coll"] is None
    assert re.fullmatch(r"tests/test_watchdog\.py:\d+ \(_blocked_here\)", state["where"])
    assert re.fullmatch(r"threading\.py:\d+ \(wait\)", state["inner"])


def _one_long_call(seconds):
    """CPU work in one C call that releases the GIL: the Python stack does not change."""
    rounds = 20000
    took = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"x", b"salt", rounds)
    took = time.perf_counter() - took
    hashlib.pbkdf2_hmac("sha256", b"x", b"salt", int(rounds * seconds / max(took, 1e-6)))


def test_cpu_use_counts_as_progress_when_the_stack_does_not_change():
    # world 2, but no peer ever publishes: the watchdog only samples this (main) thread
    watchdog = wd.HangWatchdog(0, 2, poll_s=0.2, store=dist.HashStore(), on_hang=print)
    with watchdog.start():
        _one_long_call(2.0)
        idle_while_busy = watchdog.mine["idle_s"]
        time.sleep(2.0)
        idle_while_sleeping = watchdog.mine["idle_s"]
    assert idle_while_busy < 1.0
    assert idle_while_sleeping >= 1.4
