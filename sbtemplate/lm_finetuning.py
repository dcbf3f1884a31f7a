"""Fine-tuning only the recognizer's RNNLM, under DDP, with the ASR frozen beside it.

``finetune.py`` reads top to bottom like SpeechBrain's recipe scripts; the
pieces it uses live here:

- :func:`setup_run`: backend and device chosen from the hardware (overridable),
  one thread budget per rank, the process group with a timeout on every
  collective;
- datasets: target-domain text with token-count lengths (for dynamic
  batching) and the speech test set, with every audio file checked first;
- :class:`LMFineTuneBrain`: next-token NLL on the tokenizer's ids for the LM
  alone (TRAIN, VALID), and ASR decoding with the LM in the beam search (TEST).
  VALID/TEST are DDP-valid through :class:`~sbtemplate.distributed.DDPEvalMixin`;
  perplexities are exact corpus figures (summed NLL / summed tokens over all
  ranks), so they do not depend on the world size or the batching.
"""

import datetime
import json
import logging
import math
import os
import re
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.dataio.dataio import length_to_mask, read_audio
from speechbrain.utils.metric_stats import ErrorRateStats

from sbtemplate.base_recognizer import lm_text_dataset  # noqa: F401 - used as lf.lm_text_dataset
from sbtemplate.ddp_dynamic_batching import DistributedDynamicBatchSampler
from sbtemplate.distributed import DDPEvalMixin, check_ledger, exchange, rank_and_world_size
from sbtemplate.distributed.brain import unwrapped_ddp
from sbtemplate.frozen import freeze, state_digest, state_digests, trainable_parameters

logger = logging.getLogger(__name__)

#: Exit status of a run stopped on purpose by ``stop_after_steps``.
EXIT_INTERRUPTED = 3


class TrainingInterrupted(Exception):
    """Raised on every rank after the intra-epoch checkpoint of ``stop_after_steps``."""


# --------------------------------------------------------------------------
# Run set-up


def pop_option(argv, name):
    """Remove ``name=value`` or ``name value`` from ``argv`` (in place); the value or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
    return None


def choose_backend_and_device(run_opts):
    """NCCL and ``cuda:<LOCAL_RANK>`` with GPUs, gloo and CPU without; given options win.

    Returns a new ``RunOptions`` (they are frozen) with both marked as set.
    """
    import dataclasses

    given = set(getattr(run_opts, "overridden_args", set()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    changes = {}
    if "distributed_backend" not in given:
        changes["distributed_backend"] = "nccl" if cuda else "gloo"
    if "device" not in given:
        changes["device"] = f"cuda:{local_rank}" if cuda else "cpu"
    return dataclasses.replace(
        run_opts, **changes, overridden_args=given | {"distributed_backend", "device"}
    )


def threads_per_rank():
    """Cores of this machine shared by the ranks on it (torchrun sets OMP_NUM_THREADS)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def init_distributed(run_opts, timeout_s):
    """``sb.utils.distributed.ddp_init_group`` with a configurable collective timeout.

    Does nothing without ``RANK``/``LOCAL_RANK`` (single process).
    """
    if os.environ.get("RANK") is None or os.environ.get("LOCAL_RANK") is None:
        return False
    if torch.distributed.is_initialized():
        return True
    backend = run_opts["distributed_backend"]
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        timeout=datetime.timedelta(seconds=float(timeout_s)),
    )
    # A group used for nothing but the failure barrier below, so that it can
    # never be matched against another collective.
    _failure["group"] = torch.distributed.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=FAILURE_BARRIER_S)
    )
    return True


#: How long a failing rank waits for the others at the failure barrier.
FAILURE_BARRIER_S = 20.0
_failure = {"group": None}


