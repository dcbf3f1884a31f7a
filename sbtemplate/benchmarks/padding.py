"""Padding benchmark: padding-invariant against stock batched decoding.

Decodes one profile's test utterances with the published recognizer twice,
once with the padding-invariant classes (the default of the inference
hyperparameters) and once with the stock SpeechBrain classes
(``padding_invariant: False``, same checkpoint), each at batch size 1, 8, 16 and
in dynamic batches, and reports side by side:

* WER per batching, and how many hypotheses are identical to batch size 1
  (with the largest best-score difference);
* speed in utterances per second (one run each, same utterances, same
  thread count): padding-invariant batch size 8 against stock batch size 8 and
  against batch size 1;
* the per-stage leak magnitudes (features, convolution boundary, recurrent
  layers, encoder lengths, encoder output, search limits) on a handful of
  utterances of very different lengths.

Fixed-size batches are formed from the utterances sorted by length (longest
first), as a throughput-minded evaluation would; ``bs8_mixed`` also decodes
batches of 8 in manifest order, where lengths mix freely.

``python -m sbtemplate.benchmarks.padding --profile tiny`` prints the table;
``run()`` returns the figures as a dict.  Without a trained model of the
profile, ``allow_random=True`` falls back to a random-initialised recognizer
on noise (marked as such in the figures).
"""

import os
import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from sbtemplate.padding_invariant import diagnostics
from sbtemplate.padding_invariant.encoder import normalizer_statistics_to
from sbtemplate.padding_invariant.decoding import (
    by_length,
    compare,
    decode,
    dynamic_batches,
    fixed_size_batches,
    wer,
)
from sbtemplate.paths import ProfilePaths

SAMPLE_RATE = 16000
VARIANTS = ("padding_invariant", "stock")


def load_recognizer(model_dir, savedir, padding_invariant, beam_size=None):
    """``EncoderDecoderASR.from_hparams`` on a model folder, choosing the classes."""
    from speechbrain.inference.ASR import EncoderDecoderASR

    overrides = {"padding_invariant": padding_invariant}
    if beam_size is not None:
        overrides["beam_size"] = beam_size
    asr = EncoderDecoderASR.from_hparams(
        source=str(model_dir),
        savedir=str(savedir),
        overrides=overrides,
        # SBTEMPLATE_DEVICE=cuda:0 runs the same checks on a GPU (gpu_check.sh).
        run_opts={"device": os.environ.get("SBTEMPLATE_DEVICE", "cpu")},
    )
    normalizer_statistics_to(asr.mods, asr.device)
    return asr


def data_root(paths):
    """The folder ``{data_root}`` in the manifests stands for."""
    librispeech = paths.corpus / "LibriSpeech"
    return librispeech if librispeech.is_dir() else paths.corpus


def load_test_set(paths, max_utterances=None):
    """(ids, waveforms, words, durations) of the profile's test manifests."""
    import soundfile as sf

    root = str(data_root(paths))
    manifests = sorted(paths.manifests.glob("*test*.json"))
    if not manifests:
        raise FileNotFoundError(f"No test manifests (*test*.json) in {paths.manifests}")
    ids, wavs, refs, durations = [], [], [], []
    for manifest in manifests:
        for utt_id, entry in json.loads(manifest.read_text()).items():
            path = entry["wav"].replace("{data_root}", root)
            audio, sr = sf.read(path, dtype="float32")
            if sr != SAMPLE_RATE:
                raise ValueError(f"{path}: {sr} Hz, expected {SAMPLE_RATE}")
            ids.append(utt_id)
            wavs.append(torch.from_numpy(audio))
            refs.append(entry["words"])
            durations.append(len(audio) / sr)
    if max_utterances is not None:
        ids, wavs, refs, durations = (
            x[:max_utterances] for x in (ids, wavs, refs, durations)
        )
    return ids, wavs, refs, durations


def random_test_set(n=24, seed=0):
    """Noise waveforms of 0.3 to 6 s, for a random-initialised recognizer."""
    g = torch.Generator().manual_seed(seed)
    durations = (0.3 + 5.7 * torch.rand(n, generator=g)).tolist()
    wavs = [0.1 * torch.randn(int(d * SAMPLE_RATE), generator=g) for d in durations]
    refs = ["" for _ in wavs]
    return [f"noise{i}" for i in range(n)], wavs, refs, [len(w) / SAMPLE_RATE for w in wavs]


def stage_subset(durations, count=8):
    """Indices of ``count`` utterances of very different lengths (alternating ends)."""
    order = by_length(durations)
    pick = []
    while order and len(pick) < count:
        pick.append(order.pop(0))
        if order:
            pick.append(order.pop())
    return pick


def batchings(durations, dynamic_max_seconds):
    """The batchings compared: name -> list of index lists."""
    n = len(durations)
    longest_first = by_length(durations, descending=True)
    return {
        "bs1": fixed_size_batches(n, 1),
        "bs8": fixed_size_batches(n, 8, longest_first),
        "bs16": fixed_size_batches(n, 16, longest_first),
        "dynamic": dynamic_batches(durations, dynamic_max_seconds),
        "bs8_mixed": fixed_size_batches(n, 8),
    }


