"""Choose the beam search's LM and CTC weights and EOS threshold on target-domain dev speech.

    python -m sbtemplate.tune_decoding --profile full \\
        --lm artifacts/full/synthspeech/asr-crdnn-rnnlm-synth/lm_commands.ckpt

decodes ``valid_target.json`` (the corpus's ``dev-target`` split, never the
test set; ``--split valid`` takes the general domain's valid split instead)
with the published recognizer (or ``--model``), its LM replaced by ``--lm`` if
given, with every combination of ``--lm-weights`` x ``--ctc-weights``
x ``--eos-thresholds``, prints WER and sentence error rate for each and writes
them, with the best, to ``--json``. Put the chosen values in the YAML that
decodes the target domain (``lm_weight``, ``ctc_weight_decode``,
``eos_threshold``).

The published settings (LM 0.5, CTC 0.5 in the full profile) suit the general
domain, where the attention decoder has seen the word order. On target-domain
commands its implicit LM pulls towards narrative sentences, and a stronger
in-domain LM and CTC share undo that. The EOS threshold (the searcher ends a hypothesis only
when EOS scores within that factor of the best token's log-probability) matters
as much on short commands: at SpeechBrain's usual 1.5 the decoder often
carries on past the last word ("... MILES MILES").
"""

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from sbtemplate.paths import ProfilePaths
from sbtemplate.profiles import profile_names

DEV_SPLITS = ("valid_target", "valid")  # descriptors without test speech


def load_dev_set(profile_paths, split="valid_target"):
    """``[(id, wav path, words)]`` of a dev descriptor, by id; FileNotFoundError if not built."""
    manifest = profile_paths.manifests / f"{split}.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} does not exist: build the '{profile_paths.profile}' profile "
            f"(python -m sbtemplate.build --profile {profile_paths.profile})"
        )
    entries = json.loads(manifest.read_text())
    data_root = str(profile_paths.corpus / "LibriSpeech")
    return [
        (key, entry["wav"].replace("{data_root}", data_root), entry["words"])
        for key, entry in sorted(entries.items())
    ]


def decode_all(asr, items, batch_size):
    """Hypotheses of ``items`` (id, wav, words), batched (padding-invariant path)."""
    from sbtemplate.evaluation import transcribe_files

    hyps = {}
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        words = transcribe_files(asr, [wav for _, wav, _ in batch])
        hyps.update({key: hyp for (key, _, _), hyp in zip(batch, words)})
    return hyps


def score(items, hyps):
    """WER and SER (share of utterances not transcribed exactly), both in percent."""
    from speechbrain.utils.metric_stats import ErrorRateStats

    stats = ErrorRateStats()
    keys = [key for key, _, _ in items]
    stats.append(keys, [hyps[k].split() for k in keys], [words.split() for _, _, words in items])
    summary = stats.summarize()
    wrong = sum(hyps[key] != words for key, _, words in items)
    return {"WER": summary["WER"], "SER": 100.0 * wrong / len(items)}


def tune(
    model,
    items,
    lm_weights,
    ctc_weights,
    lm=None,
    batch_size=8,
    device="cpu",
    progress=True,
    eos_thresholds=None,
):
    """Decode ``items`` with every combination; return the grid and its best entry.

    ``eos_thresholds=None`` keeps the model's own threshold (not part of the grid).
    """
    from speechbrain.inference.ASR import EncoderDecoderASR

    overrides = {"padding_invariant": True}
    if lm is not None:
        overrides["pretrainer"] = {"paths": {"lm": str(Path(lm).resolve())}}
    results = []
    grid = list(itertools.product(lm_weights, ctc_weights, eos_thresholds or [None]))
    with tempfile.TemporaryDirectory() as savedir:
        for lm_weight, ctc_weight, eos in tqdm(
            grid, desc="decoding settings", disable=not progress
        ):
            setting = {"lm_weight": lm_weight, "ctc_weight_decode": ctc_weight}
            if eos is not None:
                setting["eos_threshold"] = eos
            asr = EncoderDecoderASR.from_hparams(
                source=str(model),
                savedir=savedir,
                run_opts={"device": device},
                overrides={**overrides, **setting},
            )
            hyps = decode_all(asr, items, batch_size)
            results.append({**setting, **score(items, hyps)})
    # Lowest WER; ties go to fewer wrong sentences, then to the smaller values.
    best = min(
        results,
        key=lambda r: (
            r["WER"],
            r["SER"],
            r["lm_weight"],
            r["ctc_weight_decode"],
            r.get("eos_threshold", 0.0),
        ),
    )
    return results, best


def main(argv=None):
    """Command line of :func:`tune`: prints the grid, marks the best, optionally writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=profile_names())
    parser.add_argument(
        "--model",
        default=None,
        help="recognizer folder (default: the profile's published recognizer)",
    )
    parser.add_argument(
        "--lm",
        default=None,
        help="LM checkpoint to decode with instead of the recognizer's lm.ckpt",
    )
    parser.add_argument("--lm-weights", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--ctc-weights", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument(
        "--eos-thresholds",
        type=float,
        nargs="+",
        default=None,
        help="also grid the EOS threshold (default: keep the model's own)",
    )
    parser.add_argument(
        "--split",
        default="valid_target",
        choices=DEV_SPLITS,
        help="dev descriptor to decode (valid: the general domain)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the grid and the best pair here")
    args = parser.parse_args(argv)

    paths = ProfilePaths.for_profile(args.profile)
    model = Path(args.model) if args.model else paths.model_dir
    if not (model / "hyperparams.yaml").is_file():
        parser.error(f"--model {model}: no hyperparams.yaml there (a recognizer folder is needed)")
    bad = [w for w in args.ctc_weights if not 0.0 <= w < 1.0]
    if bad:
        parser.error(f"--ctc-weights must be in [0, 1) (1.0 needs CTC as a full scorer): {bad}")
    if args.eos_thresholds and min(args.eos_thresholds) <= 0:
        parser.error(f"--eos-thresholds must be positive: {args.eos_thresholds}")
    if args.lm is not None and not Path(args.lm).is_file():
        parser.error(f"--lm {args.lm}: no such file")
    items = load_dev_set(paths, args.split)
    results, best = tune(
        model,
        items,
        args.lm_weights,
        args.ctc_weights,
        lm=args.lm,
        batch_size=args.batch_size,
        device=args.device,
        eos_thresholds=args.eos_thresholds,
    )
    print(
        f"\nDecoding settings on {len(items)} utterances of {args.split}.json "
        f"({model}, LM {args.lm or 'lm.ckpt'}):"
    )
    print(f"{'lm_weight':>9} {'ctc_weight':>10} {'eos_thr':>7} {'WER %':>7} {'SER %':>7}")
    for r in results:
        mark = "  <- best" if r is best else ""
        eos = f"{r['eos_threshold']:>7.1f}" if "eos_threshold" in r else f"{'model':>7}"
        print(
            f"{r['lm_weight']:>9.2f} {r['ctc_weight_decode']:>10.2f} {eos} {r['WER']:>7.2f} "
            f"{r['SER']:>7.1f}{mark}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": str(model),
                    "lm": args.lm,
                    "split": args.split,
                    "utterances": len(items),
                    "grid": results,
                    "best": best,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
