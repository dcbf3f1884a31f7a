"""Busy-machine benchmark: a single-process run alone and beside CPU-bound jobs.

On a shared machine OpenMP threads that spin-wait for each other (libgomp's
default ``OMP_WAIT_POLICY=ACTIVE`` behaviour) stall whenever another process
holds one of their cores, and a beam search's many small operations each pay
for it. The package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set the
variable (``sbtemplate/__init__.py``). This benchmark runs
``python finetune.py finetune.yaml --build_profile='!include:<profile file>' --number_of_epochs=1``
(fine-tuning and both evaluations) alone and beside ``--hogs`` CPU-bound
processes, under each wait policy, in interleaved repeats, and prints the
median wall time of each and the ratio busy / alone.

    python -m sbtemplate.benchmarks.busy_machine --profile tiny [--repeats 3] [--hogs 2]

Not a test: timings depend on the machine and its load.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sbtemplate.profiles import profile_file, profile_names

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("ACTIVE", "PASSIVE")
HOG = "while True: pass"


def timed_run(profile, policy, output_folder):
    """Wall seconds of one single-process fine-tuning run under ``policy``."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    env.pop("OMP_NUM_THREADS", None)  # the default thread count, as a user runs it
    cmd = [
        sys.executable,
        "finetune.py",
        "finetune.yaml",
        f"--build_profile=!include:{profile_file(profile)}",
        "--number_of_epochs=1",
        f"--output_folder={output_folder}",
    ]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed under OMP_WAIT_POLICY={policy}:\n{done.stderr[-2000:]}"
        )
    return seconds


def measure(profile, repeats, hogs):
    """``{policy: {"alone": [s...], "busy": [s...]}}``, conditions interleaved."""
    times = {policy: {"alone": [], "busy": []} for policy in POLICIES}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            for condition in ("alone", "busy"):
                for policy in POLICIES:
                    procs = (
                        [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
                        if condition == "busy"
                        else []
                    )
                    try:
                        out = Path(scratch) / f"{policy}-{condition}-{repeat}"
                        times[policy][condition].append(timed_run(profile, policy, out))
                    finally:
                        for proc in procs:
                            proc.kill()
                            proc.wait()
                    print(
                        f"repeat {repeat + 1}/{repeats} {condition:5} {policy:7} "
                        f"{times[policy][condition][-1]:.1f} s",
                        flush=True,
                    )
    return times


def report(times, hogs):
    """Medians, spreads and the busy / alone ratio of each policy."""
    rows = {}
    for policy, cond in times.items():
        alone, busy = statistics.median(cond["alone"]), statistics.median(cond["busy"])
        rows[policy] = {
            "alone_s": alone,
            "busy_s": busy,
            "busy_over_alone": busy / alone,
            "alone_all": cond["alone"],
            "busy_all": cond["busy"],
        }
    print(
        f"\nOne process of finetune.py, 1 epoch, alone and beside {hogs} CPU-bound processes "
        f"(median of {len(times['PASSIVE']['alone'])}; all runs in brackets):"
    )
    for policy, row in rows.items():
        print(
            f"  OMP_WAIT_POLICY={policy:7}: alone {row['alone_s']:.1f} s {_all(row['alone_all'])}, busy "
            f"{row['busy_s']:.1f} s {_all(row['busy_all'])}: {row['busy_over_alone']:.2f}x"
        )
    print(
        f"  busy, PASSIVE / ACTIVE: {rows['PASSIVE']['busy_s'] / rows['ACTIVE']['busy_s']:.2f}x the time"
    )
    return rows


def _all(values):
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


def main(argv=None):
    """Command line: time the run alone and busy under each OMP wait policy, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", choices=profile_names())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound processes beside the run")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    rows = report(measure(args.profile, args.repeats, args.hogs), args.hogs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
