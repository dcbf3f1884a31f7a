"""Full-size benchmark on the replicas of the real LibriSpeech recognizers.

What users of ``speechbrain/asr-crdnn-rnnlm-librispeech`` (and its
TransformerLM sibling) pay, measured side by side in one run on the
random-weight replicas of ``sbtemplate.replicas``:

1. Decoding: the stock classes (as loaded from the repo) against the same
   model made padding-invariant (:func:`make_padding_invariant`), at batch
   size 1, 8 and 16 in file order and length-sorted, and SpeechBrain's dynamic
   batches, on utterances of mixed length. CPU seconds, and whether every
   batching gives the hypotheses of batch size 1.
2. Fine-tuning cost: one optimisation step of the LM alone (what
   ``finetune_rnnlm_librispeech.yaml`` trains) against one of the whole
   recognizer (seq2seq + CTC loss) on the same batch of utterances.

Each part runs in its own process, so its peak resident memory is its own.
Random weights never end a hypothesis, so each runs to the step limit: the
default ``--max-decode-ratio 0.25`` (about a trained model's hypothesis
length, one 1000-piece token per 160 ms of speech) keeps the decoding
figures close to what trained weights cost. Not a test: timings depend on
the machine and its load (reported).

    python -m sbtemplate.replicas --size full
    python -m sbtemplate.benchmarks.replicas --profile full [--json out.json]
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sbtemplate import replicas
from sbtemplate.benchmarks.decoding import decode
from sbtemplate.benchmarks.padding import BATCHINGS
from sbtemplate.benchmarks.padding import batchings as padding_batchings
from sbtemplate.profiles import profile_names

SAMPLE_RATE = 16000


def batchings(durations, names=BATCHINGS):
    """The padding benchmark's batchings of a set (file order = as given), those named."""
    plans = padding_batchings(durations, 8 * sum(durations) / len(durations))
    return {name: plans[name] for name in names}


def peak_rss_mb():
    """This process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(func, *args):
    """``func(*args)`` in a fresh process (its own peak memory); its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(func, args)


def _decode_worker(folder, invariant, wavs, plans, overrides, threads, repeats):
    from speechbrain.inference.ASR import EncoderDecoderASR

    from sbtemplate.padding_invariant import make_padding_invariant

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as savedir:
        asr = EncoderDecoderASR.from_hparams(
            source=str(folder), savedir=savedir, overrides=overrides
        )
        if invariant:
            make_padding_invariant(asr)
        decode(asr, wavs[:2], [[0], [0, 1]])  # warm-up, the same for both
        out = {}
        for name, batches in plans.items():
            runs = [decode(asr, wavs, batches) for _ in range(repeats)]
            out[name] = {
                "cpu_s": statistics.median(r["cpu_seconds"] for r in runs),
                "cpu_s_runs": [round(r["cpu_seconds"], 2) for r in runs],
                "tokens": runs[0]["tokens"],
            }
    return {"batchings": out, "peak_rss_mb": peak_rss_mb()}


def _step_worker(folder, part, batch_size, manifest, data_root, threads, repeats):
    from sbtemplate.benchmarks import finetune

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as work:
        hparams = finetune.load_recognizer(folder, work, overrides=None)  # stock classes already
        batch = finetune.speech_batch(
            manifest,
            data_root,
            hparams["tokenizer"],
            batch_size,
            hparams["bos_index"],
            hparams["eos_index"],
        )
        if part == "lm_only":
            step, params = finetune.lm_step_fn(hparams)
        else:  # the ASR recipe's loss: 0.5 CTC + 0.5 seq2seq (train_BPE_1000.yaml)
            step, params = finetune.asr_step_fn(hparams, 0.5, hparams["blank_index"])
        timing = finetune.time_steps(step, batch, repeats)
        wavs, _ = batch.sig
    return dict(
        timing,
        trainable_params=params,
        audio_s=float(wavs.shape[0] * wavs.shape[1]) / SAMPLE_RATE,
        peak_rss_mb=peak_rss_mb(),
    )


