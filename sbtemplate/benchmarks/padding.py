"""Decoding benchmark: padding-invariant against stock, every batching timed with repeats.

Decodes with the published recognizer through ``EncoderDecoderASR.
transcribe_batch`` two sets of utterances:

* ``test``: the profile's test utterances, in manifest order;
* ``long``: long-form utterances built by concatenating test utterances, their
  lengths log-spread over about 0.5 to 20 s and shuffled (files as a user with
  long-form audio has them).

Each set is decoded with three recognizers over the same checkpoint: the
padding-invariant classes (the default: a batch of mixed lengths is split into
groups of similar length inside each call), the same classes decoding every
batch whole (``max_length_ratio = None``, what they did before the groups) and
the stock SpeechBrain classes (``padding_invariant: False``). Batchings: one by
one (``bs1``), fixed-size batches of 8 and 16 in file order (``bs8_file``,
``bs16_file``: what a user who batches files as they come gets), the same sizes
length-sorted (``bs8_sorted``, ``bs16_sorted``) and SpeechBrain's
``DynamicBatchSampler`` (``dynamic``).

Every (recognizer, batching) is decoded ``repeats`` times, the order of the
recognizers rotating from one repeat to the next; before the timed runs every
recognizer decodes every batching once on a slice of the set (the same warm-up
for each). Speeds are utterances per second of this process's CPU time (one
thread by default: robust against other processes on the machine); the table
gives the median and the spread (min-max) and the ratios below it. Hypotheses
are compared with each recognizer's own batch size 1.

``python -m sbtemplate.benchmarks.padding --profile full`` prints the table;
``run()`` returns the figures. Without a trained model, ``allow_random=True``
decodes noise with a random-initialised recognizer (marked as such).
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from sbtemplate.benchmarks import diagnostics
from sbtemplate.benchmarks.decoding import (
    by_length,
    compare,
    decode,
    dynamic_batches,
    fixed_size_batches,
    wer,
)
from sbtemplate.padding_invariant.encoder import normalizer_statistics_to
from sbtemplate.paths import ProfilePaths
from sbtemplate.profiles import profile_names

SAMPLE_RATE = 16000
#: Recognizers compared: name -> (padding_invariant, decode batches whole).
RECOGNIZERS = {
    "padding_invariant": (True, False),
    "invariant_whole": (True, True),
    "stock": (False, False),
}
BATCHINGS = ("bs1", "bs8_file", "bs16_file", "bs8_sorted", "bs16_sorted", "dynamic")


def load_recognizer(model_dir, savedir, padding_invariant, beam_size=None, whole=False):
    """``EncoderDecoderASR.from_hparams`` on a model folder, choosing the classes.

    ``whole`` makes the padding-invariant encoder and searcher decode each
    batch whole instead of in groups of similar length.
    """
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
    if whole:
        decode_whole_batches(asr)
    return asr


def decode_whole_batches(asr):
    """Make the padding-invariant encoder and searcher take each batch whole (no length groups)."""
    asr.mods.encoder.max_length_ratio = None
    asr.mods.decoder.max_length_ratio = None


def data_root(paths):
    """The folder ``{data_root}`` in the manifests stands for."""
    librispeech = paths.corpus / "LibriSpeech"
    return librispeech if librispeech.is_dir() else paths.corpus


def load_test_set(paths, max_utterances=None):
    """(ids, waveforms, words, durations) of the profile's test manifests, in file order."""
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
        ids, wavs, refs, durations = (x[:max_utterances] for x in (ids, wavs, refs, durations))
    return ids, wavs, refs, durations


def long_form_set(wavs, refs, n=32, shortest=0.5, longest=20.0, seed=0):
    """Concatenations of the given utterances, lengths log-spread over [shortest, longest] s.

    Item ``i`` aims at ``shortest * (longest/shortest) ** (i / (n-1))`` seconds:
    utterances are drawn from a shuffled cycle and appended while the total
    stays within the aim (at least one; the shortest unused one when none
    fits). The items are returned shuffled. Returns (ids, wavs, refs, durations).
    """
    rng = random.Random(seed)
    pool = list(range(len(wavs)))
    rng.shuffle(pool)
    by_duration = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    cursor = 0
    items = []
    for k in range(n):
        aim = shortest * (longest / shortest) ** (k / max(n - 1, 1)) * SAMPLE_RATE
        parts, total = [], 0
        for _ in range(len(pool)):
            i = pool[cursor % len(pool)]
            if total + len(wavs[i]) > aim:
                break
            parts.append(i)
            total += len(wavs[i])
            cursor += 1
        if not parts:
            parts = [by_duration[k % len(by_duration)]]
        items.append(parts)
    rng.shuffle(items)
    out_wavs = [torch.cat([wavs[i] for i in parts]) for parts in items]
    out_refs = [" ".join(refs[i] for i in parts) for parts in items]
    ids = [f"long{k:03d}" for k in range(len(items))]
    return ids, out_wavs, out_refs, [len(w) / SAMPLE_RATE for w in out_wavs]


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
        "bs8_file": fixed_size_batches(n, 8),
        "bs16_file": fixed_size_batches(n, 16),
        "bs8_sorted": fixed_size_batches(n, 8, longest_first),
        "bs16_sorted": fixed_size_batches(n, 16, longest_first),
        "dynamic": dynamic_batches(durations, dynamic_max_seconds),
    }


