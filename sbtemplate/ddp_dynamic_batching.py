"""Dynamic batching for DDP training: equal batch counts, nothing dropped or repeated.

SpeechBrain's ``DynamicBatchSampler`` groups items of similar length into
batches under a maximum total (padded) length. Under DDP, ``Brain`` wraps it in
``DistributedSamplerWrapper``, which pads the list of batches by repeating
some (their utterances are seen twice) and hands out batches round-robin.

:class:`DistributedDynamicBatchSampler` plans the batches of an epoch
globally, with SpeechBrain's sampler (same buckets, same epoch-seeded
shuffle), on every rank from the same lengths, so no communication is needed.
When the number of batches is not a multiple of the world size it splits the
largest batches in two until it is: every rank gets the same number of
batches (so no rank waits in DDP's all-reduce for a peer that has finished)
and every item is used exactly once per epoch. Fewer batches than ranks is an
error: that configuration cannot train every rank without repeating data.
"""

import logging

from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


class NotEnoughBatches(ValueError):
    """Fewer batches than ranks (or batches that cannot be split further)."""


def equalize_batches(batches, world_size):
    """Split the largest batches until ``len(batches) % world_size == 0``.

    Returns a new list; raises :class:`NotEnoughBatches` when there are fewer
    batches than ranks or no batch can be split any more.
    """
    batches = [list(b) for b in batches]
    if len(batches) < world_size:
        raise NotEnoughBatches(
            f"{len(batches)} batch{'es' if len(batches) != 1 else ''} for a world size of "
            f"{world_size}: every rank needs at least one batch per epoch. Lower "
            "max_batch_length (or max_batch_ex), use more data, or launch fewer ranks."
        )
    while len(batches) % world_size:
        splittable = [i for i, b in enumerate(batches) if len(b) > 1]
        if not splittable:
            raise NotEnoughBatches(
                f"{len(batches)} single-item batches cannot be shared equally by "
                f"{world_size} ranks without repeating or dropping an item"
            )
        i = max(splittable, key=lambda k: (len(batches[k]), -k))
        half = len(batches[i]) // 2
        batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def padding_stats(batches, lengths):
    """``{"batches", "items", "real", "padded", "padding_fraction"}`` of some batches.

    ``padded`` counts ``len(batch) * longest`` per batch; ``padding_fraction``
    is the share of the padded tensors that is padding.
    """
    real = sum(float(lengths[i]) for b in batches for i in b)
    padded = sum(len(b) * max(float(lengths[i]) for i in b) for b in batches if b)
    return {
        "batches": len(batches),
        "items": sum(len(b) for b in batches),
        "real": real,
        "padded": padded,
        "padding_fraction": (padded - real) / padded if padded else 0.0,
    }


class DistributedDynamicBatchSampler(Sampler):
    """This rank's share of ``DynamicBatchSampler`` batches, equal counts on all ranks.

    Arguments
    ---------
    lengths : sequence of numbers
        Item lengths (frames, seconds or tokens), in dataset order.
    max_batch_length, num_buckets, shuffle, batch_ordering, max_batch_ex,
    bucket_boundaries, seed
        As for ``speechbrain.dataio.sampler.DynamicBatchSampler``.
    rank, world_size : int, optional
        Default: from ``torch.distributed`` (0 and 1 without a process group).
    epoch : int
        The plan is a function of ``(seed, epoch)``; ``Brain`` calls
        :meth:`set_epoch` at the start of each epoch, so a run resumed in the
        middle of an epoch sees the same batches.
    """

    def __init__(
        self,
        lengths,
        max_batch_length,
        num_buckets=None,
        shuffle=True,
        batch_ordering="random",
        max_batch_ex=None,
        bucket_boundaries=(),
        seed=42,
        rank=None,
        world_size=None,
        epoch=0,
    ):
        from sbtemplate.distributed import rank_and_world_size

        default_rank, default_world = rank_and_world_size()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.lengths = [float(x) for x in lengths]
        if not self.lengths:
            raise NotEnoughBatches("no items to batch")
        self.options = dict(
            max_batch_length=max_batch_length,
            num_buckets=num_buckets,
            shuffle=shuffle,
            batch_ordering=batch_ordering,
            max_batch_ex=max_batch_ex,
            bucket_boundaries=list(bucket_boundaries),
            seed=seed,
        )
        longest = max(self.lengths)
        if longest > max_batch_length:
            raise ValueError(
                f"an item of length {longest:g} exceeds max_batch_length={max_batch_length:g}"
            )
        self.set_epoch(epoch)

    def global_batches(self, epoch):
        """The whole plan of ``epoch`` (the same on every rank)."""
        from speechbrain.dataio.sampler import DynamicBatchSampler

        opts = self.options
        sampler = DynamicBatchSampler(
            range(len(self.lengths)),
            max_batch_length=opts["max_batch_length"],
            num_buckets=opts["num_buckets"],
            shuffle=opts["shuffle"],
            batch_ordering=opts["batch_ordering"],
            max_batch_ex=opts["max_batch_ex"],
            bucket_boundaries=opts["bucket_boundaries"],
            lengths_list=self.lengths,
            seed=opts["seed"],
            epoch=epoch,
            drop_last=False,
        )
        planned = [list(b) for b in sampler._batches]  # iterating would re-plan
        batches = equalize_batches(planned, self.world_size)
        seen = sorted(i for b in batches for i in b)
        if seen != list(range(len(self.lengths))):
            raise RuntimeError(
                "[samplers/DDP] the dynamic batch plan does not use every item exactly once"
                f" ({len(seen)} uses of {len(self.lengths)} items; at fault:"
                " speechbrain.dataio.sampler (DynamicBatchSampler))"
            )
        return batches

    def set_epoch(self, epoch):
        """Plan the batches of ``epoch`` and take this rank's share (every ``world_size``-th batch).

        ``Brain`` calls it at the start of each epoch.
        """
        self.epoch = int(epoch)
        self.batches = self.global_batches(self.epoch)
        self.rank_batches = self.batches[self.rank :: self.world_size]

    def __iter__(self):
        for batch in self.rank_batches:
            yield list(batch)

    def __len__(self):
        return len(self.rank_batches)

    def stats(self, rank=None):
        """Padding statistics of one rank's batches (default: this rank) this epoch."""
        rank = self.rank if rank is None else rank
        return padding_stats(self.batches[rank :: self.world_size], self.lengths)

    def describe(self):
        """One line per rank: batches, items, padding fraction."""
        lines = []
        for rank in range(self.world_size):
            s = self.stats(rank)
            lines.append(
                f"rank {rank}: {s['batches']} batches, {s['items']} items, "
                f"padding {100 * s['padding_fraction']:.1f}%"
            )
        return lines


def fixed_size_batches_stats(lengths, batch_size, seed=0):
    """Padding of shuffled fixed-size batches over ``lengths`` (the usual baseline)."""
    import random

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches, padding_stats(batches, lengths)


def dataset_lengths(dataset):
    """The ``length`` of every item of a DynamicItemDataset, in its order."""
    return [dataset.data[i]["length"] for i in dataset.data_ids]


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
