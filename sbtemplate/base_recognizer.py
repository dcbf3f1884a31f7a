"""Training of the base recognizer's three pieces: tokenizer, RNNLM, CRDNN ASR.

These follow SpeechBrain's ``templates/speech_recognition`` recipes (Tokenizer,
LM and ASR) with the same classes, scaled down to train on two CPU cores from
the synthetic corpus. ``sbtemplate.build`` calls them in order and publishes
the result in the layout ``EncoderDecoderASR.from_hparams`` loads.
"""

import contextlib
import json
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import sentencepiece as spm
import speechbrain as sb
import torch
from speechbrain.tokenizers.SentencePiece import SentencePiece

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- tokenizer --
def train_tokenizer(out_dir, text_lines, vocab_size):
    """Train SpeechBrain's SentencePiece wrapper (unigram) and return the model path.

    Ids: 0 = unk (shared with the CTC blank), 1 = bos, 2 = eos, as the
    template's ASR hyperparameters expect.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # SentencePiece reads its training text from a CSV/JSON annotation; a
    # one-column JSON keeps it simple.
    annotation = out_dir / "tokenizer_train.json"
    annotation.write_text(
        json.dumps({f"s{i}": {"words": line} for i, line in enumerate(text_lines)})
    )
    # The model file records its training-text path: train from inside the
    # folder with relative paths, so the bytes do not depend on where the
    # artefacts live.
    with _working_directory(out_dir):
        SentencePiece(
            model_dir=".",
            vocab_size=vocab_size,
            annotation_train=annotation.name,
            annotation_read="words",
            annotation_format="json",
            model_type="unigram",
            character_coverage=1.0,
            bos_id=1,
            eos_id=2,
            unk_id=0,
        )
    model = out_dir / f"{vocab_size}_unigram.model"
    if not model.is_file():
        raise RuntimeError(f"SentencePiece did not write {model}")
    return model


@contextlib.contextmanager
def _working_directory(path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def seed_everything(seed):
    """Seed every generator training touches.

    The YAML's ``torch.manual_seed`` is not enough: SpeechBrain's Augmenter
    draws from Python's ``random``, so an unseeded run trains another model.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(model_file):
    """A SentencePiece processor loaded from ``model_file``."""
    tokenizer = spm.SentencePieceProcessor()
    tokenizer.load(str(model_file))
    return tokenizer


# ----------------------------------------------------------------------- LM --
def read_text_split(path):
    """``{id: words}`` from a JSON descriptor (``{id: {"words": ...}}``) or a text file."""
    path = Path(path)
    if path.suffix == ".json":
        entries = json.loads(path.read_text())
        return {str(k): v["words"] for k, v in entries.items()}
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return {f"{path.stem}-{i:06d}": line for i, line in enumerate(lines)}


def lm_text_dataset(sentences, tokenizer, bos_index, eos_index, prefix="s"):
    """A DynamicItemDataset of sentences → tokens_bos / tokens_eos for LM training.

    ``sentences`` is ``{id: words}`` or a list (ids ``<prefix>000000``...). Each
    item's ``length`` is its token count + 1, for dynamic batching.
    """
    if not isinstance(sentences, dict):
        sentences = {f"{prefix}{i:06d}": s for i, s in enumerate(sentences)}
    data = {
        utt_id: {"words": words, "length": len(tokenizer.encode_as_ids(words)) + 1}
        for utt_id, words in sentences.items()
    }
    dataset = sb.dataio.dataset.DynamicItemDataset(data)

    @sb.utils.data_pipeline.takes("words")
    @sb.utils.data_pipeline.provides("tokens_bos", "tokens_eos")
    def text_pipeline(words):
        tokens = tokenizer.encode_as_ids(words)
        yield torch.LongTensor([bos_index] + tokens)
        yield torch.LongTensor(tokens + [eos_index])

    sb.dataio.dataset.add_dynamic_item([dataset], text_pipeline)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "tokens_bos", "tokens_eos"])
    return dataset