def decoding_figures(stock, invariant, durations):
    """Speeds (utterances per CPU second), ratios and identity to bs 1 of both recognizers."""
    n = len(durations)
    figures = {"utterances_per_cpu_s": {}, "identical_to_bs1": {}}
    for name, result in (("stock", stock), ("padding_invariant", invariant)):
        runs = result["batchings"]
        figures["utterances_per_cpu_s"][name] = {b: n / r["cpu_s"] for b, r in runs.items()}
        figures["identical_to_bs1"][name] = {
            b: sum(x == y for x, y in zip(runs["bs1"]["tokens"], r["tokens"]))
            for b, r in runs.items()
        }
        figures[f"{name}_peak_rss_mb"] = result["peak_rss_mb"]
        figures[f"{name}_cpu_s_runs"] = {b: r["cpu_s_runs"] for b, r in runs.items()}
    inv, st = (
        figures["utterances_per_cpu_s"]["padding_invariant"],
        figures["utterances_per_cpu_s"]["stock"],
    )
    figures["invariant_vs_stock"] = {b: inv[b] / st[b] for b in inv}
    figures["invariant_vs_own_bs1"] = {b: inv[b] / inv["bs1"] for b in inv}
    figures["bs1_stock_equals_invariant"] = (
        stock["batchings"]["bs1"]["tokens"] == invariant["batchings"]["bs1"]["tokens"]
    )
    return figures