def _spread(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def measure_set(asrs, wavs, refs, durations, repeats, warm_up_utterances=16, score=True):
    """Decode one set with every recognizer and batching; the set's figures."""
    dynamic_max_seconds = 8 * sum(durations) / len(durations)
    plan = batchings(durations, dynamic_max_seconds)
    warm = list(range(min(warm_up_utterances, len(wavs))))
    warm_plan = batchings([durations[i] for i in warm], dynamic_max_seconds)
    for asr in asrs.values():
        for batches in warm_plan.values():
            decode(asr, [wavs[i] for i in warm], batches)
    names = list(asrs)
    cpu = {name: {b: [] for b in plan} for name in names}
    wall = {name: {b: [] for b in plan} for name in names}
    first = {name: {} for name in names}
    for r in range(repeats):
        rotated = names[r % len(names) :] + names[: r % len(names)]
        for batching, batches in plan.items():
            for name in rotated:
                d = decode(asrs[name], wavs, batches)
                cpu[name][batching].append(len(wavs) / d["cpu_seconds"])
                wall[name][batching].append(len(wavs) / d["seconds"])
                first[name].setdefault(batching, d)
    figures = {
        "utterances": len(wavs),
        "audio_seconds": round(sum(durations), 2),
        "shortest_seconds": round(min(durations), 2),
        "longest_seconds": round(max(durations), 2),
        "batch_counts": {b: len(batches) for b, batches in plan.items()},
        "utterances_per_second": {n: {b: _spread(v) for b, v in cpu[n].items()} for n in names},
        "utterances_per_wall_second": {
            n: {b: statistics.median(v) for b, v in wall[n].items()} for n in names
        },
        "identical_to_bs1": {
            n: {b: compare(first[n]["bs1"], d)["identical"] for b, d in first[n].items()}
            for n in names
        },
        "max_score_diff_to_bs1": {
            n: {b: compare(first[n]["bs1"], d)["max_score_diff"] for b, d in first[n].items()}
            for n in names
        },
        "wer": {
            n: {b: (wer(refs, d["words"]) if score else None) for b, d in first[n].items()}
            for n in names
        },
    }
    if "stock" in first and "padding_invariant" in first:
        figures["stock_bs1_identical_to_padding_invariant_bs1"] = compare(
            first["padding_invariant"]["bs1"], first["stock"]["bs1"]
        )["identical"]
    figures["ratios"] = ratios(figures)
    return figures


def ratios(set_figures):
    """Speed ratios (medians of CPU-time speeds) and whether each goal holds."""
    speed = {
        n: {b: s["median"] for b, s in v.items()}
        for n, v in set_figures["utterances_per_second"].items()
    }
    inv = speed["padding_invariant"]
    out = {
        "vs_bs1": {b: inv[b] / inv["bs1"] for b in inv if b != "bs1"},
        "file_vs_sorted": {
            size: inv[f"{size}_file"] / inv[f"{size}_sorted"] for size in ("bs8", "bs16")
        },
    }
    if "stock" in speed:
        out["vs_stock"] = {b: inv[b] / speed["stock"][b] for b in inv}
    if "invariant_whole" in speed:
        out["vs_whole"] = {b: inv[b] / speed["invariant_whole"][b] for b in inv}
    out["goals"] = {
        "every_batching_at_least_1.5x_bs1": min(out["vs_bs1"].values()) >= 1.5,
        "file_order_at_least_0.8x_sorted": min(out["file_vs_sorted"].values()) >= 0.8,
        "bs16_sorted_at_least_4x_bs1": out["vs_bs1"]["bs16_sorted"] >= 4.0,
    }
    if "vs_stock" in out:
        out["goals"]["at_least_1.0x_stock_everywhere"] = min(out["vs_stock"].values()) >= 1.0
    out["goals"]["identical_to_bs1_everywhere"] = all(
        v == set_figures["utterances"]
        for v in set_figures["identical_to_bs1"]["padding_invariant"].values()
    )
    return out


def run(
    profile="tiny",
    max_utterances=None,
    threads=1,
    beam_size=None,
    model_dir=None,
    allow_random=False,
    stages=True,
    repeats=3,
    long_form=32,
    recognizers=tuple(RECOGNIZERS),
    sets=("test", "long"),
):
    """Decode the profile's test set (and the long-form set) every way; the figures.

    Arguments
    ---------
    profile : str
        ``tiny`` or ``full`` (its published model folder and test manifests).
    max_utterances : int, optional
        Use only the first N test utterances (the long-form set is built from them).
    threads : int
        ``torch.set_num_threads`` for all runs (speed ratios need the same).
    beam_size : int, optional
        Override the published beam size.
    model_dir : path, optional
        A model folder other than the profile's.
    allow_random : bool
        Without a trained model, use a random-initialised one on noise.
    stages : bool
        Also measure the per-stage leaks (on 8 test utterances).
    repeats : int
        Timed runs of every (recognizer, batching).
    long_form : int
        Utterances in the long-form set (0: no long-form set).
    recognizers : sequence of str
        Names from :data:`RECOGNIZERS` (``padding_invariant`` is required).
    sets : sequence of str
        ``test`` and/or ``long`` (e.g. one per process, to use two cores).
    """
    import speechbrain

    if "padding_invariant" not in recognizers:
        raise ValueError("recognizers must include 'padding_invariant'")
    unknown = set(recognizers) - set(RECOGNIZERS)
    if unknown:
        raise ValueError(f"unknown recognizers {sorted(unknown)}: choose from {list(RECOGNIZERS)}")
    paths = ProfilePaths.for_profile(profile)
    model_dir = Path(model_dir) if model_dir else paths.model_dir
    tmp = tempfile.TemporaryDirectory(prefix="padding-bench-")
    kind = "trained"
    if (model_dir / "hyperparams.yaml").is_file():
        ids, wavs, refs, durations = load_test_set(paths, max_utterances)
    elif allow_random:
        from sbtemplate.benchmarks.random_model import write_random_recognizer

        kind = "random-initialised"
        model_dir = write_random_recognizer(Path(tmp.name) / "random_model")
        ids, wavs, refs, durations = random_test_set(max_utterances or 24)
    else:
        raise FileNotFoundError(
            f"No published model in {model_dir}: run "
            f"`python -m sbtemplate.build --profile {profile}` first "
            "(or pass allow_random=True)"
        )
    unknown = set(sets) - {"test", "long"}
    if unknown or not sets:
        raise ValueError(f"sets must be 'test' and/or 'long', got {list(sets)}")
    chosen = {}
    if "test" in sets:
        chosen["test"] = (wavs, refs, durations)
    if "long" in sets and long_form:
        _, lw, lr, ld = long_form_set(wavs, refs, n=long_form)
        chosen["long"] = (lw, lr, ld)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        asrs = {
            name: load_recognizer(
                model_dir,
                Path(tmp.name) / f"savedir_{name}",
                padding_invariant=RECOGNIZERS[name][0],
                beam_size=beam_size,
                whole=RECOGNIZERS[name][1],
            )
            for name in recognizers
        }
        figures_sets = {
            name: measure_set(asrs, w, r, d, repeats, score=kind == "trained")
            for name, (w, r, d) in chosen.items()
        }
        stage_figures = {}
        if stages:
            subset = [wavs[i] for i in stage_subset(durations)]
            for name in ("padding_invariant", "stock"):
                if name in asrs:
                    if name == "padding_invariant":
                        # the per-stage figures are of the whole-batch arithmetic
                        decode_whole_batches(asrs[name])
                    stage_figures[name] = diagnostics.stage_report(asrs[name], subset)
        del asrs
    finally:
        torch.set_num_threads(previous_threads)
        tmp.cleanup()

    return {
        "profile": profile,
        "model": kind,
        "model_dir": str(model_dir) if kind == "trained" else None,
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "beam_size": beam_size,
        "repeats": repeats,
        "device": os.environ.get("SBTEMPLATE_DEVICE", "cpu"),
        "torch": torch.__version__,
        "speechbrain": speechbrain.__version__,
        "machine": platform.processor() or platform.machine(),
        "timing": "utterances per second of this process's CPU time "
        "(transcribe_batch spans only; median and min-max of the repeats)",
        "sets": figures_sets,
        "stages": stage_figures,
    }


def format_set(name, fig, recognizers):
    """One set's table and ratios as text."""
    n = fig["utterances"]
    lines = [
        f"Set {name!r}: {n} utterances, {fig['audio_seconds']} s of audio "
        f"({fig['shortest_seconds']}-{fig['longest_seconds']} s each)",
        "",
        f"{'batching':<12} {'batches':>7} | " + " | ".join(f"{r:^34}" for r in recognizers),
        f"{'':<12} {'':>7} | "
        + " | ".join(f"{'WER %':>6} {'same':>7} {'utt/s (min-max)':>19}" for _ in recognizers),
    ]
    for batching, count in fig["batch_counts"].items():
        row = f"{batching:<12} {count:>7}"
        for r in recognizers:
            w = fig["wer"][r][batching]
            same = fig["identical_to_bs1"][r][batching]
            s = fig["utterances_per_second"][r][batching]
            werc = f"{w['WER']:>6.2f}" if w else f"{'n/a':>6}"
            speed = f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
            row += f" | {werc} {f'{same}/{n}':>7} {speed:>19}"
        lines.append(row)
    r = fig["ratios"]
    lines += ["", "padding-invariant speed ratios (medians):"]
    lines.append(
        "  vs its own bs1:    " + ", ".join(f"{b} {v:.2f}x" for b, v in r["vs_bs1"].items())
    )
    lines.append(
        "  file vs sorted:    " + ", ".join(f"{b} {v:.2f}x" for b, v in r["file_vs_sorted"].items())
    )
    if "vs_stock" in r:
        lines.append(
            "  vs stock:          " + ", ".join(f"{b} {v:.2f}x" for b, v in r["vs_stock"].items())
        )
    if "vs_whole" in r:
        lines.append(
            "  vs whole batches:  " + ", ".join(f"{b} {v:.2f}x" for b, v in r["vs_whole"].items())
        )
    lines.append(
        "  goals: " + ", ".join(f"{g} {'yes' if ok else 'NO'}" for g, ok in r["goals"].items())
    )
    if "stock_bs1_identical_to_padding_invariant_bs1" in fig:
        lines.append(
            f"  stock bs1 hypotheses identical to padding-invariant bs1: "
            f"{fig['stock_bs1_identical_to_padding_invariant_bs1']}/{n}"
        )
    return "\n".join(lines)


def format_table(fig):
    """The figures as side-by-side text tables, one per set."""
    first = next(iter(fig["sets"].values()))
    recognizers = list(first["utterances_per_second"])
    lines = [
        f"Decoding benchmark: profile {fig['profile']} ({fig['model']} model), "
        f"{fig['threads']} thread(s) (OMP_WAIT_POLICY={fig.get('omp_wait_policy')}), "
        f"{fig['repeats']} timed runs each, device {fig['device']}, "
        f"torch {fig['torch']}, speechbrain {fig['speechbrain']}",
        "utt/s: utterances per second of CPU time (median, min-max); same: hypotheses "
        "identical to the recognizer's own bs1; *_file: batches in file order; "
        "invariant_whole: padding-invariant classes without the length groups",
    ]
    for name, set_fig in fig["sets"].items():
        lines += ["", format_set(name, set_fig, recognizers)]
    stages = fig.get("stages") or {}
    if stages.get("stock") and stages.get("padding_invariant"):
        lines += [
            "",
            f"Per-stage leaks (batched vs alone, {stages['stock']['search_total']} utterances "
            "of mixed length, whole batches):",
            f"  {'stage':<28} {'padding-invariant':>18} {'stock':>12}",
        ]
        for key in stages["stock"]:
            if key == "search_total":
                continue
            a, b = stages["padding_invariant"][key], stages["stock"][key]
            fmt = (lambda v: f"{v:.3g}") if isinstance(a, float) else str
            lines.append(f"  {key:<28} {fmt(a):>18} {fmt(b):>12}")
    return "\n".join(lines)


def main(argv=None):
    """Command line: print the tables, optionally write the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny", choices=profile_names())
    parser.add_argument("--max-utterances", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--beam-size", type=int, default=None)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--allow-random", action="store_true")
    parser.add_argument("--no-stages", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument(
        "--long-form",
        type=int,
        default=32,
        help="utterances in the long-form set (0: none; default 32)",
    )
    parser.add_argument(
        "--recognizers", nargs="+", default=list(RECOGNIZERS), choices=list(RECOGNIZERS)
    )
    parser.add_argument("--sets", nargs="+", default=["test", "long"], choices=["test", "long"])
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
        repeats=args.repeats,
        long_form=args.long_form,
        recognizers=args.recognizers,
        sets=args.sets,
    )
    print(format_table(fig))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