def failure_barrier():
    """Let every rank that fails at the same point report before any exits.

    torchrun stops all workers as soon as one exits non-zero, which could cut
    off the others' error messages when they all fail alike (a bad override, a
    missing file, too few batches). A failing rank waits here, at most
    ``FAILURE_BARRIER_S`` seconds, for the others; a rank that fails alone
    times out and exits, and torchrun ends the rest. Returns the ranks that
    did not come (rank 0 learns them all; the others, at most that some did
    not: ``[-1]``), empty when all met.
    """
    group = _failure["group"]
    if group is None or not torch.distributed.is_initialized():
        return []
    try:
        torch.distributed.monitored_barrier(
            group=group, timeout=datetime.timedelta(seconds=FAILURE_BARRIER_S), wait_all_ranks=True
        )
        return []
    except RuntimeError as error:
        # "Ranks 1, 3 failed to pass monitoredBarrier in 20000 ms"
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(error))
        return [int(r) for r in found.group(1).replace(" ", "").split(",") if r] if found else [-1]


def is_collective_timeout(error):
    """Whether ``error`` is a collective that waited past its timeout (gloo, NCCL)."""
    text = f"{type(error).__name__}: {error}"
    return (
        "Timed out waiting" in text
        or "DistBackendError" in text
        or "Watchdog caught collective operation timeout" in text
    )


def shared_endpoints(endpoints, cache_dir):
    """The YAML overrides of :func:`sbtemplate.fetching.fetch_endpoints`, rank 0's on every rank.

    In loopback mode each process serves the model on its own port; the URL
    cache is keyed by the base URL, so the ranks that wait for rank 0's
    download must look under rank 0's URLs (they never connect to them).
    """
    import torch.distributed as dist

    from sbtemplate import fetching

    overrides = dict(endpoints.overrides)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return overrides
    box = [(endpoints.hub_endpoint, endpoints.url_base)] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    hub, url_base = box[0]
    if (hub, url_base) != (endpoints.hub_endpoint, endpoints.url_base):
        fetching.setup(hub_endpoint=hub, cache_dir=cache_dir)
    overrides.update(hub_endpoint=hub, url_base=url_base)
    return overrides


def setup_run(run_opts):
    """Process-wide settings before anything heavy runs."""
    torch.set_flush_denormal(True)  # denormals make CPU RNNs many times slower
    torch.set_num_threads(threads_per_rank())
    return choose_backend_and_device(run_opts)


# --------------------------------------------------------------------------
# Data


def read_text_split(path):
    """``{id: words}`` from a JSON descriptor (``{id: {"words": ...}}``) or a text file."""
    path = Path(path)
    if path.suffix == ".json":
        entries = json.loads(path.read_text())
        return {str(k): v["words"] for k, v in entries.items()}
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return {f"{path.stem}-{i:06d}": line for i, line in enumerate(lines)}


def dataset_lengths(dataset):
    return [dataset.data[i]["length"] for i in dataset.data_ids]


def read_test_manifest(path, data_root, limit=None):
    """``{id: entry}`` (``wav`` resolved) of a speech descriptor, first ``limit`` ids."""
    entries = json.loads(Path(path).read_text())
    ids = sorted(entries)
    if limit:
        ids = ids[: int(limit)]
    out = {}
    for utt_id in ids:
        entry = dict(entries[utt_id])
        entry["wav"] = entry["wav"].replace("{data_root}", str(data_root))
        out[utt_id] = entry
    return out


def speech_test_dataset(entries):
    """DynamicItemDataset of a resolved speech descriptor: ``sig`` (read_audio) and ``words``."""
    dataset = sb.dataio.dataset.DynamicItemDataset(entries)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return read_audio(wav)

    sb.dataio.dataset.add_dynamic_item([dataset], audio_pipeline)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig", "words"])
    return dataset


def train_batch_sampler(dataset, options, seed):
    """The DDP-safe dynamic batch sampler of the training set (rank from torch.distributed)."""
    return DistributedDynamicBatchSampler(dataset_lengths(dataset), seed=seed, **options)


def eval_batch_sampler(dataset, options):
    """SpeechBrain's DynamicBatchSampler for VALID (sharded whole by DDPEvalMixin)."""
    from speechbrain.dataio.sampler import DynamicBatchSampler

    options = dict(options)
    for key in ("shuffle", "drop_last"):
        if options.pop(key, False):
            raise ValueError(f"validation batching must not set {key}")
    return DynamicBatchSampler(
        dataset, lengths_list=dataset_lengths(dataset), shuffle=False, drop_last=False, **options
    )