def run(
    size="full",
    profile="full",
    repo_ids=replicas.REPO_IDS,
    utterances=24,
    beam_size=8,
    max_decode_ratio=0.25,
    batchings_names=BATCHINGS,
    step_batch_size=8,
    threads=1,
    repeats=1,
    step_repeats=3,
    log=print,
):
    """Both parts on the replicas of ``size``, audio from the ``profile`` build; the figures."""
    from sbtemplate.benchmarks.padding import data_root, load_test_set
    from sbtemplate.paths import ProfilePaths

    paths = ProfilePaths.for_profile(profile)
    if not paths.manifests.is_dir():
        raise FileNotFoundError(
            f"No {profile!r} build in {paths.root}: run python -m sbtemplate.build --profile {profile}"
        )
    _, wavs, _, durations = load_test_set(paths)
    # A spread of lengths in file order: every k-th utterance of the test set.
    pick = list(range(0, len(wavs), max(1, len(wavs) // utterances)))[:utterances]
    wavs, durations = [wavs[i] for i in pick], [durations[i] for i in pick]
    plans = batchings(durations, batchings_names)
    overrides = {"beam_size": beam_size, "max_decode_ratio": max_decode_ratio}
    figures = {
        "size": size,
        "profile": profile,
        "threads": threads,
        "utterances": len(wavs),
        "shortest_s": round(min(durations), 2),
        "longest_s": round(max(durations), 2),
        "decoding_overrides": overrides,
        "repeats": repeats,
        "models": {},
    }
    for repo_id in repo_ids:
        folder = replicas.write_replica(repo_id, size, log=log)
        record = json.loads((folder / replicas.MARKER).read_text())
        model = {"parameters": record["parameters"]}
        started = time.time()
        log(f"[replicas bench] {repo_id}: decoding, stock classes ...")
        stock = _in_child(_decode_worker, folder, False, wavs, plans, overrides, threads, repeats)
        log(f"[replicas bench] {repo_id}: decoding, padding-invariant ...")
        invariant = _in_child(
            _decode_worker, folder, True, wavs, plans, overrides, threads, repeats
        )
        model["decoding"] = decoding_figures(stock, invariant, durations)
        steps = {}
        for part in ("lm_only", "whole_recognizer"):
            log(f"[replicas bench] {repo_id}: one {part} training step ...")
            steps[part] = _in_child(
                _step_worker,
                folder,
                part,
                step_batch_size,
                paths.manifests / "test.json",
                data_root(paths),
                threads,
                step_repeats,
            )
        steps["ratio"] = steps["whole_recognizer"]["median_s"] / steps["lm_only"]["median_s"]
        model["step"] = steps
        model["seconds"] = round(time.time() - started, 1)
        figures["models"][repo_id] = model
    figures["load_average"] = os.getloadavg()[0]
    return figures


def format_table(fig):
    """The figures of :func:`run` as plain text."""
    o = fig["decoding_overrides"]
    lines = [
        f"{fig['size']} replicas, {fig['threads']} thread(s), {fig['utterances']} utterances of "
        f"{fig['shortest_s']}-{fig['longest_s']} s ({fig['profile']} test set, file order), "
        f"beam {o['beam_size']}, max_decode_ratio {o['max_decode_ratio']}, "
        f"load average {fig['load_average']:.1f}",
    ]
    for repo_id, m in fig["models"].items():
        d, s, p = m["decoding"], m["step"], m["parameters"]
        n = fig["utterances"]
        lines += [
            "",
            f"{repo_id}: {p['asr']:,} ASR + {p['lm']:,} LM parameters",
            f"  {'batching':12} {'stock utt/s':>11} {'invariant':>9} {'inv/stock':>9}"
            f" {'inv/bs1':>8} {'same as bs1 (stock, inv)':>25}",
        ]
        for b, inv in d["utterances_per_cpu_s"]["padding_invariant"].items():
            st = d["utterances_per_cpu_s"]["stock"][b]
            same = f"{d['identical_to_bs1']['stock'][b]}/{n}, {d['identical_to_bs1']['padding_invariant'][b]}/{n}"
            lines.append(
                f"  {b:12} {st:>11.3f} {inv:>9.3f} {d['invariant_vs_stock'][b]:>9.2f}"
                f" {d['invariant_vs_own_bs1'][b]:>8.2f} {same:>25}"
            )
        lines += [
            f"  peak memory: stock {d['stock_peak_rss_mb']:.0f} MB, invariant "
            f"{d['padding_invariant_peak_rss_mb']:.0f} MB",
            f"  one step on {s['lm_only']['audio_s']:.1f} s of padded audio:"
            f" LM only {s['lm_only']['median_s']:.3f} s ({s['lm_only']['trainable_params']:,} params,"
            f" peak {s['lm_only']['peak_rss_mb']:.0f} MB), whole recognizer"
            f" {s['whole_recognizer']['median_s']:.3f} s ({s['whole_recognizer']['trainable_params']:,}"
            f" params, peak {s['whole_recognizer']['peak_rss_mb']:.0f} MB):"
            f" LM-only {s['ratio']:.1f}x cheaper",
        ]
    return "\n".join(lines)


def main(argv=None):
    """Command line of :func:`run`; prints the table (and writes ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=replicas.SIZES, default="full")
    parser.add_argument("--profile", choices=profile_names(), default="full", help="audio from")
    parser.add_argument("--repo", choices=replicas.REPO_IDS, action="append", help="default: both")
    parser.add_argument("--utterances", type=int, default=24)
    parser.add_argument("--beam-size", type=int, default=8, help="the repos' own: 80")
    parser.add_argument("--max-decode-ratio", type=float, default=0.25)
    parser.add_argument("--batchings", nargs="+", choices=BATCHINGS, default=list(BATCHINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="decodings per batching")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    figures = run(
        size=args.size,
        profile=args.profile,
        repo_ids=args.repo or replicas.REPO_IDS,
        utterances=args.utterances,
        beam_size=args.beam_size,
        max_decode_ratio=args.max_decode_ratio,
        batchings_names=args.batchings,
        threads=args.threads,
        repeats=args.repeats,
    )
    print(format_table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
