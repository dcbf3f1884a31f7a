#!/usr/bin/env python3
"""Mini decoupled SLU recipe fed by mixed sources: the template's regression run.

speech -> ASR transcript -> semantics. The recognizer comes from the Hub with
its LM and tokenizer replaced by URL sources and its normalizer by a local
file (see multisource_mini_recipe.yaml); a small attentional decoder learns the
target domain's semantics from reference transcripts (train/valid) and is
tested on the recognizer's batched, padding-invariant transcripts.

    python multisource_mini_recipe.py multisource_mini_recipe.yaml            # full profile
    python multisource_mini_recipe.py multisource_mini_recipe.yaml --debug \
        --build_profile='!include:sbtemplate/hparams/profiles/tiny.yaml'

``--debug`` (SpeechBrain's) runs two batches of two epochs and two test
batches: the regression run. The test stage writes the transcripts' WER, the
semantics alignments and a JSON summary (semantic exact-match accuracy,
losses, transcripts, fetched sources) to the files the YAML names. A fetch
failure (or a profile that is not built) prints one clear message and exits
with status 2.

Based on SpeechBrain's recipes/timers-and-such/decoupled/train.py
(Loren Lugosch, Mirco Ravanelli 2020) and its multisource mini recipe
(Andreas Nautsch 2023).
"""

import json
import logging
import sys
import time
import traceback
from pathlib import Path

# isort: off
import sbtemplate  # noqa: F401 - first: sets the thread wait policy before torch starts
# isort: on

import speechbrain as sb
import torch
from speechbrain.utils.distributed import run_on_main

from sbtemplate import fetching, regression, run_lock
from sbtemplate import outcome_checks as oc
from sbtemplate.audio_check import AudioFormatError, check_audio_format
from sbtemplate.config_checks import ConfigError
from sbtemplate.padding_invariant import make_padding_invariant
from sbtemplate.run_setup import EXIT_FAILED, EXIT_INPUT_ERROR, load_hparams, parse_arguments
from sbtemplate.slu import (
    fetched_sources,
    pad_token_ids,
    prepare_slu_data,
    semantic_tokens,
)

logger = logging.getLogger(__name__)
#: The seam of what the recipe is doing, named when something fails unexpectedly.
SEAM = {"now": "fetching/loading"}