def frozen_asr_modules(hparams):
    """The ASR pieces, frozen: ``{"asr": ModuleList(enc, emb, dec, ctc_lin, seq_lin), "normalizer"}``."""
    return {"asr": freeze(hparams["asr_model"]), "normalizer": freeze(hparams["normalizer"])}


# --------------------------------------------------------------------------
# The Brain


class LMFineTuneBrain(DDPEvalMixin, sb.Brain):
    """Fine-tunes ``modules.lm`` (next-token NLL); the other modules are frozen.

    ``test_task`` picks what ``evaluate()`` does: ``"lm"`` (perplexity of a
    text set) or ``"asr"`` (decode a speech set with ``hparams.test_encoder``
    and ``hparams.test_search``, whose RNNLM scorer holds the LM being trained).
    """

    test_task = "asr"

    def __init__(self, *args, tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer
        self.eval_out_dir = None
        self.eval_name = "test"
        self.last_report = None
        self.last_lm_stats = None
        self.epoch_records = []
        timeout = getattr(self.hparams, "collective_timeout_s", None)
        if timeout is not None and not os.environ.get("SBTEMPLATE_EVAL_TIMEOUT"):
            self.ddp_eval_timeout_s = float(timeout)
        _ = self.ddp_eval_group  # created now, on every rank, in the same order

    # -- helpers ---------------------------------------------------------
    @property
    def lm(self):
        """The LM module itself (not its DDP wrapper)."""
        module = self.modules["lm"]
        return getattr(module, "module", module)

    def frozen_digests(self):
        return state_digests({k: m for k, m in self.modules.items() if k != "lm"})

    def _asr_stage(self, stage):
        return stage == sb.Stage.TEST and self.test_task == "asr"

    def _exchange(self, payload, what):
        state = self._ddp_eval_state  # set by DDPEvalMixin during VALID/TEST
        if state is not None:
            state["exchanged"] = True  # this is the stage's one sync point
        return exchange(payload, group=self.ddp_eval_group, what=what)

    # -- Brain interface -------------------------------------------------
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

    def compute_forward(self, batch, stage):
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
        self.nll_sum, self.token_count, self.seen_ids = 0.0, 0, []
        if self._asr_stage(stage):
            self.wer_metric = ErrorRateStats()

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        stop = getattr(self.hparams, "stop_after_steps", None)
        if stop and should_step and self.optimizer_step == int(stop):
            self._save_intra_epoch_ckpt()
            raise TrainingInterrupted(
                f"stopped after {self.optimizer_step} optimizer steps (stop_after_steps);"
                " run again to resume from the intra-epoch checkpoint"
            )

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

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if self._asr_stage(stage):
            self.last_report = self.gather_eval_stats(
                stage, self.wer_metric, out_dir=self.eval_out_dir, name=self.eval_name
            )
            return
        if stage == sb.Stage.TRAIN:
            self._end_train_epoch(epoch)
            return
        stats = self.gather_lm_stats(stage.name)
        self.last_lm_stats = stats
        if stage == sb.Stage.VALID:
            self._end_valid_epoch(epoch, stats)

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

    # -- evaluations used by the script ----------------------------------
    def lm_perplexity(self, dataset, loader_kwargs):
        """Corpus perplexity of the current LM on a text set (DDP-valid)."""
        self.test_task = "lm"
        try:
            self.evaluate(dataset, progressbar=False, test_loader_kwargs=dict(loader_kwargs))
        finally:
            self.test_task = "asr"
        return self.last_lm_stats

    def decode_test_set(self, dataset, loader_kwargs, out_dir, name):
        """WER of the recognizer with the current LM (DDP-valid); the EvalReport."""
        self.test_task = "asr"
        self.eval_out_dir, self.eval_name = out_dir, name
        self.evaluate(dataset, progressbar=False, test_loader_kwargs=dict(loader_kwargs))
        return self.last_report


def lm_state(brain):
    """A CPU copy of the LM's state dict."""
    return {k: v.detach().cpu().clone() for k, v in brain.lm.state_dict().items()}


def load_lm_state(brain, state):
    with torch.no_grad(), unwrapped_ddp(brain.modules):
        brain.lm.load_state_dict(state)
