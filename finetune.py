#!/usr/bin/env python3
"""Fine-tune only the LM of a fetched recognizer, under DDP, with dynamic batching.

The recognizer (CRDNN encoder, attention decoder, CTC, normaliser, RNNLM,
tokenizer) is fetched from three kinds of source (see finetune.yaml). Its RNNLM
is fine-tuned on target-domain text (next-token NLL), every ASR module frozen;
then the recognizer is evaluated on target-domain speech with the base and the
fine-tuned LM in its beam search, through the Brain's evaluate() and through
the pretrained interface, each DDP-valid.

    torchrun --nproc_per_node=2 finetune.py finetune.yaml            # 2 ranks
    python finetune.py finetune.yaml \
        --build_profile='!include:sbtemplate/hparams/profiles/tiny.yaml'  # 1 process, tiny
    torchrun --nproc_per_node=2 finetune.py finetune_rnnlm_librispeech.yaml  # the real RNNLM

On CPUs the backend is gloo, on GPUs NCCL (``--distributed_backend`` and
``--device`` override). Multi-node and SLURM launches: docs/launching.md.
Authors: the sbtemplate contributors, after SpeechBrain's templates.
"""

import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

# Configures the Hub endpoint before anything imports huggingface_hub.
from sbtemplate import fetching  # isort: skip

import speechbrain as sb
import torch
from speechbrain.dataio.dataio import length_to_mask, read_audio
from speechbrain.utils.metric_stats import ErrorRateStats

from sbtemplate import finetune_eval as fe
from sbtemplate import outcome_checks as oc
from sbtemplate import run_lock, run_setup
from sbtemplate.audio_check import check_audio_format
from sbtemplate.base_recognizer import lm_text_dataset, read_text_split
from sbtemplate.ddp_dynamic_batching import (
    DistributedDynamicBatchSampler,
    eval_batch_sampler,
    train_batch_sampler,
)
from sbtemplate.distributed import DDPEvalMixin, check_ledger, exchange, rank_and_world_size
from sbtemplate.distributed.watchdog import start_watchdog
from sbtemplate.frozen import freeze, state_digest, state_digests, trainable_parameters
from sbtemplate.padding_invariant import make_padding_invariant

logger = logging.getLogger(__name__)
# What the run is doing, for the message when the ranks lose each other, and
# the hang watchdog of this process (stopped before the process group ends).
STAGE = {"now": "set-up"}
WATCHDOG = []
#: The seam an unexpected error points at, by the stage it happened in (none
#: in set-up: loading the YAML, preparing data).
SEAM_OF_STAGE = {
    "fetching the recognizer": "fetching/loading",
    "evaluation with the base LM": "decoding",
    "fine-tuning": "fine-tuning step",
    "evaluation with the fine-tuned LM": "decoding",
    "the final checks": "scoring",
}


# --------------------------------------------------------------------------
# Data


def speech_test_set(hparams):
    """The speech test set: the manifest read with SpeechBrain's ``{data_root}``
    replacement, its first ``test_limit`` ids, ``sig`` read with read_audio;
    its entries ``{id: entry}``, and the audio check's line. Unusable audio (missing, undecodable,
    another rate or channel count) is refused here, and what SpeechBrain
    reads must be the samples soundfile reads."""
    test = sb.dataio.dataset.DynamicItemDataset.from_json(
        hparams["test_annotation"], replacements={"data_root": hparams["data_root"]}
    )
    test = test.filtered_sorted(sort_key="id", select_n=hparams["test_limit"])

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return read_audio(wav)

    sb.dataio.dataset.add_dynamic_item([test], audio_pipeline)
    sb.dataio.dataset.set_output_keys([test], ["id", "sig", "words"])
    entries = {utt_id: test.data[utt_id] for utt_id in test.data_ids}
    check_audio_format(entries, hparams["test_annotation"], hparams["sample_rate"])
    return test, entries, oc.check_audio(entries)


def text_sets(hparams, tokenizer):
    """The text sets: target-domain train and valid, general valid. One item
    per sentence, ``tokens_bos``/``tokens_eos`` through the recognizer's
    tokenizer, ``length`` in tokens (what dynamic batching packs)."""
    return {
        name: lm_text_dataset(
            read_text_split(hparams[key]), tokenizer, hparams["bos_index"], hparams["eos_index"]
        )
        for name, key in (
            ("train", "lm_train_annotation"),
            ("valid", "lm_valid_annotation"),
            ("general", "general_lm_valid"),
        )
    }


# --------------------------------------------------------------------------
# The Brain