class SLU(sb.Brain):
    """Semantics decoder over ASR tokens; the recognizer is ``self.asr``."""

    def compute_forward(self, batch, stage):
        """ASR tokens -> encoder -> attentional decoder (teacher forcing), and
        beam search outside training."""
        batch = batch.to(self.device)
        transcripts = None
        if stage == sb.Stage.TEST:
            # The recognizer's batched transcripts (padding-invariant path).
            wavs, wav_lens = batch.sig
            with torch.no_grad():
                transcripts, _ = self.asr.transcribe_batch(wavs, wav_lens)
            token_lists = [self.asr.tokenizer.encode_as_ids(t) for t in transcripts]
        else:
            token_lists = batch.asr_tokens
            if stage == sb.Stage.TRAIN:
                token_lists = self.corrupt(token_lists)
        tokens, rel_lens, abs_lens = pad_token_ids(token_lists)
        tokens, rel_lens = tokens.to(self.device), rel_lens.to(self.device)

        encoded = self.modules.slu_enc(self.modules.input_emb(tokens))
        bos_tokens, _ = batch.semantics_bos
        hidden, _ = self.modules.dec(self.modules.output_emb(bos_tokens), encoded, rel_lens)
        p_seq = self.hparams.log_softmax(self.modules.seq_lin(hidden))

        hyps = None
        if stage != sb.Stage.TRAIN:
            hyps, _, _, _ = self.hparams.beam_searcher(
                encoded, rel_lens, enc_lens=abs_lens.to(self.device)
            )
        return p_seq, hyps, transcripts

    def corrupt(self, token_lists):
        """Drop or replace input tokens at random (the test input is ASR output)."""
        drop, replace = self.hparams.token_dropout, self.hparams.token_replace
        if not (drop or replace):
            return token_lists
        vocab = self.asr.tokenizer.get_piece_size()
        corrupted = []
        for seq in token_lists:
            draws = torch.rand(len(seq)).tolist()
            substitutes = torch.randint(3, vocab, (len(seq),)).tolist()  # 0-2: unk/bos/eos
            out = []
            for token, u, sub in zip(seq, draws, substitutes):
                if u < drop:
                    continue
                out.append(sub if u < drop + replace else token)
            corrupted.append(out or list(seq))
        return corrupted

    def compute_objectives(self, predictions, batch, stage):
        """NLL of the semantics tokens; decoded semantics scored outside training."""
        p_seq, hyps, transcripts = predictions
        eos_tokens, eos_lens = batch.semantics_eos
        loss = self.hparams.seq_cost(p_seq, eos_tokens, length=eos_lens)
        if stage != sb.Stage.TRAIN:
            predicted = [self.decode_semantics(h) for h in hyps]
            targets = [semantic_tokens(s) for s in batch.semantics]
            self.semantics_metric.append(batch.id, predicted, targets)
            if stage == sb.Stage.TEST:
                references = [w.split() for w in batch.words]
                self.transcripts_metric.append(
                    batch.id, [t.split() for t in transcripts], references
                )
                for uid, text, pred in zip(batch.id, transcripts, predicted):
                    self.test_outputs[uid] = {"transcript": text, "semantics": " ".join(pred)}
        return loss

    def decode_semantics(self, hyp):
        """Semantic labels of one beam-search hypothesis, BOS/EOS removed."""
        # output_neurons only bounds the vocabulary: a barely trained decoder can
        # emit a unit no label owns, which reads as <unk> (a wrong answer).
        unk = getattr(self.label_encoder, "unk_label", "<unk>")
        labels = [self.label_encoder.ind2lab.get(int(i), unk) for i in hyp]
        special = {self.label_encoder.bos_label, self.label_encoder.eos_label}
        return [label for label in labels if label not in special]

    def on_stage_start(self, stage, epoch):
        """Fresh semantics metric outside training; at TEST also the transcript WER metric."""
        if stage != sb.Stage.TRAIN:
            self.semantics_metric = self.hparams.semantics_computer()
        if stage == sb.Stage.TEST:
            self.transcripts_metric = self.hparams.transcripts_computer()
            self.test_outputs = {}

    def on_stage_end(self, stage, stage_loss, epoch):
        """Log the stage's loss and semantic error rate (SER = 100 - exact-match accuracy).

        VALID anneals the learning rate on the loss, appends to ``self.history`` and
        keeps the checkpoint with the lowest SER; TEST also scores the recognizer's
        transcripts (WER) and writes both reports.
        """
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["SER"] = self.semantics_metric.summarize("SER")
        stats["semantic_accuracy"] = 100.0 - stats["SER"]
        if stage == sb.Stage.VALID:
            old_lr, new_lr = self.hparams.lr_annealing(stage_loss)
            sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": old_lr},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            self.history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(self.train_stats["loss"]),
                    "valid_loss": float(stage_loss),
                    "valid_semantic_accuracy": stats["semantic_accuracy"],
                }
            )
            self.checkpointer.save_and_keep_only(meta={"SER": stats["SER"]}, min_keys=["SER"])
        else:
            stats["WER"] = self.transcripts_metric.summarize("error_rate")
            self.test_stats = stats
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats=stats,
            )
            with open(self.hparams.transcripts_wer_file, "w") as out:
                self.transcripts_metric.write_stats(out)
            with open(self.hparams.semantics_file, "w") as out:
                out.write(f"Semantic exact-match accuracy: {stats['semantic_accuracy']:.2f}%\n")
                self.semantics_metric.write_stats(out)


