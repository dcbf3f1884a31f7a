"""One Markdown table of a ``gpu_check.sh`` run.

    python -m sbtemplate.benchmarks.gpu_table OUT_DIR [--cpu-reference DIR]

Reads the fine-tuning ``results.json`` of each launch, the decoding benchmark
JSONs and the step log, and compares the WERs with a CPU run of the same
profile (default: ``artifacts/tiny/results/gpu_reference_cpu/results.json``).
"""

import argparse
import json
import sys
from pathlib import Path

from sbtemplate.paths import ProfilePaths

RUNS = {"1 rank, NCCL, cuda:0": "ft_1rank_nccl", "2 ranks, gloo, shared cuda:0": "ft_2ranks_gloo"}


def _load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def table(out_dir, cpu_reference):
    """The Markdown report of a ``gpu_check.sh`` output folder, compared with a CPU run.

    Fine-tuning runs (WERs, path agreement, frozen ASR, identical LM ranks), the WER
    gap between the 1-rank GPU run and the CPU reference, decoding throughput GPU
    against CPU, and the step log. Missing inputs show as "missing" rows.
    """
    out_dir = Path(out_dir)
    lines = [
        "| run | device | WER base LM | WER fine-tuned (Brain) | paths identical | jiwer agrees | ASR frozen | LM ranks identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = {name: _load(out_dir / folder / "results.json") for name, folder in RUNS.items()}
    runs["CPU reference (this repo's CPU run)"] = _load(cpu_reference)
    wers = {}
    for name, res in runs.items():
        if res is None:
            lines.append(f"| {name} | - | missing | | | | | |")
            continue
        wer = res.get("wer", {})
        paths = res.get("paths", {})
        jiwer = paths.get("jiwer_wer", {})
        tuned = wer.get("finetuned_brain")
        agrees = (
            all(v is not None and abs(v - tuned) < 1e-9 for v in jiwer.values())
            if jiwer and tuned is not None
            else None
        )
        lines.append(
            f"| {name} | {res.get('device')} | {_fmt(wer.get('base_lm'))} | {_fmt(tuned)} | "
            f"{paths.get('identical_hypotheses', '-')} | {agrees} | "
            f"{res.get('frozen', {}).get('unchanged_on_every_rank', '-')} | "
            f"{all(e.get('ranks_identical') for e in res.get('epochs', [])) if res.get('epochs') else '-'} |"
        )
        wers[name] = (wer.get("base_lm"), tuned)
    # Like with like: the CPU reference is a 1-process run, so it is compared with
    # the 1-rank GPU run (2 ranks train the LM on another batch plan).
    gpu1, cpu = wers.get("1 rank, NCCL, cuda:0"), wers.get("CPU reference (this repo's CPU run)")
    if gpu1 and cpu and None not in gpu1 + cpu:
        diff = max(abs(a - b) for a, b in zip(gpu1, cpu))
        lines.append(
            f"\nWER difference, 1-rank GPU run against the 1-process CPU run: {diff:.4f} points"
        )

    lines.append(
        "\n| decoding (tiny profile) | GPU utt/s | CPU utt/s | GPU/CPU | identical to bs1 (GPU) |"
    )
    lines.append("|---|---|---|---|---|")
    gpu, cpu = _load(out_dir / "decode_gpu.json"), _load(out_dir / "decode_cpu.json")
    if gpu and cpu:
        for set_name, g_set in gpu["sets"].items():
            c_set = cpu["sets"][set_name]
            for variant in g_set["utterances_per_wall_second"]:
                for batching, g in g_set["utterances_per_wall_second"][variant].items():
                    c = c_set["utterances_per_wall_second"][variant][batching]
                    same = g_set["identical_to_bs1"][variant][batching]
                    lines.append(
                        f"| {set_name}: {variant} {batching} | {g:.2f} | {c:.2f} | "
                        f"{g / c:.2f} | {same}/{g_set['utterances']} |"
                    )
        test_g, test_c = gpu["sets"]["test"], cpu["sets"]["test"]
        lines.append(f"\nWER (GPU, padding-invariant): {test_g['wer'].get('padding_invariant')}")
        lines.append(f"WER (CPU, padding-invariant): {test_c['wer'].get('padding_invariant')}")
    else:
        lines.append("| missing | | | | |")
    steps = out_dir / "steps.txt"
    if steps.is_file():
        lines.append(
            "\nSteps (rc, seconds):\n\n"
            + "\n".join(f"    {s}" for s in steps.read_text().splitlines())
        )
    return "\n".join(lines)


def main(argv=None):
    """Command line of :func:`table`: prints the Markdown; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument(
        "--cpu-reference",
        default=ProfilePaths.for_profile("tiny").root
        / "results"
        / "gpu_reference_cpu"
        / "results.json",
    )
    args = parser.parse_args(argv)
    print(table(args.out_dir, args.cpu_reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
