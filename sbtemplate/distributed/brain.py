"""A ``Brain`` mixin that makes VALID/TEST evaluation DDP-valid.

speechbrain 1.1.2 shards only the TRAIN loader; VALID and TEST run whole on
every rank (the ``distributed_loader_specifics`` block of
``Brain.make_dataloader`` is commented out). With this mixin::

    class ASR(DDPEvalMixin, sb.Brain):
        def on_stage_end(self, stage, stage_loss, epoch=None):
            if stage != sb.Stage.TRAIN:
                report = self.gather_eval_stats(stage, self.wer_metric, out_dir=...)
                stage_stats = {"loss": report.loss, "WER": report.wer}

- ``make_dataloader`` gives VALID/TEST loaders a
  :class:`~sbtemplate.distributed.sharding.ShardedEvalBatchSampler`: whole
  length-sorted batches per rank, no padding by repetition, nothing dropped.
  It does so in single-process runs too, so the batches (and the padding each
  utterance sees) are the same for every world size.
- Evaluation does no per-batch collective, so ranks with fewer (or no)
  batches cannot hang the others. A DDP-wrapped module is not collective-free
  in evaluation: its first forward under ``no_grad`` after training
  broadcasts its buffers from rank 0 (``require_forward_param_sync`` is still
  set), and a rank without batches would never join that broadcast. So the
  evaluation loop runs on the unwrapped modules (``ddp.module``), after one
  broadcast of every module's parameters and buffers from rank 0 at the start
  (the same on every rank, and it reproduces the buffer sync DDP would have
  done). ``SyncBatchNorm`` does not synchronise in eval mode.
- ``gather_eval_stats`` (called from ``on_stage_end``) gathers the metric once
  per stage, checks the ledger against the stage's dataset ids, prints each
  rank's line and the summary once, and writes the merged files on rank 0.
- A rank that raises during the stage (reading audio, decoding) still joins
  the gather, carrying its error, so every rank raises ``RankFailure``.
"""

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .gather import gather_error_rate_stats, print_flush
from .sharding import dataset_ids, sharded_eval_loader_kwargs
from .sync import exchange, is_distributed, new_eval_group, rank_and_world_size


@contextlib.contextmanager
def unwrapped_ddp(modules):
    """Temporarily replace DDP-wrapped entries of a ``ModuleDict`` by ``ddp.module``."""
    swapped = {}
    for name, module in list(modules.items()):
        if isinstance(module, DistributedDataParallel):
            swapped[name] = module
            modules[name] = module.module
    try:
        yield modules
    finally:
        for name, module in swapped.items():
            modules[name] = module


@torch.no_grad()
def sync_module_state(module, src=0, group=None):
    """Broadcast all parameters and buffers of ``module`` from ``src`` (one call per device/dtype).

    Collective: every rank calls it with the same module structure. Returns
    the number of tensors synchronised (0 outside a process group).
    """
    if not is_distributed() or rank_and_world_size(group)[1] == 1:
        return 0
    buckets = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        buckets.setdefault((str(tensor.device), str(tensor.dtype)), []).append(tensor)
    count = 0
    for key in sorted(buckets):
        tensors = buckets[key]
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src, group=group)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
        count += len(tensors)
    return count