def dataio_prepare(hparams, asr_tokenizer):
    """Datasets (train/valid: reference transcripts; test: speech) and the
    semantics label encoder."""
    data_folder = Path(hparams["data_folder"])
    replacements = {"data_root": hparams["data_root"]}
    datasets = {
        split: sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=data_folder / f"{split}.json", replacements=replacements
        )
        for split in ("train", "valid", "test")
    }
    # Test in order of duration: batches of similar lengths, a fixed order.
    datasets["test"] = datasets["test"].filtered_sorted(sort_key="length")
    label_encoder = sb.dataio.encoder.TextEncoder()

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    sb.dataio.dataset.add_dynamic_item([datasets["test"]], audio_pipeline)

    @sb.utils.data_pipeline.takes("words")
    @sb.utils.data_pipeline.provides("asr_tokens")
    def transcript_pipeline(words):
        return asr_tokenizer.encode_as_ids(words)

    sb.dataio.dataset.add_dynamic_item([datasets["train"], datasets["valid"]], transcript_pipeline)

    @sb.utils.data_pipeline.takes("semantics")
    @sb.utils.data_pipeline.provides("semantics_list", "semantics_bos", "semantics_eos")
    def semantics_pipeline(semantics):
        tokens = semantic_tokens(semantics)
        yield tokens
        encoded = label_encoder.encode_sequence_torch(tokens)
        yield label_encoder.prepend_bos_index(encoded).long()
        yield label_encoder.append_eos_index(encoded).long()

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), semantics_pipeline)

    sb.dataio.dataset.set_output_keys([datasets["train"]], ["id", "semantics_list"])
    label_encoder.load_or_create(
        path=hparams["label_encoder_file"],
        from_didatasets=[datasets["train"]],
        output_key="semantics_list",
        special_labels={
            "bos_label": hparams["bos_index"],
            "eos_label": hparams["eos_index"],
            "unk_label": "<unk>",
        },
        sequence_input=True,
    )
    if (label_encoder.get_bos_index(), label_encoder.get_eos_index()) != (
        hparams["bos_index"],
        hparams["eos_index"],
    ):
        raise ValueError("bos_index/eos_index of the YAML disagree with the label encoder")
    if len(label_encoder) > hparams["output_neurons"]:
        raise ValueError(
            f"output_neurons ({hparams['output_neurons']}) is smaller than the semantics "
            f"vocabulary ({len(label_encoder)} labels)"
        )

    text_keys = ["id", "words", "semantics", "semantics_bos", "semantics_eos"]
    sb.dataio.dataset.set_output_keys(
        [datasets["train"], datasets["valid"]], text_keys + ["asr_tokens"]
    )
    sb.dataio.dataset.set_output_keys([datasets["test"]], text_keys + ["sig"])
    return datasets, label_encoder