class LMFineTuneBrain(DDPEvalMixin, sb.Brain):
    """Fine-tunes ``modules.lm`` (next-token NLL) with every ASR module frozen.

    What evaluate() computes follows the data it is given: on a text set the
    LM's corpus perplexity (summed NLL / summed tokens over all ranks), on a
    speech set (items with ``sig``) the recognizer's WER, decoding with
    ``hparams.test_encoder`` and ``hparams.test_search``, whose RNNLM scorer
    holds the LM being trained. VALID/TEST are DDP-valid through
    :class:`~sbtemplate.distributed.DDPEvalMixin`.
    """

    def __init__(self, *args, tokenizer=None, train_text=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer
        self.train_text = train_text  # the training sentences: ids to see, probe batches
        self.outcomes = []  # one line per outcome check passed (sbtemplate.outcome_checks)
        self.batches_ran, self.largest_batch = 0, (0, 0)
        self._probing = False
        self._previous_valid_loss = None  # this process's last, for the annealing check
        self.resumed = None  # the line of the checkpoint this run resumed from
        self._resumed_epoch = None
        self.epoch_records = []
        self._decoding = False
        self._report_to = (None, "test")
        self._result = None
        # One timeout for every collective, the evaluation's sync points included.
        self.ddp_eval_timeout_s = float(self.hparams.collective_timeout_s)
        _ = self.ddp_eval_group  # created now, on every rank, in the same order

    # -- what the script calls -------------------------------------------
    @property
    def lm(self):
        """The LM module itself (not its DDP wrapper)."""
        module = self.modules["lm"]
        return getattr(module, "module", module)

    def frozen_digests(self):
        """Digests of every module but the LM (they must not change)."""
        return state_digests({k: m for k, m in self.modules.items() if k != "lm"})

    def lm_state(self):
        """A CPU copy of the LM's state dict."""
        return {k: v.detach().cpu().clone() for k, v in self.lm.state_dict().items()}

    def lm_perplexity(self, dataset, loader_kwargs):
        """Corpus perplexity of the current LM on a text set (DDP-valid): the stats."""
        self.evaluate(dataset, progressbar=False, test_loader_kwargs=dict(loader_kwargs))
        return self._result

    def decode_test_set(self, dataset, loader_kwargs, out_dir, name):
        """WER of the recognizer with the current LM (DDP-valid): the EvalReport."""
        self._report_to = (out_dir, name)
        self.evaluate(dataset, progressbar=False, test_loader_kwargs=dict(loader_kwargs))
        return self._result

    # -- Brain interface -------------------------------------------------
    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """Notes whether this stage decodes speech (its items have ``sig``)."""
        if stage == sb.Stage.TEST:
            self._decoding = "sig" in dataset.pipeline.output_mapping
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def _train_loader_specifics(self, dataset, loader_kwargs):
        sampler = loader_kwargs.get("batch_sampler")
        if isinstance(sampler, DistributedDynamicBatchSampler):
            # Already rank-aware: no DistributedSamplerWrapper (it would repeat batches).
            self.train_sampler = sampler
            return loader_kwargs
        return super()._train_loader_specifics(dataset, loader_kwargs)

    def init_optimizers(self):
        """One optimizer over the trainable (LM) parameters only."""
        if self.opt_class is None:
            return
        self.optimizer = self.opt_class(trainable_parameters(self.modules))
        self.optimizers_dict = {"opt_class": self.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """No checkpoint loading here: the script decides which LM is evaluated."""

    def _asr_stage(self, stage):
        return stage == sb.Stage.TEST and self._decoding

    def compute_forward(self, batch, stage):
        """Hypotheses of a speech batch, or the LM's log-probabilities of a text batch."""
        batch = batch.to(self.device)
        if self._asr_stage(stage):
            wavs, wav_lens = batch.sig
            encoded = self.hparams.test_encoder(wavs, wav_lens)
            hyps, _, _, _ = self.hparams.test_search(encoded, wav_lens)
            return hyps
        tokens_bos, _ = batch.tokens_bos
        out = self.modules.lm(tokens_bos)
        logits = out[0] if isinstance(out, tuple) else out  # return_hidden=True
        return self.hparams.log_softmax(logits)

    def compute_objectives(self, predictions, batch, stage):
        """Next-token NLL (summed for the corpus perplexity), or WER statistics."""
        if self._asr_stage(stage):
            words = [self.tokenizer.decode_ids(h) for h in predictions]
            self.wer_metric.append(
                batch.id, [w.split() for w in words], [w.split() for w in batch.words]
            )
            return torch.zeros(())
        tokens_eos, rel_lens = batch.tokens_eos
        steps = tokens_eos.shape[1]
        mask = length_to_mask(torch.round(rel_lens * steps), steps).to(predictions.dtype)
        nll = -predictions.gather(2, tokens_eos.unsqueeze(2)).squeeze(2)
        total = (nll * mask).sum()
        count = mask.sum()
        self.nll_sum += float(total.detach())
        self.token_count += int(count.item())
        self.seen_ids.extend(batch.id)
        self.batches_ran += 1
        rows, cols = tokens_eos.shape
        padded, examples = self.largest_batch
        self.largest_batch = (max(padded, rows * cols), max(examples, rows))
        return total / count

    def on_stage_start(self, stage, epoch=None):
        """Reset the stage's NLL sum, token count and id ledger; a WER metric if decoding."""
        self.nll_sum, self.token_count, self.seen_ids = 0.0, 0, []
        self.batches_ran, self.largest_batch = 0, (0, 0)
        self._result = None
        if self._asr_stage(stage):
            self.wer_metric = ErrorRateStats()

    def on_fit_start(self):
        """SpeechBrain's (DDP wrapping, optimizer, resuming), then an outcome check:
        a resumed run starts from the newest checkpoint; a fresh one takes two
        optimizer steps that must equal Adam's computed from fresh gradients."""
        super().on_fit_start()
        resumed = oc.check_resumed_from_newest(
            self.checkpointer.checkpoints_dir, self.lm, self.hparams.epoch_counter
        )
        if resumed is not None:
            line, end_of_epoch = resumed
            self.resumed = line
            if not end_of_epoch:  # this epoch goes on from where it stopped
                self._resumed_epoch = int(self.hparams.epoch_counter.current) + 1
            self.outcomes.append(line)
            return
        # Three steps of 4 sentences: the configured clipping twice (so that
        # stale gradients show), then a norm far below any gradient's.
        size, norms = 4, (self.max_grad_norm, self.max_grad_norm, 1e-4)
        items = [self.train_text[i] for i in range(len(norms) * size)]
        batches = [items[k * size : (k + 1) * size] for k in range(len(norms))]
        self._probing, step = True, self.optimizer_step
        try:
            line = oc.check_optimizer_steps(
                self.fit_batch, self.lm, self.optimizer, batches, norms, clipping=self
            )
        finally:
            self._probing, self.optimizer_step = False, step
        self.outcomes.append(line)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """``stop_after_steps``: save an intra-epoch checkpoint and stop, as a preempted job."""
        stop = getattr(self.hparams, "stop_after_steps", None)
        if stop and not self._probing and should_step and self.optimizer_step == int(stop):
            self._save_intra_epoch_ckpt()
            raise run_setup.TrainingInterrupted(
                f"stopped after {self.optimizer_step} optimizer steps (stop_after_steps);"
                " run again to resume from the intra-epoch checkpoint"
            )

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Gather the stage over all ranks (WER report or perplexity) and end the epoch.

        TRAIN checks that every rank holds the same LM weights; VALID anneals the
        learning rate and keeps the checkpoint with the lowest valid perplexity.
        """
        if self._asr_stage(stage):
            out_dir, name = self._report_to
            self._result = self.gather_eval_stats(
                stage, self.wer_metric, out_dir=out_dir, name=name
            )
            return
        if stage == sb.Stage.TRAIN:
            self._end_train_epoch(epoch)
            return
        self._result = self.gather_lm_stats(stage.name)
        if stage == sb.Stage.VALID:
            self._end_valid_epoch(epoch, self._result)

    # -- internals -------------------------------------------------------
    def _exchange(self, payload, what):
        state = self._ddp_eval_state  # set by DDPEvalMixin during VALID/TEST
        if state is not None:
            state["exchanged"] = True  # this is the stage's one sync point
        return exchange(payload, group=self.ddp_eval_group, what=what)

    def gather_lm_stats(self, stage_name):
        """Corpus perplexity over all ranks (summed NLL / summed tokens) and the ledger."""
        rank, world = rank_and_world_size()
        promised = len(self.train_sampler) if stage_name == "TRAIN" and self.train_sampler else None
        gathered = self._exchange(
            {
                "nll": self.nll_sum,
                "tokens": self.token_count,
                "ids": list(self.seen_ids),
                "batches": self.batches_ran,
                "largest": list(self.largest_batch),
                "promised": promised,
            },
            what=f"{stage_name} perplexity",
        )
        expected = None
        if stage_name != "TRAIN" and not self.debug:
            expected = self._ddp_eval_expected_ids().get(stage_name)
        if stage_name != "TRAIN":
            check_ledger([i for g in gathered for i in g["ids"]], expected)
        nll = sum(g["nll"] for g in gathered)
        tokens = sum(g["tokens"] for g in gathered)
        loss = nll / tokens if tokens else float("nan")
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "tokens": tokens,
            "sentences": sum(len(g["ids"]) for g in gathered),
            "per_rank": [
                {
                    "rank": r,
                    "sentences": len(g["ids"]),
                    "tokens": g["tokens"],
                    "perplexity": math.exp(min(g["nll"] / g["tokens"], 50.0))
                    if g["tokens"]
                    else None,
                }
                for r, g in enumerate(gathered)
            ],
            "world_size": world,
            "ids_per_rank": [g["ids"] for g in gathered],
            "batches_per_rank": [g["batches"] for g in gathered],
            "largest_per_rank": [g["largest"] for g in gathered],
            "promised_per_rank": [g["promised"] for g in gathered],
        }

    def _end_train_epoch(self, epoch):
        stats = self.gather_lm_stats("TRAIN")
        partial = self._resumed_epoch == epoch
        what = f"training epoch {epoch}" + (" (resumed)" if partial else "")
        line = oc.check_seen_once(
            stats["ids_per_rank"], self.train_text.data_ids, what, partial=partial
        )
        if not partial and self.train_sampler is not None:
            oc.check_batch_counts(stats["batches_per_rank"], stats["promised_per_rank"], what)
        budget = self.hparams.train_dynamic_batching
        line += "; " + oc.check_batch_budget(
            stats["largest_per_rank"], budget["max_batch_length"], budget.get("max_batch_ex"), what
        )
        self.outcomes.append(line)
        rank, world = rank_and_world_size()
        # Before VALID broadcasts rank 0's state: these must agree on their own.
        digests = self._exchange(state_digest(self.lm), what="LM weight check")
        sampler = self.train_sampler
        batching = [sampler.stats(r) for r in range(world)] if sampler is not None else []
        record = {
            "epoch": epoch,
            "train_perplexity": stats["perplexity"],
            "train_sentences": stats["sentences"],
            "lm_digest_per_rank": digests,
            "ranks_identical": len(set(digests)) == 1,
            "batching_per_rank": batching,
        }
        self.epoch_records.append(record)
        if rank == 0:
            for r, b in enumerate(batching):
                print(
                    f"[epoch {epoch}] rank {r}: {b['batches']} train batches, "
                    f"{b['items']} sentences, padding {100 * b['padding_fraction']:.1f}%",
                    flush=True,
                )
            print(
                f"[epoch {epoch}] LM weights identical on all {world} ranks: "
                f"{record['ranks_identical']} ({digests[0][:12]})",
                flush=True,
            )
        if not record["ranks_identical"]:
            raise RuntimeError(f"epoch {epoch}: the ranks' LM weights differ: {digests}")
        self.train_stats = {"loss": stats["loss"], "perplexity": stats["perplexity"]}

    def _end_valid_epoch(self, epoch, stats):
        lr_before = self.optimizer.param_groups[0]["lr"]
        old_lr, new_lr = self.hparams.lr_annealing(stats["loss"])
        sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
        line = oc.check_lr_annealing(
            self.optimizer,
            lr_before,
            self._previous_valid_loss,
            stats["loss"],
            self.hparams.lr_annealing,
        )
        self._previous_valid_loss = stats["loss"]
        if line:
            self.outcomes.append(line)
        valid = {"loss": stats["loss"], "perplexity": stats["perplexity"]}
        self.hparams.train_logger.log_stats(
            stats_meta={"epoch": epoch, "lr": old_lr},
            train_stats=getattr(self, "train_stats", None),
            valid_stats=valid,
        )
        if self.epoch_records and self.epoch_records[-1]["epoch"] == epoch:
            self.epoch_records[-1]["valid_perplexity"] = stats["perplexity"]
        self.checkpointer.save_and_keep_only(
            meta={"valid_perplexity": stats["perplexity"], "epoch": epoch},
            min_keys=["valid_perplexity"],
            num_to_keep=1,
        )


# --------------------------------------------------------------------------
# The recipe


def run(hparams_file, run_opts, overrides):
    """Load, fetch, fine-tune and evaluate, as finetune.yaml says; the results.
    Each phase checks its outcome (sbtemplate.outcome_checks): a failed check
    raises ``OutcomeError`` naming the seam and the module at fault."""
    timings, started = {}, time.time()
    # 1. Hyperparameters, loaded once (a misspelt override fails here, on every
    #    rank; loopback servers start); the process group; the Hub client.
    hparams = run_setup.load_hparams(hparams_file, overrides)
    run_setup.init_distributed(run_opts, hparams["collective_timeout_s"])
    start_hang_watchdog(hparams)
    endpoints = fetching.use_endpoints(hparams, cache_dir=hparams["fetch_cache"])

    # 2. Data preparation: unusable test audio is reported now, on every rank,
    #    before any training; then one run per output folder.
    test_set, test_entries, audio_checked = speech_test_set(hparams)
    lock_output_folder(hparams, hparams_file, overrides)
    announce(hparams, run_opts, endpoints)

    # 3. Fetch (rank 0 downloads, the others wait) and load the recognizer;
    #    every module must hold the file fetched for it.
    STAGE["now"] = "fetching the recognizer"
    outcomes = fetch_and_load(hparams)
    text = text_sets(hparams, hparams["tokenizer"])

    # 4. The Brain: the LM trains, the ASR modules are frozen beside it.
    brain, loaders = build_brain(hparams, run_opts, text)
    brain.outcomes = [audio_checked, *outcomes, *brain.outcomes]
    results = new_results(hparams, run_opts, brain)
    timings["setup_s"] = time.time() - started

    # 5. Before fine-tuning: perplexities and WER with the base LM.
    STAGE["now"] = "evaluation with the base LM"
    t = time.time()
    results["perplexity"]["base"] = perplexities(brain, text, loaders)
    check_lm_in_decoding(brain, hparams, test_set)
    base_report = None
    if hparams["evaluate_base"]:
        base_report = brain.decode_test_set(
            test_set, loaders["test"], Path(hparams["eval_folder"]), "test_base_lm"
        )
        results["wer"]["base_lm"] = base_report.wer
    timings["base_eval_s"] = time.time() - t

    # 6. Fine-tune the LM (resumes from the last checkpoint if interrupted),
    #    then recover the best checkpoint by valid perplexity.
    STAGE["now"] = "fine-tuning"
    t = time.time()
    brain.fit(
        hparams["epoch_counter"],
        text["train"],
        text["valid"],
        train_loader_kwargs=loaders["train"],
        valid_loader_kwargs=loaders["valid"],
    )
    timings["fit_s"] = time.time() - t
    tuned_lm = recover_best_lm(brain, hparams)

    # 7. After: perplexities, then the test set through every evaluation path.
    STAGE["now"] = "evaluation with the fine-tuned LM"
    t = time.time()
    results["perplexity"]["finetuned"] = perplexities(brain, text, loaders)
    check_lm_in_decoding(brain, hparams, test_set)
    reports = finetuned_evaluation(
        brain, hparams, run_opts, test_set, test_entries, loaders, tuned_lm
    )
    timings["finetuned_eval_s"] = time.time() - t

    # 8. What the run produced, against independent computations.
    STAGE["now"] = "the final checks"
    failure = final_checks(brain, hparams, results, base_report, reports, tuned_lm)
    results["timings"] = timings
    if rank_and_world_size()[0] == 0:
        fe.write_json(Path(hparams["output_folder"]) / "results.json", results)
        print_summary(results)
    if failure is not None:
        raise failure
    return results


# --------------------------------------------------------------------------
# The phases


def start_hang_watchdog(hparams):
    """This rank's hang watchdog (nothing in one process); main() stops it."""
    rank, world = rank_and_world_size()
    watchdog = start_watchdog(rank, world, label=lambda: STAGE["now"], **hparams["hang_watchdog"])
    WATCHDOG.append(watchdog)


def lock_output_folder(hparams, hparams_file, overrides):
    """One run per output folder: rank 0 locks it, every rank learns the outcome;
    then SpeechBrain's experiment folder (the YAML and overrides saved)."""
    busy = None
    if rank_and_world_size()[0] == 0:
        try:
            run_lock.hold_output_folder(hparams["output_folder"])
        except run_lock.OutputFolderInUse as error:
            busy = str(error)
    busy = exchange(busy, what="output folder lock")[0]
    if busy:
        raise run_lock.OutputFolderInUse(busy)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )


def announce(hparams, run_opts, endpoints):
    """One line on rank 0: what is fine-tuned, where, from which endpoints."""
    rank, world = rank_and_world_size()
    if rank == 0:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "-"
        print(
            f"Fine-tuning the LM of {hparams['repo_id']} ({hparams['profile']} profile) on "
            f"{world} rank(s), backend {backend}, device {run_opts.device}; {endpoints}",
            flush=True,
        )


def fetch_and_load(hparams):
    """Collect and load the Pretrainers; every loadable must hold the file
    fetched for it, and each file the bytes the published manifest lists."""
    fetching.collect_pretrained(hparams)
    digests = oc.published_digests(hparams["local_repo"])
    lines = []
    for pretrainer in (
        hparams["pretrainer_asr"],
        hparams["pretrainer_lm"],
        hparams["pretrainer_tokenizer"],
    ):
        lines += oc.check_pretrainer_loaded(pretrainer, digests, fetching.fetch_log)
    return [f"loaded = fetched files: {'; '.join(lines)}"]


def build_brain(hparams, run_opts, text):
    """The Brain (LM trainable, ASR modules frozen) and the loaders' arguments."""
    modules = {
        "lm": hparams["lm_model"],
        "asr": freeze(hparams["asr_model"]),  # ModuleList(enc, emb, dec, ctc_lin, seq_lin)
        "normalizer": freeze(hparams["normalizer"]),
    }
    brain = LMFineTuneBrain(
        modules=modules,
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
        tokenizer=hparams["tokenizer"],
        train_text=text["train"],
    )
    train_sampler = train_batch_sampler(
        text["train"], hparams["train_dynamic_batching"], hparams["seed"]
    )
    loaders = {
        "train": {"batch_sampler": train_sampler},
        "test": {"batch_size": hparams["test_batch_size"]},
    }
    for name in ("valid", "general"):
        sampler = eval_batch_sampler(text[name], hparams["valid_dynamic_batching"])
        loaders[name] = {"batch_sampler": sampler}
    if rank_and_world_size()[0] == 0:
        for line in train_sampler.describe():
            print(f"[train batching, epoch 0] {line}", flush=True)
    brain.frozen_before = brain.frozen_digests()
    brain.base_lm = brain.lm_state()
    return brain, loaders


def new_results(hparams, run_opts, brain):
    """The results record, filled as the run goes."""
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    return {
        "profile": hparams["profile"],
        "world_size": rank_and_world_size()[1],
        "device": str(run_opts.device),
        "backend": backend,
        "perplexity": {},
        "wer": {},
        "base_lm_digest": state_digest(brain.lm),
    }


def perplexities(brain, text, loaders):
    """The current LM's perplexity on held-out target and general text."""
    return {
        "target_valid": brain.lm_perplexity(text["valid"], loaders["valid"])["perplexity"],
        "general_valid": brain.lm_perplexity(text["general"], loaders["general"])["perplexity"],
    }


def check_lm_in_decoding(brain, hparams, test_set, utterances=4):
    """The LM takes part in decoding: the scorer scores with it, and its weight
    changes the search's scores on a few test utterances."""
    search = hparams["test_search"]
    temperature = hparams["recognizer"].get("temperature_lm")
    brain.outcomes.append(
        oc.check_lm_scores(search, brain.lm, hparams["bos_index"], brain.device, temperature)
    )
    items = [test_set[i] for i in range(min(utterances, len(test_set)))]
    wavs, wav_lens = sb.dataio.batch.PaddedBatch(items).to(brain.device).sig
    brain.outcomes.append(
        oc.check_weights_matter(
            search, hparams["test_encoder"], wavs, wav_lens, hparams["eos_index"]
        )
    )


def recover_best_lm(brain, hparams):
    """Recover the checkpoint with the lowest valid perplexity (checked against
    the CKPT.yaml files), check every rank holds it, export it; its state."""
    brain.checkpointer.recover_if_possible(min_key="valid_perplexity")
    values = [r["valid_perplexity"] for r in brain.epoch_records if "valid_perplexity" in r]
    brain.outcomes.append(
        oc.check_recovered_best(
            hparams["save_folder"], brain.lm, "valid_perplexity", values, brain.resumed is None
        )
    )
    tuned_lm = brain.lm_state()
    digests = exchange(
        state_digest(brain.lm), group=brain.ddp_eval_group, what="fine-tuned LM check"
    )
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks hold different fine-tuned LMs: {digests}")
    brain.finetuned_digest = digests[0]
    if rank_and_world_size()[0] == 0:
        fe.export_finetuned_model(
            hparams["local_repo"], Path(hparams["output_folder"]) / "finetuned_model", tuned_lm
        )
    return tuned_lm


def finetuned_evaluation(brain, hparams, run_opts, test_set, test_entries, loaders, tuned_lm):
    """The test set decoded with the fine-tuned LM: the Brain's evaluate(), then
    the pretrained interface (its loaded modules checked against their files)
    with each audio reader. ``{path name: EvalReport}``."""
    reports = {}
    if not hparams["evaluate_finetuned"]:
        return reports
    eval_dir = Path(hparams["eval_folder"])
    reports["brain"] = brain.decode_test_set(
        test_set, loaders["test"], eval_dir, "test_finetuned_brain"
    )
    if not hparams["interface_readers"]:
        return reports
    asr = fe.load_interface(
        hparams["interface_source"],
        Path(hparams["output_folder"]) / "interface",
        hparams["decoding_overrides"],
        run_opts.device,
    )
    digests = oc.published_digests(hparams["local_repo"])
    lines = oc.check_pretrainer_loaded(asr.hparams.pretrainer, digests, fetching.fetch_log)
    brain.outcomes.append(f"interface loaded = fetched files: {'; '.join(lines)}")
    fe.swap_lm(asr, tuned_lm)
    brain.outcomes.append(
        oc.check_lm_scores(
            asr.mods.decoder,
            asr.mods.lm_model,
            hparams["bos_index"],
            brain.device,
            getattr(asr.hparams, "temperature_lm", None),
        )
    )
    if hparams["padding_invariant"]:  # a repo naming SpeechBrain's own classes
        make_padding_invariant(asr)
    for reader in hparams["interface_readers"]:
        reports[f"interface_{reader}"] = fe.interface_evaluation(
            asr,
            test_entries,
            reader,
            hparams["test_batch_size"],
            brain.ddp_eval_group,
            eval_dir,
            f"test_finetuned_interface_{reader}",
        )
    return reports


def test_references(hparams):
    """``{id: words}`` of the test set read straight from its manifest (the
    first ``test_limit`` ids), what every WER is recounted against."""
    references = oc.references_of(hparams["test_annotation"])
    ids = sorted(references)[: hparams["test_limit"]]
    return {i: references[i] for i in ids}


def final_checks(brain, hparams, results, base_report, reports, tuned_lm):
    """Fill ``results`` with the checks of what the run produced; raise the
    first that failed (after the results are written: see :func:`run`)."""
    rank, _world = rank_and_world_size()
    frozen_after = brain.frozen_digests()
    per_rank = exchange(
        {"rank": rank, "before": brain.frozen_before, "after": frozen_after},
        group=brain.ddp_eval_group,
        what="frozen check",
    )
    results["frozen"] = {
        "unchanged_on_every_rank": all(r["before"] == r["after"] for r in per_rank),
        "ranks_agree": all(r["after"] == per_rank[0]["after"] for r in per_rank),
        "per_rank": per_rank,
    }
    base_lm = brain.base_lm
    results["lm"] = {
        "base_digest": results.pop("base_lm_digest"),
        "finetuned_digest": brain.finetuned_digest,
        "max_abs_change": max(
            float((tuned_lm[k].float() - base_lm[k].float()).abs().max()) for k in base_lm
        ),
    }
    results["lm"]["changed"] = results["lm"]["finetuned_digest"] != results["lm"]["base_digest"]
    results["epochs"] = brain.epoch_records
    if reports:
        identical, differing = fe.compare_hypotheses(reports)
        results["wer"].update({f"finetuned_{name}": r.wer for name, r in reports.items()})
        results["paths"] = {
            "identical_hypotheses": identical,
            "differing_ids": differing,
            "utterances": len(reports["brain"].stats.scores),
            "jiwer_wer": {
                name: fe.jiwer_wer(r.files["utterances"]) if rank == 0 else None
                for name, r in reports.items()
            },
            "files": {name: r.files for name, r in reports.items()},
            "per_rank": {name: r.per_rank for name, r in reports.items()},
        }
    try:
        outcome_checks(brain, hparams, results, base_report, reports)
        failure = None
    except Exception as error:  # noqa: BLE001 - raised by run() once the results are written
        failure = error
    results["outcome_checks"] = {"passed": list(brain.outcomes), "failed": str(failure or "")}
    return failure


def outcome_checks(brain, hparams, results, base_report, reports):
    """The run's results against independent computations (sbtemplate.outcome_checks)."""
    add = brain.outcomes.append
    lines = oc.check_pretrainer_loaded(hparams["pretrainer_asr"])
    add(f"after fine-tuning, ASR modules = fetched files: {'; '.join(lines)}")
    if not results["frozen"]["unchanged_on_every_rank"]:
        raise oc.OutcomeError(
            "fine-tuning step",
            "an ASR module changed during LM fine-tuning",
            "sbtemplate.frozen / speechbrain.core (Brain.fit)",
        )
    epochs = [r["epoch"] for r in brain.epoch_records]
    if brain.resumed is None and epochs != list(range(1, hparams["number_of_epochs"] + 1)):
        raise oc.OutcomeError(
            "fine-tuning step",
            f"the run trained epochs {epochs}, not 1..{hparams['number_of_epochs']}",
            "speechbrain.utils.epoch_loop (EpochCounter) / speechbrain.core (Brain.fit)",
        )
    ppl = results["perplexity"]
    before, after = ppl["base"]["target_valid"], ppl["finetuned"]["target_valid"]
    if not (results["lm"]["changed"] and after < before):
        raise oc.OutcomeError(
            "fine-tuning step",
            f"held-out target text perplexity did not fall ({before:.3f} -> {after:.3f})",
            "speechbrain.core (Brain.fit / fit_batch)",
        )
    add(f"held-out target perplexity fell: {before:.3f} -> {after:.3f}")
    best = [r["valid_perplexity"] for r in brain.epoch_records if "valid_perplexity" in r]
    if brain.resumed is None and best and not math.isclose(after, min(best), rel_tol=1e-5):
        raise oc.OutcomeError(
            "checkpoint/resume",
            f"the recovered LM's valid perplexity is {after:.6g}, the best epoch's was"
            f" {min(best):.6g}",
            "speechbrain.utils.checkpoints (save / recover hooks)",
        )
    references = test_references(hparams)
    named = ([("base LM", base_report)] if base_report else []) + [
        (f"fine-tuned LM, {n}", r) for n, r in reports.items()
    ]
    for what, report in named:
        add(oc.check_wer(report.summary, fe.hypotheses(report), references, what))
    quality_bounds(brain, hparams, results, base_report, reports)
    if reports and not results["paths"]["identical_hypotheses"]:
        raise RuntimeError(f"evaluation paths disagree on {results['paths']['differing_ids'][:10]}")


def quality_bounds(brain, hparams, results, base_report, reports):
    """On the whole test set decoded as published: the base LM decodes as well
    as the build recorded, and the fine-tuned LM is not worse than the base (on
    a few utterances one word moves the WER by points: no bound then)."""
    add = brain.outcomes.append
    recorded = hparams["recorded_wer"]
    complete = hparams["test_limit"] is None and hparams["max_decode_ratio"] >= 1.0
    if not complete:
        add("WER bounds: not applied (part of the test set, or max_decode_ratio < 1.0)")
        return
    if base_report and recorded is not None:
        bound = oc.wer_bound(recorded, hparams["wer_tolerance"])
        add(
            oc.check_quality(
                base_report.wer,
                bound,
                f"base LM (recorded {recorded:.2f}%)",
                "decoding",
                "speechbrain.decoders / speechbrain.utils.parameter_transfer",
            )
        )
    slack = hparams["wer_tolerance"]["finetuned_points"]
    if base_report and "brain" in reports and slack is not None:
        bound = base_report.wer + float(slack)
        add(
            oc.check_quality(
                reports["brain"].wer,
                bound,
                "fine-tuned LM against the base",
                "fine-tuning step",
                "speechbrain.core (Brain.fit) / speechbrain.utils.checkpoints",
            )
        )


def print_summary(results):
    """Print the readable summary of :func:`run`'s results: perplexities, WERs, checks, epochs."""
    ppl, wer = results["perplexity"], results["wer"]
    lines = [f"== Summary: {results['profile']} profile, world size {results['world_size']} =="]
    for key in ("target_valid", "general_valid"):
        lines.append(
            f"LM perplexity ({key.replace('_', ' ')}): base {ppl['base'][key]:.3f}"
            f" -> fine-tuned {ppl['finetuned'][key]:.3f}"
        )
    if "base_lm" in wer and "finetuned_brain" in wer:
        before, after = wer["base_lm"], wer["finetuned_brain"]
        rel = 100.0 * (before - after) / before if before else float("nan")
        lines.append(
            f"Target-domain test WER: base LM {before:.2f}% -> fine-tuned LM {after:.2f}%"
            f" ({rel:.1f}% relative reduction)"
        )
    if "paths" in results:
        p = results["paths"]
        wers = ", ".join(
            f"{k[len('finetuned_') :]} {v:.2f}%"
            for k, v in wer.items()
            if k.startswith("finetuned_")
        )
        lines.append(
            f"Evaluation paths ({wers}): identical hypotheses for all {p['utterances']}"
            f" utterances: {p['identical_hypotheses']}; jiwer on the merged files: "
            + ", ".join("n/a" if v is None else f"{v:.2f}%" for v in p["jiwer_wer"].values())
        )
    frozen = results["frozen"]
    lines.append(
        f"ASR frozen (parameter/buffer digests unchanged on every rank):"
        f" {frozen['unchanged_on_every_rank']}; LM changed: {results['lm']['changed']}"
        f" (max |delta| {results['lm']['max_abs_change']:.3g})"
    )
    checks = results.get("outcome_checks", {})
    if checks:
        failed = checks["failed"]
        lines.append(
            f"Outcome checks (sbtemplate.outcome_checks): {len(checks['passed'])} passed"
            + (f"; FAILED: {failed}" if failed else "")
        )
        lines += [f"  ok: {line}" for line in checks["passed"]]
    for record in results["epochs"]:
        lines.append(
            f"epoch {record['epoch']}: train ppl {record['train_perplexity']:.3f},"
            f" valid ppl {record.get('valid_perplexity', float('nan')):.3f},"
            f" LM identical on all ranks: {record['ranks_identical']}"
        )
    print("\n".join(lines), flush=True)


def main(argv=None):
    """Arguments, then :func:`run`; one exit status and error convention per rank."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The original template's launch line, python -m torch.distributed.launch
    # [--distributed_launch]: the launcher passes --local-rank=N and sets the
    # same LOCAL_RANK/RANK variables as torchrun, which SpeechBrain reads.
    launched = [run_setup.pop_option(argv, flag) for flag in ("--local-rank", "--local_rank")]
    if "--distributed_launch" in argv:
        argv.remove("--distributed_launch")
    if any(v is not None for v in launched) and os.environ.get("RANK", "0") == "0":
        print(
            "note: torch.distributed.launch is deprecated; the same run is "
            "torchrun --nproc_per_node=<N> finetune.py finetune.yaml ...",
            file=sys.stderr,
            flush=True,
        )
    hparams_file, run_opts, overrides = run_setup.parse_arguments(argv)
    run_opts = run_setup.setup_run(run_opts)
    rank = os.environ.get("RANK", "0")
    try:
        run(hparams_file, run_opts, overrides)
    except run_setup.TrainingInterrupted as exc:
        run_setup.report(f"rank {rank}: {exc}")
        run_setup.failure_barrier(run_opts)
        return run_setup.EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every rank says why, then exits non-zero
        if run_setup.is_collective_timeout(exc):
            # A rank stalled or died: find which before saying so.
            missing = [r for r in run_setup.failure_barrier(run_opts) if r >= 0]
            who = f"rank {', '.join(map(str, missing))}" if missing else "another rank"
            run_setup.report(
                f"rank {rank}: ERROR: {who} stopped answering during {STAGE['now']}: a collective "
                f"waited past collective_timeout_s ({type(exc).__name__}: {exc})"
            )
            return run_setup.EXIT_FAILED
        # An input error or a failed outcome check is its own one line; anything
        # else prints its traceback, then the line, naming the seam of the stage.
        named = isinstance(exc, (*run_setup.INPUT_ERRORS, oc.OutcomeError))
        if not named:
            traceback.print_exc()
        seam = None if named else SEAM_OF_STAGE.get(STAGE["now"])
        where = f"[{seam}] " if seam else ""
        during = f" (during {STAGE['now']})" if seam else ""
        run_setup.report(f"rank {rank}: ERROR: {where}{type(exc).__name__}: {exc}{during}")
        run_setup.failure_barrier(run_opts)
        return run_setup.exit_status(exc)
    finally:
        import torch.distributed as dist

        while WATCHDOG:
            WATCHDOG.pop().stop()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        fetching.stop_serving()
    return 0


if __name__ == "__main__":
    sys.exit(main())