def _warm_up(asr, wavs):
    """Run a tiny decode so one-off initialisation is not timed."""
    short = sorted(wavs, key=len)[:2]
    decode(asr, short, [[0, 1]])
    decode(asr, short, [[0]])


def run(
    profile="tiny",
    max_utterances=None,
    threads=1,
    beam_size=None,
    dynamic_max_seconds=None,
    model_dir=None,
    allow_random=False,
    stages=True,
    warm_up=True,
):
    """Decode the profile's test set both ways; returns the figures as a dict.

    Arguments
    ---------
    profile : str
        ``tiny`` or ``full`` (its published model folder and test manifests).
    max_utterances : int, optional
        Use only the first N test utterances.
    threads : int
        ``torch.set_num_threads`` for all runs (speed ratios need the same).
    beam_size : int, optional
        Override the published beam size.
    dynamic_max_seconds : float, optional
        Summed duration per dynamic batch (default: 8 times the mean duration).
    model_dir : path, optional
        A model folder other than the profile's.
    allow_random : bool
        Without a trained model, use a random-initialised one on noise.
    stages : bool
        Also measure the per-stage leaks.
    warm_up : bool
        Decode every batching once, untimed, before the timed runs.
    """
    import speechbrain

    paths = ProfilePaths.for_profile(profile)
    model_dir = Path(model_dir) if model_dir else paths.model_dir
    tmp = tempfile.TemporaryDirectory(prefix="padding-bench-")
    kind = "trained"
    if (model_dir / "hyperparams.yaml").is_file():
        ids, wavs, refs, durations = load_test_set(paths, max_utterances)
    elif allow_random:
        from sbtemplate.padding_invariant.random_model import write_random_recognizer

        kind = "random-initialised"
        model_dir = write_random_recognizer(Path(tmp.name) / "random_model")
        ids, wavs, refs, durations = random_test_set(max_utterances or 24)
    else:
        raise FileNotFoundError(
            f"No published model in {model_dir}: run "
            f"`python -m sbtemplate.build --profile {profile}` first "
            "(or pass allow_random=True)"
        )

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if dynamic_max_seconds is None:
            dynamic_max_seconds = 8 * sum(durations) / len(durations)
        plan = batchings(durations, dynamic_max_seconds)
        asrs = {
            variant: load_recognizer(
                model_dir,
                Path(tmp.name) / f"savedir_{variant}",
                variant == "padding_invariant",
                beam_size,
            )
            for variant in VARIANTS
        }
        for asr in asrs.values():
            _warm_up(asr, wavs)
        if warm_up:
            # One untimed pass over every batch shape: the CPU kernels' first use
            # of a shape is slow, and would otherwise penalise whichever
            # variant runs first.
            for batches in plan.values():
                decode(asrs["padding_invariant"], wavs, batches)
        decodings = {variant: {} for variant in VARIANTS}
        for k, (name, batches) in enumerate(plan.items()):
            # alternate which variant goes first, against drift
            for variant in VARIANTS[:: 1 if k % 2 == 0 else -1]:
                decodings[variant][name] = decode(asrs[variant], wavs, batches)
        results = {}
        for variant in VARIANTS:
            stage_figures = None
            if stages:
                subset = [wavs[i] for i in stage_subset(durations)]
                stage_figures = diagnostics.stage_report(asrs[variant], subset)
            results[variant] = (decodings[variant], stage_figures)
        del asrs
    finally:
        torch.set_num_threads(previous_threads)
        tmp.cleanup()

    figures = {
        "profile": profile,
        "model": kind,
        "model_dir": str(model_dir) if kind == "trained" else None,
        "utterances": len(wavs),
        "audio_seconds": round(sum(durations), 2),
        "threads": threads,
        "beam_size": beam_size,
        "dynamic_max_seconds": round(dynamic_max_seconds, 2),
        "batch_counts": {name: len(b) for name, b in plan.items()},
        "torch": torch.__version__,
        "speechbrain": speechbrain.__version__,
        "machine": platform.processor() or platform.machine(),
        "wer": {},
        "identical_to_bs1": {},
        "max_score_diff_to_bs1": {},
        "utterances_per_second": {},
        "utterances_per_wall_second": {},
        "timing": "utterances per second of this process's CPU time "
        "(transcribe_batch spans only; wall-clock figures alongside)",
        "warm_up": warm_up,
        "stages": {},
    }
    reference = results["padding_invariant"][0]["bs1"]
    for variant, (decodings, stage_figures) in results.items():
        figures["wer"][variant] = {
            name: wer(refs, d["words"]) if kind == "trained" else None
            for name, d in decodings.items()
        }
        figures["identical_to_bs1"][variant] = {}
        figures["max_score_diff_to_bs1"][variant] = {}
        for name, d in decodings.items():
            cmp = compare(decodings["bs1"], d)
            figures["identical_to_bs1"][variant][name] = cmp["identical"]
            figures["max_score_diff_to_bs1"][variant][name] = cmp["max_score_diff"]
        figures["utterances_per_second"][variant] = {
            name: len(wavs) / d["cpu_seconds"] for name, d in decodings.items()
        }
        figures["utterances_per_wall_second"][variant] = {
            name: len(wavs) / d["seconds"] for name, d in decodings.items()
        }
        figures["stages"][variant] = stage_figures
        if variant == "stock":
            figures["stock_bs1_identical_to_padding_invariant_bs1"] = compare(
                reference, decodings["bs1"]
            )["identical"]
    speed = figures["utterances_per_second"]
    figures["speed_ratios"] = {
        "padding_invariant_bs8_vs_bs1": speed["padding_invariant"]["bs8"]
        / speed["padding_invariant"]["bs1"],
        "padding_invariant_bs8_vs_stock_bs8": speed["padding_invariant"]["bs8"]
        / speed["stock"]["bs8"],
        "padding_invariant_bs16_vs_stock_bs16": speed["padding_invariant"]["bs16"]
        / speed["stock"]["bs16"],
        "padding_invariant_dynamic_vs_stock_dynamic": speed["padding_invariant"]["dynamic"]
        / speed["stock"]["dynamic"],
    }
    figures["goals"] = {
        "bs8_at_least_3x_bs1": figures["speed_ratios"]["padding_invariant_bs8_vs_bs1"] >= 3.0,
        "bs8_at_least_0.9x_stock_bs8": figures["speed_ratios"][
            "padding_invariant_bs8_vs_stock_bs8"
        ]
        >= 0.9,
        "all_batchings_identical_to_bs1": all(
            v == len(wavs) for v in figures["identical_to_bs1"]["padding_invariant"].values()
        ),
    }
    return figures


