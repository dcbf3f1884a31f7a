"""Every benchmark of the suite in one run, written to one report.

    python -m sbtemplate.bench [--profile full] [--out results]

Runs, one after the other on the same machine (so the ratios are measured side
by side): padding-invariant against stock batched decoding and batch size 1
(``benchmarks.padding``), LM-only against whole-recognizer fine-tuning steps and
dynamic against fixed batching (``benchmarks.finetune``), sharded
evaluation on 2 ranks against 1 (``benchmarks.ddp_eval``) and, unless
``--no-replicas``, the same decoding and step comparisons at the size of the
real LibriSpeech recognizers (``benchmarks.replicas``, on the replicas of
``python -m sbtemplate.replicas --size full``, written if missing). Writes
``<out>/report.md`` (tables), ``<out>/report.json`` (all figures) and two plots:
WER against batch size for stock and padding-invariant decoding, and the
padding fraction of fixed against dynamic batching. The build's and the last
fine-tuning run's figures are included when present. Needs the profile built
(``python -m sbtemplate.build --profile <profile>``).
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from sbtemplate.paths import ProfilePaths
from sbtemplate.profiles import profile_names


def _section(title, body):
    return f"## {title}\n\n{body}\n"


def _plots(figures, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    test_set = (figures.get("padding") or {}).get("sets", {}).get("test")
    if test_set and test_set["wer"]["padding_invariant"]["bs1"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = list(test_set["batch_counts"])
        for variant, style in (("stock", "o--"), ("padding_invariant", "s-")):
            if variant in test_set["wer"]:
                wer = test_set["wer"][variant]
                ax.plot(
                    range(len(names)),
                    [wer[n]["WER"] for n in names],
                    style,
                    label=variant.replace("_", "-"),
                )
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
        ax.set_ylabel("WER (%)")
        ax.set_title(f"WER against batching ({test_set['utterances']} utterances)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "wer_vs_batch_size.png", dpi=100)
        made.append("wer_vs_batch_size.png")
        plt.close(fig)
    batching = (figures.get("finetune") or {}).get("batching")
    if batching:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = ["fixed", "dynamic"]
        ax.bar(
            names, [100 * batching[n]["padding_fraction"] for n in names], color=["#999", "#37a"]
        )
        ax.set_ylabel("padding (% of batch tokens)")
        ax.set_title("LM fine-tuning batches: fixed vs dynamic")
        fig.tight_layout()
        fig.savefig(out / "padding_fixed_vs_dynamic.png", dpi=100)
        made.append("padding_fixed_vs_dynamic.png")
        plt.close(fig)
    return made


def run(profile="full", out="results", max_utterances=60, threads=1, repeats=3, with_replicas=True):
    """Run the padding, fine-tuning and DDP-evaluation benchmarks on a built profile; the figures.

    Writes ``report.md``, ``report.json`` and the plots into ``out``, with the
    build's and the last fine-tuning run's figures when present. Raises
    FileNotFoundError when the profile is not built.
    """
    from sbtemplate.benchmarks import ddp_eval, finetune, padding
    from sbtemplate.benchmarks import replicas as replicas_bench

    paths = ProfilePaths.for_profile(profile)
    if not (paths.model_dir / "hyperparams.yaml").is_file():
        raise FileNotFoundError(
            f"No published model for the {profile!r} profile in {paths.model_dir}: "
            f"run `python -m sbtemplate.build --profile {profile}` first"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures, seconds, sections = {"profile": profile}, {}, []

    def timed(name, func):
        start = time.time()
        print(f"[bench] {name} ...", flush=True)
        figures[name] = func()
        seconds[name] = round(time.time() - start, 1)

    if paths.build_report.is_file():
        figures["build"] = json.loads(paths.build_report.read_text())
    finetune_results = paths.root / "results" / "finetune_lm"
    results = sorted(finetune_results.glob("*/results.json"))
    if results:
        figures["finetune_run"] = json.loads(results[-1].read_text())

    timed(
        "padding",
        lambda: padding.run(
            profile=profile, max_utterances=max_utterances, threads=threads, repeats=repeats
        ),
    )
    timed("finetune", lambda: finetune.run(profile=profile, threads=threads))
    timed(
        "ddp_eval",
        lambda: ddp_eval.run(
            ranks=(1, 2),
            model_dir=paths.model_dir,
            manifest=paths.manifests / "test.json",
            data_root=paths.corpus / "LibriSpeech",
            n_utterances=min(max_utterances, 40),
            batch_size=8,
            threads_per_rank=threads,
            work_dir=str(out / "ddp_eval_work"),
        ),
    )
    if with_replicas:
        timed("replicas", lambda: replicas_bench.run(profile=profile, threads=threads))
    figures["seconds"] = seconds

    if "build" in figures:
        wer = figures["build"]["wer"]
        sections.append(
            _section(
                "Base recognizer (beam search + RNNLM)",
                f"| test set | WER |\n|---|---|\n| general domain | {wer['test_general']:.2f}% |\n"
                f"| target domain | {wer['test']:.2f}% |\n\nBuild stage seconds: "
                + ", ".join(
                    f"{k} {v:.0f}" if v is not None else f"{k} ?"
                    for k, v in figures["build"]["seconds"].items()
                ),
            )
        )
    if "finetune_run" in figures:
        res = figures["finetune_run"]
        ppl = res["perplexity"]
        sections.append(
            _section(
                f"LM fine-tuning (last run: world size {res['world_size']}, {res.get('device')})",
                "| | base LM | fine-tuned LM |\n|---|---|---|\n"
                f"| target-domain valid perplexity | {ppl['base']['target_valid']:.3f} | {ppl['finetuned']['target_valid']:.3f} |\n"
                f"| target-domain test WER | {res['wer'].get('base_lm', float('nan')):.2f}% | "
                f"{res['wer'].get('finetuned_brain', float('nan')):.2f}% |",
            )
        )
    sections.append(
        _section(
            "Decoding: padding-invariant against stock, every batching",
            "```\n" + padding.format_table(figures["padding"]) + "\n```",
        )
    )
    sections.append(
        _section(
            "LM-only fine-tuning cost and dynamic batching",
            finetune.format_table(figures["finetune"]),
        )
    )
    sections.append(
        _section(
            "Sharded evaluation, 2 ranks against 1", ddp_eval.format_table(figures["ddp_eval"])
        )
    )
    if with_replicas:
        sections.append(
            _section(
                "The real LibriSpeech recognizers' size (random-weight replicas)",
                "```\n" + replicas_bench.format_table(figures["replicas"]) + "\n```",
            )
        )
    plots = _plots(figures, out)
    report = [
        f"# Suite report ({profile} profile)\n",
        f"Generated by `python -m sbtemplate.bench --profile {profile}` on "
        f"{os.cpu_count()} CPU cores; benchmark seconds: "
        + ", ".join(f"{k} {v}" for k, v in seconds.items())
        + ".\n",
    ]
    report += sections
    report += [f"![{p}]({p})\n" for p in plots]
    (out / "report.md").write_text("\n".join(report))
    (out / "report.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(f"[bench] wrote {out / 'report.md'}", flush=True)
    return figures


def main(argv=None):
    """Command line of :func:`run`; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=profile_names())
    parser.add_argument("--out", default="results", help="report folder")
    parser.add_argument(
        "--max-utterances",
        type=int,
        default=60,
        help="test utterances decoded by the padding and DDP benchmarks",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each decoding (median and spread reported)",
    )
    parser.add_argument(
        "--no-replicas",
        action="store_true",
        help="skip the full-size replicas of the real recognizers (about 40 minutes)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run(
        args.profile,
        args.out,
        args.max_utterances,
        args.threads,
        args.repeats,
        with_replicas=not args.no_replicas,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
