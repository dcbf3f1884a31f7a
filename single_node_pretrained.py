#!/usr/bin/env python3
"""Single-node check of the pretrained interface with mixed fetching.

1. ``EncoderDecoderASR.from_hparams`` from the Hub (``FetchSource``) with
   ``download_only=True``, then loaded from the cache with run options, and
   ``transcribe_file`` on the example audio (wav/flac) fetched from the Hub
   via FetchSource;
2. the same with a plain string source and a ``savedir``.

By default the Hub is the project's loopback Hub server publishing the
profile's recognizer (sbtemplate.servers); ``--fetch_endpoints=public`` uses
huggingface.co instead (see docs/fetching.md). The settings are
single_node_pretrained.yaml's; SpeechBrain's arguments (``--device``) apply.
Prints what was fetched from where and the transcripts, then checks the
outcome against independent computations (sbtemplate.outcome_checks): the
loaded modules hold the fetched files, the LM takes part in decoding, and the
test set's WER, counted here, is within the bound of the WER the build
recorded. Exits 0 when all is well, 1 when a check fails (one line naming the
seam) and 2 when the profile is not built or fetching fails (one clear
message).

    python single_node_pretrained.py single_node_pretrained.yaml \
        --build_profile='!include:sbtemplate/hparams/profiles/tiny.yaml'
"""

import json
import logging
import os
import sys
import traceback
from pathlib import Path

# Configures the Hub endpoint before anything imports huggingface_hub.
from sbtemplate import fetching  # isort: skip

from sbtemplate import outcome_checks as oc
from sbtemplate.config_checks import ConfigError
from sbtemplate.run_setup import EXIT_FAILED, EXIT_INPUT_ERROR, load_hparams, parse_arguments

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
#: The seam of what the script is doing, named when something fails unexpectedly.
SEAM = {"now": "fetching/loading"}


def example_audio(repo_id, wanted):
    """The example audio to transcribe, chosen from the repo's manifest."""
    from speechbrain.utils.fetching import FetchFrom, FetchSource, fetch

    manifest = json.loads(
        Path(fetch("manifest.json", FetchSource(FetchFrom.HUGGING_FACE, repo_id))).read_text()
    )
    wavs = sorted(name for name in manifest if name.endswith(AUDIO_SUFFIXES))
    if wanted:
        if wanted not in manifest:
            raise SystemExit(
                f"{wanted} is not published in {repo_id} (have: {', '.join(wavs) or 'no audio'})"
            )
        return wanted, manifest
    if not wavs:
        raise SystemExit(f"{repo_id} publishes no example audio")
    return wavs[0], manifest


def reference_text(repo_id, wav, manifest):
    """The example's transcript, if the repo publishes one as <wav stem>.txt."""
    from speechbrain.utils.fetching import FetchFrom, FetchSource, fetch

    name = Path(wav).with_suffix(".txt").name
    if name not in manifest:
        return None
    return Path(fetch(name, FetchSource(FetchFrom.HUGGING_FACE, repo_id))).read_text().strip()


def word_errors(reference, hypothesis):
    """``(edits, reference words)`` of a hypothesis against a reference, at word level."""
    from speechbrain.utils.edit_distance import wer_details_for_batch

    details = wer_details_for_batch(["x"], [reference.split()], [hypothesis.split()])[0]
    return details["num_edits"], details["num_ref_tokens"]


def run_checks(hparams, device):
    """Run both fetch-and-transcribe cases; returns the problems found (empty when all is well).

    Case 1 must fetch from the Hub only and not download again when loading after
    ``download_only``; both cases must give the same non-empty transcript.
    """
    # Imported here: the Hub endpoint is configured by now.
    from speechbrain.inference.ASR import EncoderDecoderASR
    from speechbrain.utils.fetching import FetchFrom, FetchSource, guess_source

    repo = hparams["repo_id"]
    run_opts = {"device": device}
    problems = []
    wav, manifest = example_audio(repo, hparams["example"])

    def new_records(start):
        return fetching.fetch_log[start:]

    print(
        f"\n== Case 1: from_hparams(FetchSource(HUGGING_FACE, {repo!r})), download_only, then load"
    )
    start = len(fetching.fetch_log)
    EncoderDecoderASR.from_hparams(
        source=FetchSource(FetchFrom.HUGGING_FACE, repo), download_only=True
    )
    downloaded = new_records(start)
    start = len(fetching.fetch_log)
    asr = EncoderDecoderASR.from_hparams(
        source=FetchSource(FetchFrom.HUGGING_FACE, repo), run_opts=run_opts
    )
    loaded = new_records(start)
    start = len(fetching.fetch_log)
    SEAM["now"] = "decoding"
    text_1 = asr.transcribe_file(FetchSource(FetchFrom.HUGGING_FACE, f"{repo}/{wav}"))
    audio = new_records(start)
    for record in downloaded + loaded + audio:
        print("  " + record.describe())
    if {r.kind for r in downloaded + loaded + audio} != {fetching.KIND_HUB}:
        problems.append("case 1 fetched from somewhere else than the Hub")
    if any(r.status == "downloaded" for r in loaded):
        problems.append("loading after download_only downloaded again")
    print(f"  transcript: {text_1!r}")

    savedir = Path(hparams["savedir"])
    guessed = guess_source(repo)[0]
    print(
        f"\n== Case 2: from_hparams({repo!r}) (a plain string, taken as {guessed.name}), savedir={savedir}"
    )
    start = len(fetching.fetch_log)
    SEAM["now"] = "fetching/loading"
    asr_2 = EncoderDecoderASR.from_hparams(source=repo, savedir=str(savedir), run_opts=run_opts)
    SEAM["now"] = "decoding"
    text_2 = asr_2.transcribe_file(f"{repo}/{wav}", savedir=str(savedir))
    for record in new_records(start):
        print("  " + record.describe())
    print(f"  transcript: {text_2!r}")

    if not text_1.strip() or not text_2.strip():
        problems.append("an empty transcript")
    if text_1 != text_2:
        problems.append("the two cases transcribe the example differently")
    reference = reference_text(repo, wav, manifest)
    if reference is not None:
        edits, words = word_errors(reference.upper(), text_1.upper())
        print(f"\n  reference : {reference!r}\n  word errors: {edits}/{words}")

    print("\n== Outcome checks (sbtemplate.outcome_checks)")
    try:
        for line in outcome_checks(hparams, asr, repo, wav, manifest):
            print(f"  ok: {line}")
    except oc.OutcomeError as error:
        problems.append(str(error))
    return problems


