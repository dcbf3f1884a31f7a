"""Busy-machine benchmark: a single-process run alone and beside CPU-bound jobs.

On a shared machine OpenMP threads that spin-wait for each other
(``OMP_WAIT_POLICY=ACTIVE``; libgomp's default spins a while before it sleeps)
stall whenever another process holds one of their cores, and a beam search's
many small operations each pay for it. Sleeping threads (``PASSIVE``) have the
opposite cost on an idle machine: each operation that runs on several threads
first wakes them. The package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user
set the variable (``sbtemplate/__init__.py``). This benchmark runs
``python finetune.py finetune.yaml --build_profile='!include:<profile file>' --number_of_epochs=1``
(fine-tuning and both evaluations) alone and beside ``--hogs`` CPU-bound
processes, with spinning threads, sleeping threads and one thread, in
interleaved repeats, and prints the median wall time of each and the ratio
busy / alone.

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
#: Each setting's environment; the thread count is finetune.py's default unless set.
SETTINGS = {
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
}
HOG = "while True: pass"


def timed_run(profile, setting, output_folder):
    """Wall seconds of one single-process fine-tuning run under ``setting``."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(SETTINGS[setting])  # otherwise the default thread count, as a user runs it
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
            f"{' '.join(cmd)} failed under {SETTINGS[setting]}:\n{done.stderr[-2000:]}"
        )
    return seconds


def measure(profile, repeats, hogs):
    """``{setting: {"alone": [s...], "busy": [s...]}}``, conditions interleaved."""
    times = {setting: {"alone": [], "busy": []} for setting in SETTINGS}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            for condition in ("alone", "busy"):
                for setting in SETTINGS:
                    procs = (
                        [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
                        if condition == "busy"
                        else []
                    )
                    try:
                        out = Path(scratch) / f"{setting.replace(' ', '-')}-{condition}-{repeat}"
                        times[setting][condition].append(timed_run(profile, setting, out))
                    finally:
                        for proc in procs:
                            proc.kill()
                            proc.wait()
                    print(
                        f"repeat {repeat + 1}/{repeats} {condition:5} {setting:8} "
                        f"{times[setting][condition][-1]:.1f} s",
                        flush=True,
                    )
    return times


def report(times, hogs):
    """Medians, spreads and the busy / alone ratio of each setting."""
    rows = {}
    for setting, cond in times.items():
        alone, busy = statistics.median(cond["alone"]), statistics.median(cond["busy"])
        rows[setting] = {
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
    for setting, row in rows.items():
        print(
            f"  {setting:8}: alone {row['alone_s']:.1f} s {_all(row['alone_all'])}, busy "
            f"{row['busy_s']:.1f} s {_all(row['busy_all'])}: {row['busy_over_alone']:.2f}x"
        )
    for setting in ("PASSIVE", "1 thread"):
        print(
            f"  {setting} / ACTIVE: alone {rows[setting]['alone_s'] / rows['ACTIVE']['alone_s']:.2f}x, "
            f"busy {rows[setting]['busy_s'] / rows['ACTIVE']['busy_s']:.2f}x the time"
        )
    return rows


def _all(values):
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


def main(argv=None):
    """Command line: time the run alone and busy under each setting, print the ratios."""
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
