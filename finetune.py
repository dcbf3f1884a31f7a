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

from sbtemplate import run_setup
from sbtemplate.base_recognizer import lm_text_dataset, read_text_split
from sbtemplate.ddp_dynamic_batching import (
    DistributedDynamicBatchSampler,
    eval_batch_sampler,
    train_batch_sampler,
)
from sbtemplate.distributed import DDPEvalMixin, check_ledger, exchange, rank_and_world_size
from sbtemplate.frozen import freeze, state_digest, state_digests, trainable_parameters
from sbtemplate.padding_invariant import make_padding_invariant

logger = logging.getLogger(__name__)
# What the run is doing, for the message when the ranks lose each other.
STAGE = {"now": "set-up"}


# --------------------------------------------------------------------------
# Data


def speech_test_set(hparams):
    """The speech test set: the manifest read with SpeechBrain's ``{data_root}``
    replacement, its first ``test_limit`` ids, ``sig`` read with read_audio."""
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
    return test


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


def entries_of(dataset):
    """``{id: entry}`` of a dataset (``wav`` resolved), what the audio check reads."""
    return {utt_id: dataset.data[utt_id] for utt_id in dataset.data_ids}


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

    def __init__(self, *args, tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer
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
        return total / count

    def on_stage_start(self, stage, epoch=None):
        """Reset the stage's NLL sum, token count and id ledger; a WER metric if decoding."""
        self.nll_sum, self.token_count, self.seen_ids = 0.0, 0, []
        self._result = None
        if self._asr_stage(stage):
            self.wer_metric = ErrorRateStats()

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """``stop_after_steps``: save an intra-epoch checkpoint and stop, as a preempted job."""
        stop = getattr(self.hparams, "stop_after_steps", None)
        if stop and should_step and self.optimizer_step == int(stop):
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
        gathered = self._exchange(
            {"nll": self.nll_sum, "tokens": self.token_count, "ids": list(self.seen_ids)},
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
        }

    def _end_train_epoch(self, epoch):
        stats = self.gather_lm_stats("TRAIN")
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
        old_lr, new_lr = self.hparams.lr_annealing(stats["loss"])
        sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
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
    """Load, fetch, fine-tune and evaluate, as finetune.yaml says; the results."""
    from sbtemplate import finetune_eval as fe
    from sbtemplate import run_lock
    from sbtemplate.audio_check import check_audio_format

    timings, started = {}, time.time()
    # 1. Hyperparameters, loaded once (a misspelt override fails here, on every
    #    rank). In loopback mode, loading starts the Hub and URL servers.
    hparams = run_setup.load_hparams(hparams_file, overrides)

    # 2. The process group (one timeout on every collective), then the Hub
    #    client pointed where the file says.
    run_setup.init_distributed(run_opts, hparams["collective_timeout_s"])
    rank, world = rank_and_world_size()
    endpoints = fetching.use_endpoints(hparams, cache_dir=hparams["fetch_cache"])

    # 3. Data preparation: unusable test audio (missing, undecodable, another
    #    sample rate or channel count) is reported now, on every rank, before
    #    any training.
    test_set = speech_test_set(hparams)
    test_entries = entries_of(test_set)
    check_audio_format(test_entries, hparams["test_annotation"], hparams["sample_rate"])
    # One run per output folder: rank 0 locks it, every rank learns the outcome.
    busy = None
    if rank == 0:
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
    main = rank == 0
    if main:
        print(
            f"Fine-tuning the LM of {hparams['repo_id']} ({hparams['profile']} profile) on "
            f"{world} rank(s), backend {torch.distributed.get_backend() if torch.distributed.is_initialized() else '-'}, "
            f"device {run_opts.device}; {endpoints}",
            flush=True,
        )

    # 4. Fetch (rank 0 downloads, the others wait) and load the recognizer.
    STAGE["now"] = "fetching the recognizer"
    fetching.collect_pretrained(hparams)
    tokenizer = hparams["tokenizer"]
    text = text_sets(hparams, tokenizer)

    # 5. The Brain: the LM trains, the ASR modules are frozen beside it.
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
        tokenizer=tokenizer,
    )
    train_sampler = train_batch_sampler(
        text["train"], hparams["train_dynamic_batching"], hparams["seed"]
    )
    train_kwargs = {"batch_sampler": train_sampler}
    valid_kwargs = {
        "batch_sampler": eval_batch_sampler(text["valid"], hparams["valid_dynamic_batching"])
    }
    general_kwargs = {
        "batch_sampler": eval_batch_sampler(text["general"], hparams["valid_dynamic_batching"])
    }
    test_kwargs = {"batch_size": hparams["test_batch_size"]}
    if main:
        for line in train_sampler.describe():
            print(f"[train batching, epoch 0] {line}", flush=True)

    frozen_before = brain.frozen_digests()
    base_lm = brain.lm_state()
    base_digest = state_digest(brain.lm)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    results = {
        "profile": hparams["profile"],
        "world_size": world,
        "device": str(run_opts.device),
        "backend": backend,
        "perplexity": {},
        "wer": {},
    }
    eval_dir = Path(hparams["eval_folder"])
    timings["setup_s"] = time.time() - started

    # 6. Before fine-tuning: perplexities and WER with the base LM.
    STAGE["now"] = "evaluation with the base LM"
    t = time.time()
    results["perplexity"]["base"] = {
        "target_valid": brain.lm_perplexity(text["valid"], valid_kwargs)["perplexity"],
        "general_valid": brain.lm_perplexity(text["general"], general_kwargs)["perplexity"],
    }
    if hparams["evaluate_base"]:
        report = brain.decode_test_set(test_set, test_kwargs, eval_dir, "test_base_lm")
        results["wer"]["base_lm"] = report.wer
    timings["base_eval_s"] = time.time() - t

    # 7. Fine-tune the LM (resumes from the last checkpoint if interrupted).
    STAGE["now"] = "fine-tuning"
    t = time.time()
    brain.fit(
        hparams["epoch_counter"],
        text["train"],
        text["valid"],
        train_loader_kwargs=train_kwargs,
        valid_loader_kwargs=valid_kwargs,
    )
    timings["fit_s"] = time.time() - t
    brain.checkpointer.recover_if_possible(min_key="valid_perplexity")
    tuned_lm = brain.lm_state()
    final_digests = exchange(
        state_digest(brain.lm), group=brain.ddp_eval_group, what="fine-tuned LM check"
    )
    if len(set(final_digests)) != 1:
        raise RuntimeError(f"the ranks hold different fine-tuned LMs: {final_digests}")
    if main:
        fe.export_finetuned_model(
            hparams["local_repo"], Path(hparams["output_folder"]) / "finetuned_model", tuned_lm
        )

    # 8. After: perplexities, then the test set through both evaluation paths.
    STAGE["now"] = "evaluation with the fine-tuned LM"
    t = time.time()
    results["perplexity"]["finetuned"] = {
        "target_valid": brain.lm_perplexity(text["valid"], valid_kwargs)["perplexity"],
        "general_valid": brain.lm_perplexity(text["general"], general_kwargs)["perplexity"],
    }
    reports = {}
    if hparams["evaluate_finetuned"]:
        reports["brain"] = brain.decode_test_set(
            test_set, test_kwargs, eval_dir, "test_finetuned_brain"
        )
        if hparams["interface_readers"]:
            asr = fe.load_interface(
                hparams["interface_source"],
                Path(hparams["output_folder"]) / "interface",
                hparams["decoding_overrides"],
                run_opts.device,
                lm_state=tuned_lm,
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
    timings["finetuned_eval_s"] = time.time() - t

    # 9. Checks: frozen ASR on every rank, LM moved, paths agree.
    STAGE["now"] = "the final checks"
    frozen_after = brain.frozen_digests()
    per_rank = exchange(
        {"rank": rank, "before": frozen_before, "after": frozen_after},
        group=brain.ddp_eval_group,
        what="frozen check",
    )
    results["frozen"] = {
        "unchanged_on_every_rank": all(r["before"] == r["after"] for r in per_rank),
        "ranks_agree": all(r["after"] == per_rank[0]["after"] for r in per_rank),
        "per_rank": per_rank,
    }
    results["lm"] = {
        "base_digest": base_digest,
        "finetuned_digest": final_digests[0],
        "changed": final_digests[0] != base_digest,
        "max_abs_change": max(
            float((tuned_lm[k].float() - base_lm[k].float()).abs().max()) for k in base_lm
        ),
    }
    results["epochs"] = brain.epoch_records
    if reports:
        identical, differing = fe.compare_hypotheses(reports)
        results["wer"].update({f"finetuned_{name}": r.wer for name, r in reports.items()})
        results["paths"] = {
            "identical_hypotheses": identical,
            "differing_ids": differing,
            "utterances": len(reports["brain"].stats.scores),
            "jiwer_wer": {
                name: fe.jiwer_wer(r.files["utterances"]) if main else None
                for name, r in reports.items()
            },
            "files": {name: r.files for name, r in reports.items()},
            "per_rank": {name: r.per_rank for name, r in reports.items()},
        }
    results["timings"] = timings
    if main:
        fe.write_json(Path(hparams["output_folder"]) / "results.json", results)
        print_summary(results)
    problems = []
    if not results["frozen"]["unchanged_on_every_rank"]:
        problems.append("an ASR module changed during LM fine-tuning")
    if not results["lm"]["changed"]:
        problems.append("the LM did not change")
    if reports and not results["paths"]["identical_hypotheses"]:
        problems.append(f"evaluation paths disagree on {results['paths']['differing_ids'][:10]}")
    if problems:
        raise RuntimeError("; ".join(problems))
    return results


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
        run_setup.report(f"rank {rank}: ERROR: {type(exc).__name__}: {exc}")
        if not isinstance(exc, run_setup.INPUT_ERRORS):
            traceback.print_exc()  # not an input error: where it happened matters
        run_setup.failure_barrier(run_opts)
        return run_setup.exit_status(exc)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        fetching.stop_serving()
    return 0


if __name__ == "__main__":
    sys.exit(main())