def outcome_checks(hparams, asr, repo, wav, manifest):
    """What case 1 loaded and how it transcribes, against independent
    computations: the modules against the fetched files and the published
    digests, the example audio against soundfile, the LM's part in decoding,
    and the test set's WER, counted here, against the WER the build recorded.
    One line per check passed; a failed one raises ``OutcomeError``."""
    import torch
    from speechbrain.utils.fetching import FetchFrom, FetchSource, fetch

    digests = {name: entry["sha256"] for name, entry in manifest.items()}
    lines = oc.check_pretrainer_loaded(asr.hparams.pretrainer, digests, fetching.fetch_log)
    example = str(fetch(wav, FetchSource(FetchFrom.HUGGING_FACE, repo)))
    lines.append(oc.check_audio({wav: {"wav": example}}))
    search = asr.mods.decoder
    temperature = getattr(asr.hparams, "temperature_lm", None)
    lm = asr.mods.lm_model
    lines.append(oc.check_lm_scores(search, lm, asr.hparams.bos_index, asr.device, temperature))
    wavs = asr.load_audio(example).unsqueeze(0).to(asr.device)
    eos = asr.hparams.eos_index
    lines.append(oc.check_weights_matter(search, asr.encode_batch, wavs, torch.ones(1), eos))
    recorded = hparams["recorded_wer"]
    if recorded is None:
        lines.append("test set not decoded: no WER recorded for this repo by a build here")
        return lines
    hypotheses, summary = transcribe_test_set(asr, hparams)
    references = oc.references_of(hparams["test_annotation"])
    lines.append(oc.check_wer(summary, hypotheses, references, "test set"))
    bound = oc.wer_bound(recorded, hparams["wer_tolerance"])
    lines.append(
        oc.check_quality(
            summary["WER"],
            bound,
            f"test set through from_hparams (recorded {recorded:.2f}%)",
            "decoding",
            "speechbrain.inference.ASR (EncoderDecoderASR) / speechbrain.decoders",
        )
    )
    return lines


def transcribe_test_set(asr, hparams):
    """``({id: hypothesis}, ErrorRateStats summary)`` of the test set decoded
    with ``transcribe_batch``, in batches of ``test_batch_size`` by id."""
    from speechbrain.dataio.batch import PaddedBatch
    from speechbrain.dataio.dataio import read_audio
    from speechbrain.utils.metric_stats import ErrorRateStats

    entries = json.loads(Path(hparams["test_annotation"]).read_text())
    ids, size = sorted(entries), int(hparams["test_batch_size"])
    stats, hypotheses = ErrorRateStats(), {}
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        paths = [entries[i]["wav"].replace("{data_root}", str(hparams["data_root"])) for i in chunk]
        wavs, wav_lens = PaddedBatch([{"sig": read_audio(p)} for p in paths]).sig
        texts, _ = asr.transcribe_batch(wavs, wav_lens)
        hypotheses.update(zip(chunk, texts))
        stats.append(
            chunk, [t.split() for t in texts], [entries[i]["words"].split() for i in chunk]
        )
    return hypotheses, stats.summarize()


def main(argv=None):
    """Serve (loopback) or point at the public Hub and run the checks.

    Exit status 0 when all is well, 1 when a check fails, 2 when the profile is not
    built or fetching fails.
    """
    hparams_file, run_opts, overrides = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        # Loading starts the loopback servers (fetch_endpoints: loopback).
        hparams = load_hparams(hparams_file, overrides)
        verbose = bool(hparams["verbose"])
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
        # SpeechBrain's loggers follow SB_LOG_LEVEL.
        os.environ["SB_LOG_LEVEL"] = (
            "INFO" if verbose else os.environ.get("SB_LOG_LEVEL", "WARNING")
        )
        for name in ("speechbrain", "httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
        if hparams["endpoints"]["mode"] == "loopback":
            print(
                f"Serving {hparams['local_repo']} as {hparams['repo_id']} at {hparams['hub_endpoint']}"
            )
        fetching.setup(
            hub_endpoint=hparams["hub_endpoint"],
            cache_dir=Path(hparams["cache_dir"]),
            allow_network=not hparams["offline"],
        )
        problems = run_checks(hparams, run_opts["device"])
    except (ConfigError, FileNotFoundError) as error:
        print(f"CANNOT RUN: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except fetching.FetchError as error:
        print(f"\nFETCH FAILED: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except Exception as error:  # noqa: BLE001 - named with its seam, traceback first
        traceback.print_exc()
        print(f"\nFAILED: [{SEAM['now']}] {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        fetching.stop_serving()
    if problems:
        print("\nFAILED: " + "; ".join(problems), file=sys.stderr)
        return EXIT_FAILED
    print("\nOK: fetched from the Hub, loaded with run options, transcribed twice alike.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