def format_table(fig):
    """The figures as a side-by-side text table."""
    n = fig["utterances"]
    lines = [
        f"Padding benchmark: profile {fig['profile']} ({fig['model']} model), "
        f"{n} utterances, {fig['audio_seconds']} s of audio, "
        f"{fig['threads']} thread(s), torch {fig['torch']}, speechbrain {fig['speechbrain']}",
        "",
        f"{'batching':<10} {'batches':>7} | {'padding-invariant':^36} | {'stock':^36}",
        f"{'':<10} {'':>7} | {'WER %':>7} {'ins':>5} {'same/bs1':>9} {'utt/s':>7} {'wall':>6}"
        f" | {'WER %':>7} {'ins':>5} {'same/bs1':>9} {'utt/s':>7} {'wall':>6}",
    ]
    for name, count in fig["batch_counts"].items():
        row = f"{name:<10} {count:>7}"
        for variant in VARIANTS:
            w = fig["wer"][variant][name]
            same = fig["identical_to_bs1"][variant][name]
            ups = fig["utterances_per_second"][variant][name]
            wall = fig["utterances_per_wall_second"][variant][name]
            werc = f"{w['WER']:>7.2f} {w['insertions']:>5}" if w else f"{'n/a':>7} {'':>5}"
            row += f" | {werc} {f'{same}/{n}':>9} {ups:>7.2f} {wall:>6.2f}"
        lines.append(row)
    r = fig["speed_ratios"]
    lines += [
        "",
        "utt/s: per second of CPU time of this process (one thread); wall: per wall-clock second.",
        "Speed ratios (CPU-time utterances per second, one timed run each):",
        f"  padding-invariant bs8 / padding-invariant bs1 : {r['padding_invariant_bs8_vs_bs1']:.2f}x (goal >= 3x)",
        f"  padding-invariant bs8 / stock bs8             : {r['padding_invariant_bs8_vs_stock_bs8']:.2f}x (goal >= 0.9x)",
        f"  padding-invariant bs16 / stock bs16           : {r['padding_invariant_bs16_vs_stock_bs16']:.2f}x",
        f"  padding-invariant dynamic / stock dynamic     : {r['padding_invariant_dynamic_vs_stock_dynamic']:.2f}x",
        f"  stock bs1 hypotheses identical to padding-invariant bs1: "
        f"{fig['stock_bs1_identical_to_padding_invariant_bs1']}/{n}",
    ]
    if fig["stages"].get("stock") is not None:
        lines += ["", f"Per-stage leaks (batched vs alone, {fig['stages']['stock']['search_total']} utterances of mixed length):"]
        lines.append(f"  {'stage':<28} {'padding-invariant':>18} {'stock':>12}")
        for key in fig["stages"]["stock"]:
            if key == "search_total":
                continue
            a = fig["stages"]["padding_invariant"][key]
            b = fig["stages"]["stock"][key]
            fmt = (lambda v: f"{v:.3g}") if isinstance(a, float) else str
            lines.append(f"  {key:<28} {fmt(a):>18} {fmt(b):>12}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--max-utterances", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--beam-size", type=int, default=None)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--allow-random", action="store_true")
    parser.add_argument("--no-stages", action="store_true")
    parser.add_argument("--no-warm-up", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    fig = run(
        profile=args.profile,
        max_utterances=args.max_utterances,
        threads=args.threads,
        beam_size=args.beam_size,
        model_dir=args.model_dir,
        allow_random=args.allow_random,
        stages=not args.no_stages,
        warm_up=not args.no_warm_up,
    )
    print(format_table(fig))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