class LMBrain(sb.core.Brain):
    """Next-token NLL on tokenised text (SpeechBrain's LM template recipe)."""

    def compute_forward(self, batch, stage):
        """Log-probabilities of the next token at each position of ``tokens_bos``."""
        batch = batch.to(self.device)
        tokens_bos, _ = batch.tokens_bos
        logits = self.modules.model(tokens_bos)
        return self.hparams.log_softmax(logits)

    def compute_objectives(self, predictions, batch, stage):
        """NLL of ``tokens_eos`` under the predictions, padding excluded by the relative lengths."""
        tokens_eos, tokens_len = batch.tokens_eos
        return self.hparams.compute_cost(predictions, tokens_eos, length=tokens_len)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Loss and perplexity (exp of the loss, capped at e^50) of the stage.

        VALID anneals the learning rate on the loss and keeps the lowest-loss checkpoint;
        ``last_stats`` keeps the figures for the build's report.
        """
        stats = {"loss": stage_loss, "perplexity": math.exp(min(stage_loss, 50.0))}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
        elif stage == sb.Stage.VALID:
            old_lr, new_lr = self.hparams.lr_annealing(stage_loss)
            sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": old_lr},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            self.checkpointer.save_and_keep_only(meta=stats, min_keys=["loss"])
        self.last_stats = stats


# ---------------------------------------------------------------------- ASR --
def asr_datasets(hparams, tokenizer):
    """Train/valid DynamicItemDatasets from the JSON descriptors ({data_root} filled in)."""
    datasets = {}
    for name in ("train", "valid"):
        dataset = sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=hparams[f"{name}_annotation"],
            replacements={"data_root": hparams["data_root"]},
        )
        datasets[name] = dataset.filtered_sorted(sort_key="length")

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("words")
    @sb.utils.data_pipeline.provides("words", "tokens_bos", "tokens_eos", "tokens")
    def text_pipeline(words):
        yield words
        tokens = tokenizer.encode_as_ids(words)
        yield torch.LongTensor([hparams["bos_index"]] + tokens)
        yield torch.LongTensor(tokens + [hparams["eos_index"]])
        yield torch.LongTensor(tokens)

    sets = list(datasets.values())
    sb.dataio.dataset.add_dynamic_item(sets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(sets, text_pipeline)
    sb.dataio.dataset.set_output_keys(
        sets, ["id", "sig", "words", "tokens_bos", "tokens_eos", "tokens"]
    )
    return datasets


def pad_to_multiple(wavs, wav_lens, multiple):
    """Zero-pad the batch's time axis up to a multiple of ``multiple`` samples.

    Relative lengths are rescaled so they still point at the same samples. A
    handful of distinct shapes keeps CPU kernels warm during training.
    """
    total = wavs.shape[1]
    padded = int(math.ceil(total / multiple) * multiple)
    if padded == total:
        return wavs, wav_lens
    wavs = torch.nn.functional.pad(wavs, (0, padded - total))
    return wavs, wav_lens * total / padded


class ASRBrain(sb.core.Brain):
    """CTC + attention training of the CRDNN recognizer (SpeechBrain's ASR template)."""

    def _wrap_distributed(self):
        """DDP on CPU ranks without ``SyncBatchNorm``.

        speechbrain 1.1.2 converts every BatchNorm to ``SyncBatchNorm``, which
        raises on CPU modules ("SyncBatchNorm layers only work with GPU
        modules"). On gloo each rank normalises with its own batch statistics
        (plain DDP behaviour) and DDP broadcasts rank 0's running statistics.
        """
        if not (self.distributed_launch and self.distributed_backend == "gloo"):
            return super()._wrap_distributed()
        from torch.nn.parallel import DistributedDataParallel

        for name, module in self.modules.items():
            if any(p.requires_grad for p in module.parameters()):
                self.modules[name] = DistributedDataParallel(
                    module, find_unused_parameters=self.find_unused_parameters
                )

    def compute_forward(self, batch, stage):
        """CTC and attention log-probabilities of a batch; beam-search hypotheses outside training.

        Training augments the waveforms (when ``augment_prob > 0``) and pads them to a
        multiple of ``pad_to_multiple``. Returns ``(p_ctc, p_seq, wav_lens, hyps)``;
        ``p_ctc`` is None once CTC is off, ``hyps`` None in training.
        """
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos
        if stage == sb.Stage.TRAIN:
            wavs = (
                self.hparams.augment(wavs, wav_lens)[0] if self.hparams.augment_prob > 0 else wavs
            )
            wavs, wav_lens = pad_to_multiple(wavs, wav_lens, self.hparams.pad_to_multiple)
        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens)
        encoded = self.modules.encoder(feats.detach())
        embedded = self.modules.embedding(tokens_bos)
        decoded, _ = self.modules.decoder(embedded, encoded, wav_lens)
        logits = self.modules.seq_lin(decoded)
        p_seq = self.hparams.log_softmax(logits)
        p_ctc = None
        if self.is_ctc_active(stage):
            p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(encoded))
        hyps = None
        if stage != sb.Stage.TRAIN:
            hyps, _, _, _ = self.hparams.valid_search(encoded.detach(), wav_lens)
        return p_ctc, p_seq, wav_lens, hyps

    def is_ctc_active(self, stage):
        """Whether CTC is in the loss: TRAIN only, for the first ``number_of_ctc_epochs``."""
        if stage != sb.Stage.TRAIN:
            return False
        return self.hparams.epoch_counter.current <= self.hparams.number_of_ctc_epochs

    def compute_objectives(self, predictions, batch, stage):
        """Attention NLL, mixed with CTC by ``ctc_weight`` while CTC is active.

        Outside TRAIN it also accumulates the hypotheses' WER and CER statistics.
        """
        p_ctc, p_seq, wav_lens, hyps = predictions
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        tokens, tokens_lens = batch.tokens
        loss = self.hparams.seq_cost(p_seq, tokens_eos, length=tokens_eos_lens)
        if p_ctc is not None:
            loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
            loss = (1 - self.hparams.ctc_weight) * loss + self.hparams.ctc_weight * loss_ctc
        if stage != sb.Stage.TRAIN:
            predicted = [self.tokenizer.decode_ids(h).split(" ") for h in hyps]
            target = [w.split(" ") for w in batch.words]
            self.wer_metric.append(batch.id, predicted, target)
            self.cer_metric.append(batch.id, predicted, target)
        return loss

    def on_stage_start(self, stage, epoch=None):
        """Fresh WER and CER metrics for VALID and TEST."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Loss, WER and CER of the stage; VALID also keeps the lowest-WER checkpoint.

        The learning rate follows the epoch, not the valid metrics; ``last_stats`` keeps
        the figures for the build's report.
        """
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["WER"] = self.wer_metric.summarize("error_rate")
        stats["CER"] = self.cer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            # The rate follows the epoch (StepScheduler), not the valid metrics.
            old_lr, new_lr = self.hparams.lr_annealing(epoch)
            sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": old_lr},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            self.checkpointer.save_and_keep_only(meta=stats, min_keys=["WER"])
        self.last_stats = stats