def main(argv=None):
    """Train the SLU decoder on reference transcripts, test it on the recognizer's output.

    The recognizer comes from the Hub, LM and tokenizer from URLs. Writes the
    results JSON; exit status 0, or 2 when the run cannot start or a fetch fails.
    """
    started = time.monotonic()
    # Denormal floats make small recurrent models many times slower on CPUs.
    torch.set_flush_denormal(True)
    # 1. Arguments and hyperparameters, loaded once. In loopback mode,
    # loading starts the Hub and URL servers the sources point at.
    hparams_file, run_opts, overrides = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        hparams = load_hparams(hparams_file, overrides)
        if hparams["num_threads"]:
            torch.set_num_threads(hparams["num_threads"])
        where = fetching.use_endpoints(hparams, cache_dir=hparams["fetch_cache"])
        run_lock.hold_output_folder(hparams["output_folder"])
        sb.create_experiment_directory(
            experiment_directory=hparams["output_folder"],
            hyperparams_to_save=hparams_file,
            overrides=overrides,
        )
        logger.info("Fetching from %s", where)

        # 2. Data preparation (semantics serialised as the decoder's target).
        run_on_main(
            prepare_slu_data,
            kwargs={
                "manifests_folder": hparams["manifests_folder"],
                "save_folder": hparams["data_folder"],
            },
        )

        # 3. Fetch: the recognizer from the Hub, LM and tokenizer from
        # URLs, normalizer from a local folder.
        del fetching.fetch_log[:]
        asr = hparams["asr_model"](
            run_opts={"device": run_opts.get("device", hparams["asr_device"])}
        )
        fetched = fetched_sources(fetching.fetch_log)
        digests = oc.published_digests(hparams["local_repo"])
        loaded = oc.check_pretrainer_loaded(asr.hparams.pretrainer, digests, fetching.fetch_log)
        if hparams["asr_padding_invariant"]:
            make_padding_invariant(asr)
    except fetching.FetchError as error:
        print(f"\nFETCH FAILED: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    # a bad setting, a profile not built (yet), or a busy output folder
    except (ConfigError, FileNotFoundError, run_lock.OutputFolderInUse) as error:
        print(f"\nCANNOT RUN: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except oc.OutcomeError as error:
        print(f"\nOUTCOME CHECK FAILED: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        fetching.stop_serving()
    print("Loaded = fetched files: " + "; ".join(loaded))
    if asr.tokenizer.get_piece_size() > hparams["num_asr_tokens"]:
        raise ValueError(
            f"num_asr_tokens ({hparams['num_asr_tokens']}) is smaller than the recognizer's "
            f"vocabulary ({asr.tokenizer.get_piece_size()})"
        )
    SEAM["now"] = "audio/data"
    datasets, label_encoder = dataio_prepare(hparams, asr.tokenizer)
    # Every test file decodable, at the recognizer's sample rate and mono,
    # before any training.
    try:
        check_audio_format(
            datasets["test"].data,
            Path(hparams["data_folder"]) / "test.json",
            asr.audio_normalizer.sample_rate,
        )
    except AudioFormatError as error:
        print(f"\nCANNOT RUN: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR

    # 4. The Brain.
    slu_brain = SLU(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    slu_brain.asr = asr
    slu_brain.label_encoder = label_encoder
    slu_brain.history = []

    # 5. Training on reference transcripts.
    SEAM["now"] = "fine-tuning step"
    slu_brain.fit(
        slu_brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )

    # 6. Test on the recognizer's transcripts of the target-domain speech.
    SEAM["now"] = "decoding"
    test_loss = slu_brain.evaluate(
        datasets["test"], min_key="SER", test_loader_kwargs=hparams["test_dataloader_opts"]
    )
    stats = slu_brain.test_stats
    details = slu_brain.transcripts_metric.summarize()
    outputs = slu_brain.test_outputs
    results = {
        "profile": hparams["profile"],
        "debug": bool(run_opts.get("debug")),
        "seed": hparams["seed"],
        "epochs": len(slu_brain.history),
        "semantic_accuracy": stats["semantic_accuracy"],
        "transcripts_WER": stats["WER"],
        "losses": slu_brain.history + [{"stage": "test", "test_loss": float(test_loss)}],
        "test_utterances": list(outputs),
        "transcripts": {uid: o["transcript"] for uid, o in outputs.items()},
        "semantics": {uid: o["semantics"] for uid, o in outputs.items()},
        "wer": {
            k: details[k]
            for k in (
                "WER",
                "SER",
                "num_edits",
                "num_scored_tokens",
                "insertions",
                "deletions",
                "substitutions",
            )
        },
        "fetched": fetched,
        "seconds": round(time.monotonic() - started, 1),
    }
    if sb.utils.distributed.if_main_process():
        Path(hparams["results_file"]).write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"Semantic exact-match accuracy {stats['semantic_accuracy']:.2f}% and transcript WER "
        f"{stats['WER']:.2f}% on {len(outputs)} target-domain test utterances "
        f"(results: {hparams['results_file']})"
    )
    # 7. What the run produced: the transcripts' WER recounted here, and in
    #    --debug the comparison with the stored expectation.
    try:
        references = oc.references_of(Path(hparams["data_folder"]) / "test.json", set(outputs))
        print(
            "Outcome check: "
            + oc.check_wer(details, results["transcripts"], references, "transcripts")
        )
    except oc.OutcomeError as error:
        print(f"\nOUTCOME CHECK FAILED: {error}", file=sys.stderr)
        return EXIT_FAILED
    if results["debug"]:
        return regression_check(hparams, results)
    return 0


def regression_check(hparams, results):
    """Compare a ``--debug`` run with the profile's stored expectation
    (sbtemplate.regression); exit status 1 when something moved beyond its
    tolerance, each problem on its own line. ``update_expected`` stores the
    run's results as the expectation instead."""
    digests = regression.file_digests(Path(hparams["local_repo"]) / "manifest.json")
    expected_file = Path(hparams["expected_results"])
    if hparams["update_expected"]:
        expected_file.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(regression.expectation(results, digests), indent=1, sort_keys=True)
        expected_file.write_text(text + "\n")
        print(f"Regression check: stored this run as the expectation ({expected_file})")
        return 0
    if not expected_file.is_file():
        print(
            f"Regression check: no stored expectation for this profile ({expected_file}); not compared"
        )
        return 0
    expected = json.loads(expected_file.read_text())
    note = regression.information(digests, expected)
    if note:
        print(f"Regression check: {note} (not a failure)")
    problems = regression.check(results, digests, expected)
    if problems:
        print(
            f"\nREGRESSION: the --debug run moved beyond the tolerances of {expected_file.name}"
            " (sbtemplate.regression): " + "; ".join(problems),
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"Regression check: passed against {expected_file.name}")
    return 0


def run_main():
    """``main()``; an unexpected error ends the run with its traceback, then one
    line naming the seam of what the recipe was doing."""
    try:
        return main()
    except Exception as error:  # noqa: BLE001 - named with its seam, traceback first
        traceback.print_exc()
        print(f"\nFAILED: [{SEAM['now']}] {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(run_main())