class DDPEvalMixin:
    """Mix into a ``speechbrain.Brain`` subclass (before ``Brain``) for DDP-valid evaluation."""

    #: Stages whose loaders are sharded and whose metrics must be gathered.
    ddp_eval_stages = ("VALID", "TEST")
    #: Dataset key holding each utterance's length (seconds or frames).
    ddp_eval_length_key = "length"
    #: Order of batches (and of items in a batch): "ascending", "descending" or None.
    ddp_eval_sort = "ascending"
    #: Sync-point timeout in seconds (None: ``sync.DEFAULT_TIMEOUT_S``).
    ddp_eval_timeout_s = None
    #: Broadcast rank 0's parameters and buffers before each evaluation stage.
    ddp_eval_sync_state = True

    _ddp_eval_group = None
    _ddp_eval_state = None
    _ddp_eval_loss = None

    def _ddp_eval_stage(self, stage):
        return getattr(stage, "name", stage) in self.ddp_eval_stages

    def _ddp_eval_expected_ids(self):
        if getattr(self, "_ddp_eval_expected", None) is None:
            self._ddp_eval_expected = {}
        return self._ddp_eval_expected

    @property
    def ddp_eval_group(self):
        """The gloo group of the sync points (created on first use, on every rank)."""
        if self._ddp_eval_group is None and is_distributed():
            self._ddp_eval_group = new_eval_group(self.ddp_eval_timeout_s)
        return self._ddp_eval_group

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """Shard VALID/TEST loaders (whole length-sorted batches per rank) and record their ids.

        The ids are the ledger :meth:`gather_eval_stats` checks; other stages go to
        ``Brain`` unchanged.
        """
        if self._ddp_eval_stage(stage):
            loader_kwargs = sharded_eval_loader_kwargs(
                dataset,
                loader_kwargs,
                length_key=self.ddp_eval_length_key,
                sort=self.ddp_eval_sort,
            )
            loader_kwargs["batch_sampler"].item_ids = dataset_ids(dataset)
            self._ddp_eval_expected_ids()[stage.name] = dataset_ids(dataset)
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def update_average(self, loss, avg_loss):
        """Also sum this rank's finite batch losses, so the report can average over all ranks."""
        acc = self._ddp_eval_loss
        if acc is not None and torch.isfinite(loss):
            acc[0] += float(loss)
            acc[1] += 1
        return super().update_average(loss, avg_loss)

    def evaluate(
        self, test_set, max_key=None, min_key=None, progressbar=None, test_loader_kwargs=None
    ):
        """``Brain.evaluate`` on the unwrapped modules, synchronised from rank 0 first.

        An error on one rank reaches every rank; under DDP ``on_stage_end`` must call
        :meth:`gather_eval_stats`, or this raises.
        """
        return self._ddp_eval_run(
            "TEST",
            super().evaluate,
            test_set,
            max_key=max_key,
            min_key=min_key,
            progressbar=progressbar,
            test_loader_kwargs=dict(test_loader_kwargs or {}),
        )

    def _fit_valid(self, valid_set, epoch, enable):
        if valid_set is None or not self._ddp_eval_stage("VALID"):
            return super()._fit_valid(valid_set=valid_set, epoch=epoch, enable=enable)
        return self._ddp_eval_run(
            "VALID", super()._fit_valid, valid_set, epoch=epoch, enable=enable
        )

    def _ddp_eval_run(self, stage_name, run, data, **kwargs):
        if not self._ddp_eval_stage(stage_name):
            return run(data, **kwargs)
        # The ledger's expected ids: from a loader made by make_dataloader,
        # or set by make_dataloader during this stage when given a dataset.
        # Any other loader gets the duplicate check only.
        if isinstance(data, DataLoader):
            sampler = getattr(data, "batch_sampler", None)
            self._ddp_eval_expected_ids()[stage_name] = getattr(sampler, "item_ids", None)
        else:
            self._ddp_eval_expected_ids()[stage_name] = None
        group = self.ddp_eval_group
        state = {"stage": stage_name, "exchanged": False}
        self._ddp_eval_state = state
        self._ddp_eval_loss = [0.0, 0]
        try:
            with unwrapped_ddp(self.modules):
                if self.ddp_eval_sync_state:
                    sync_module_state(self.modules)
                try:
                    result = run(data, **kwargs)
                except Exception as exc:
                    if is_distributed() and not state["exchanged"]:
                        state["exchanged"] = True
                        exchange(error=exc, group=group, what=f"{stage_name.lower()} evaluation")
                    raise
            if is_distributed() and not state["exchanged"]:
                raise RuntimeError(
                    f"on_stage_end({stage_name}) must call self.gather_eval_stats(...):"
                    " under DDP each rank only scored its own shard"
                )
            return result
        finally:
            self._ddp_eval_state = None
            self._ddp_eval_loss = None

    def gather_eval_stats(
        self, stage, stats, out_dir=None, name=None, sb_wer_file=False, printer=print_flush
    ):
        """Gather ``stats`` (an ``ErrorRateStats``) of all ranks: call once from ``on_stage_end``.

        Returns an :class:`~sbtemplate.distributed.gather.EvalReport`, the
        same on every rank; ``report.loss`` is the mean batch loss over all
        ranks. Rank 0 prints the per-rank lines and the summary and, with
        ``out_dir``, writes the merged per-utterance file and JSON summary.
        """
        stage_name = getattr(stage, "name", str(stage))
        state = self._ddp_eval_state
        if state is None or state["stage"] != stage_name:
            raise RuntimeError(
                f"gather_eval_stats({stage_name}) belongs in on_stage_end of an evaluation stage"
            )
        if state["exchanged"]:
            raise RuntimeError(f"gather_eval_stats({stage_name}) called twice")
        state["exchanged"] = True
        expected = None
        if not getattr(self, "debug", False):  # --debug runs only a few batches
            expected = self._ddp_eval_expected_ids().get(stage_name)
        loss = self._ddp_eval_loss
        return gather_error_rate_stats(
            stats,
            expected_ids=expected,
            loss=tuple(loss) if loss else None,
            group=self.ddp_eval_group,
            name=name or stage_name.lower(),
            out_dir=out_dir,
            sb_wer_file=sb_wer_file,
            printer=printer,
        )