# ------------------------------------------------------- ASR on 1 or N ranks --
def train_asr(job):
    """Train the ASR described by ``job`` and write ``asr.ckpt``,
    ``normalizer.ckpt`` and ``asr_valid.json`` into ``job["out_dir"]``.

    ``job``: ``hparams_file``, ``overrides`` (HyperPyYAML; ``batch_size`` per
    rank), ``tokenizer``, ``out_dir``, ``seed``, ``device``. It runs in the
    calling process, or under torchrun as one of several DDP ranks: the Brain
    then shards the length-sorted training set over the ranks and DDP averages
    their gradients, so N ranks take steps on N x ``batch_size`` utterances.
    It is the template's multi-GPU path for the recognizer too; on two CPU
    cores two single-threaded ranks ran an epoch about as fast as one
    two-thread process at the same step size.
    """
    from hyperpyyaml import load_hyperpyyaml

    out_dir = Path(job["out_dir"])
    distributed = sb.utils.distributed.get_rank() is not None
    run_opts = {"device": job["device"], "debug": False}
    if distributed:
        cuda = job["device"].startswith("cuda")
        run_opts["distributed_backend"] = "nccl" if cuda else "gloo"
        if cuda:  # one GPU per rank, as ddp_init_group selects it
            run_opts["device"] = f"cuda:{sb.utils.distributed.get_local_rank()}"
        sb.utils.distributed.ddp_init_group(run_opts)
    seed_everything(job["seed"])
    with open(job["hparams_file"]) as handle:
        hparams = load_hyperpyyaml(handle, job["overrides"])
    tokenizer = load_tokenizer(job["tokenizer"])
    datasets = asr_datasets(hparams, tokenizer)
    brain = ASRBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = tokenizer
    brain.fit(
        hparams["epoch_counter"],
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    stats = dict(brain.last_stats)
    if distributed:
        # DDP keeps replicas identical only if every rank saw the same
        # updates; a rank that drifted (an unsynchronised module or buffer)
        # would make rank 0's checkpoint one of several models.
        from sbtemplate.distributed import exchange
        from sbtemplate.frozen import state_digest

        digests = exchange(state_digest(hparams["model"]), what="ASR replica check")
        if len(set(digests)) != 1:
            raise RuntimeError(f"ASR replicas differ across ranks after training: {digests}")
        stats["ranks"] = len(digests)
    if sb.utils.distributed.if_main_process():
        hparams["checkpointer"].recover_if_possible(min_key="WER")
        torch.save(hparams["model"].state_dict(), out_dir / "asr.ckpt")
        hparams["normalize"]._save(out_dir / "normalizer.ckpt")
        (out_dir / "asr_valid.json").write_text(json.dumps(stats))
    if distributed:
        sb.utils.distributed.ddp_barrier()
        torch.distributed.destroy_process_group()


def main(argv=None):
    """``torchrun --nproc_per_node=N -m sbtemplate.base_recognizer <job.json>``
    (``sbtemplate.build`` runs it for profiles whose ASR stage has ``ranks``)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m sbtemplate.base_recognizer <job.json>")
    torch.set_flush_denormal(True)  # torch itself takes its thread count from OMP_NUM_THREADS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train_asr(json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
