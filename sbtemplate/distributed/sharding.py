"""Evaluation sharding that never pads, duplicates or drops an utterance.

The scheme
----------
1. Plan the batches globally, exactly as one process would: either fixed-size
   chunks of the length-sorted data, or the batches of SpeechBrain's
   ``DynamicBatchSampler`` (its bucketing is reused, not rewritten).
2. Hand out *whole batches* to the ranks. Every rank computes the same plan
   from the same lengths, so no communication is needed and the union of the
   shares is the plan itself: every utterance lands on exactly one rank.
3. Each rank runs its batches sorted by length.

Because a batch is never split or re-formed, every utterance is padded exactly
as it would be in a single-process run with the same plan, so per-utterance
outputs (and therefore the gathered WER) do not depend on the world size.

Ranks may get different numbers of batches, including none (7 utterances,
batch size 8, 3 ranks). That is safe only because evaluation does no
per-batch collective: see :mod:`sbtemplate.distributed.brain` for how
DDP-wrapped modules are kept out of the evaluation loop, and
:mod:`sbtemplate.distributed.gather` for the single gather at the end.

Batches are assigned greedily (longest-processing-time first) on their padded
cost ``len(batch) * max_length`` so that wall time, not the number of
utterances, is balanced.
"""

import logging
import math

from torch.utils.data import IterableDataset, Sampler

from .sync import rank_and_world_size

logger = logging.getLogger(__name__)

SORT_ORDERS = ("ascending", "descending", None)


def _check_sort(sort):
    if sort not in SORT_ORDERS:
        raise ValueError(f"sort must be one of {SORT_ORDERS}, not {sort!r}")


def sorted_order(lengths, descending=False):
    """Indices sorted by length; ties keep their original order (stable)."""
    # Stable in both directions: descending sorts on the negated length.
    sign = -1.0 if descending else 1.0
    return sorted(range(len(lengths)), key=lambda i: sign * lengths[i])


def fixed_size_batches(num_items, batch_size, lengths=None, sort="ascending"):
    """Consecutive chunks of ``batch_size`` items.

    With ``lengths`` and ``sort`` the items are length-sorted first (stable,
    so an already ascending-sorted dataset keeps its order and gets the same
    batches as a plain ``DataLoader(batch_size=...)``); with ``sort=None`` or
    no lengths the dataset order is kept.
    """
    _check_sort(sort)
    if batch_size is None or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
    batch_size = int(batch_size)
    if lengths is not None and len(lengths) != num_items:
        raise ValueError(f"{len(lengths)} lengths for {num_items} items")
    if lengths is not None and sort is not None:
        order = sorted_order(lengths, descending=sort == "descending")
    else:
        order = list(range(num_items))
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]


def dynamic_batches(lengths, max_batch_length, num_buckets=None, **sampler_kwargs):
    """The batches SpeechBrain's ``DynamicBatchSampler`` forms over ``lengths``.

    Example shuffling is off (``shuffle=False``) and nothing is dropped
    (``drop_last=False``); other keyword arguments (``bucket_boundaries``,
    ``max_batch_ex``, ``batch_ordering``...) are passed through.
    """
    from speechbrain.dataio.sampler import DynamicBatchSampler

    for key, value in (("shuffle", False), ("drop_last", False)):
        if sampler_kwargs.get(key, value) != value:
            raise ValueError(f"evaluation batches need {key}={value}")
        sampler_kwargs[key] = value
    sampler_kwargs.setdefault("batch_ordering", "ascending")
    sampler = DynamicBatchSampler(
        range(len(lengths)),
        max_batch_length=max_batch_length,
        num_buckets=num_buckets,
        lengths_list=list(lengths),
        **sampler_kwargs,
    )
    return [list(batch) for batch in sampler]


def plan_batches(lengths, batch_size=None, dynamic=None, sort="ascending"):
    """Global batch plan: ``dynamic`` (DynamicBatchSampler kwargs) or ``batch_size``."""
    if (batch_size is None) == (dynamic is None):
        raise ValueError("give exactly one of batch_size or dynamic")
    if dynamic is not None:
        return dynamic_batches(lengths, **dict(dynamic))
    return fixed_size_batches(len(lengths), batch_size, lengths=lengths, sort=sort)


def check_partition(batches, num_items):
    """Raise ``ValueError`` unless ``batches`` cover ``range(num_items)`` exactly once."""
    seen = [0] * num_items
    for batch in batches:
        for index in batch:
            if not 0 <= index < num_items:
                raise ValueError(f"batch index {index} outside a dataset of {num_items}")
            seen[index] += 1
    duplicated = [i for i, count in enumerate(seen) if count > 1]
    missing = [i for i, count in enumerate(seen) if count == 0]
    if duplicated or missing:
        raise ValueError(
            f"[samplers/DDP] batch plan is not a partition: duplicated indices {duplicated[:10]}"
            f" ({len(duplicated)}), missing {missing[:10]} ({len(missing)})"
            " (at fault: speechbrain.dataio.sampler)"
        )


def batch_cost(batch, lengths=None):
    """Padded size of a batch: ``len(batch) * max length`` (``len(batch)`` without lengths)."""
    if lengths is None or not batch:
        return float(len(batch))
    return float(len(batch)) * float(max(lengths[i] for i in batch))


def assign_batches(batches, world_size, lengths=None):
    """Batch positions per rank, balanced on padded cost (greedy LPT).

    Deterministic: every rank computes the same answer from the same input.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    costs = [batch_cost(b, lengths) for b in batches]
    by_cost = sorted(range(len(batches)), key=lambda i: (-costs[i], i))
    loads = [0.0] * world_size
    shares = [[] for _ in range(world_size)]
    for position in by_cost:
        rank = min(range(world_size), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(position)
        loads[rank] += costs[position]
    return [sorted(share) for share in shares]


def _batch_key(batch, lengths):
    if lengths is None or not batch:
        return 0.0
    return max(lengths[i] for i in batch)


class ShardedEvalBatchSampler(Sampler):
    """Batch sampler yielding this rank's whole batches of a global plan.

    Arguments
    ---------
    batches : list of list of int
        The global plan (see :func:`plan_batches`); must partition
        ``range(num_items)`` when ``num_items`` is given.
    lengths : sequence of float, optional
        Item lengths, for balancing and for ordering batches by length.
    rank, world_size : int, optional
        Default: from ``torch.distributed`` (0 and 1 when not initialised).
    sort : "ascending" | "descending" | None
        Order of this rank's batches (by their longest item) and of the items
        inside a batch. ``None`` keeps the plan's order.
    num_items : int, optional
        Dataset size, to check that the plan is a partition.
    """

    def __init__(
        self, batches, lengths=None, rank=None, world_size=None, sort="ascending", num_items=None
    ):
        _check_sort(sort)
        default_rank, default_world = rank_and_world_size()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.batches = [list(b) for b in batches]
        if num_items is not None:
            check_partition(self.batches, num_items)
        self.lengths = lengths
        self.sort = sort
        self.assignment = assign_batches(self.batches, self.world_size, lengths)
        mine = [self.batches[p] for p in self.assignment[self.rank]]
        if sort is not None and lengths is not None:
            descending = sort == "descending"
            mine = [sorted(b, key=lambda i: lengths[i], reverse=descending) for b in mine]
            mine.sort(key=lambda b: _batch_key(b, lengths), reverse=descending)
        self.rank_batches = mine
        #: Ids of the whole dataset (set by sharded_eval_loader_kwargs), for the ledger.
        self.item_ids = None

    @classmethod
    def fixed(cls, lengths, batch_size, rank=None, world_size=None, sort="ascending"):
        """Fixed-size batches over length-sorted items."""
        batches = fixed_size_batches(len(lengths), batch_size, lengths=lengths, sort=sort)
        return cls(batches, lengths, rank, world_size, sort=sort, num_items=len(lengths))

    @classmethod
    def dynamic(cls, lengths, rank=None, world_size=None, sort="ascending", **sampler_kwargs):
        """Dynamic batches (``DynamicBatchSampler`` kwargs, e.g. ``max_batch_length``)."""
        batches = dynamic_batches(lengths, **sampler_kwargs)
        return cls(batches, lengths, rank, world_size, sort=sort, num_items=len(lengths))

    @classmethod
    def from_batch_sampler(
        cls, batch_sampler, num_items, lengths=None, rank=None, world_size=None, sort="ascending"
    ):
        """Shard the batches of an existing, deterministic batch sampler.

        Its batches are materialised once; a sampler that drops items (or
        differs between processes) is refused by the partition check.
        """
        return cls(
            [list(b) for b in batch_sampler],
            lengths,
            rank,
            world_size,
            sort=sort,
            num_items=num_items,
        )

    def __iter__(self):
        for batch in self.rank_batches:
            yield list(batch)

    def __len__(self):
        return len(self.rank_batches)

    @property
    def indices(self):
        """This rank's item indices, in iteration order."""
        return [i for batch in self.rank_batches for i in batch]

    def set_epoch(self, epoch):  # noqa: D401 - DistributedSampler interface
        """Evaluation plans do not change between epochs."""

    def padding_ratio(self):
        """Padded frames / real frames - 1 over this rank's batches (needs lengths)."""
        if self.lengths is None:
            return math.nan
        real = sum(self.lengths[i] for b in self.rank_batches for i in b)
        padded = sum(batch_cost(b, self.lengths) for b in self.rank_batches)
        return padded / real - 1.0 if real else 0.0


def dataset_lengths(dataset, length_key="length"):
    """Per-item lengths of a SpeechBrain ``DynamicItemDataset`` (``None`` if unknown)."""
    data = getattr(dataset, "data", None)
    data_ids = getattr(dataset, "data_ids", None)
    if data is None or data_ids is None:
        return None
    try:
        return [float(data[data_id][length_key]) for data_id in data_ids]
    except (KeyError, TypeError, ValueError):
        return None


def dataset_ids(dataset):
    """Item ids of a ``DynamicItemDataset`` in dataset order (``None`` if unknown)."""
    data_ids = getattr(dataset, "data_ids", None)
    return None if data_ids is None else [str(i) for i in data_ids]


def sharded_eval_loader_kwargs(
    dataset, loader_kwargs, rank=None, world_size=None, length_key="length", sort="ascending"
):
    """DataLoader kwargs that make a VALID/TEST loader DDP-valid.

    Replaces ``batch_size`` (fixed batches over length-sorted items) or a given
    ``batch_sampler`` (e.g. ``DynamicBatchSampler`` with ``shuffle=False``:
    its batches are kept whole) with a :class:`ShardedEvalBatchSampler` for
    this rank. ``shuffle``, ``drop_last`` and ``sampler`` are not allowed:
    evaluation must see every item exactly once.
    """
    if isinstance(dataset, IterableDataset):
        raise TypeError("an IterableDataset cannot be sharded by index")
    kwargs = dict(loader_kwargs)
    if kwargs.pop("shuffle", False):
        raise ValueError("shuffle=True makes no sense for an evaluation loader")
    if kwargs.pop("drop_last", False):
        raise ValueError("drop_last=True would drop utterances from evaluation")
    if kwargs.get("sampler") is not None:
        raise ValueError("give batch_size or batch_sampler, not a sampler, to an evaluation loader")
    kwargs.pop("sampler", None)
    lengths = dataset_lengths(dataset, length_key)
    batch_sampler = kwargs.pop("batch_sampler", None)
    batch_size = kwargs.pop("batch_size", 1)
    if isinstance(batch_sampler, ShardedEvalBatchSampler):
        sharded = batch_sampler
    elif batch_sampler is not None:
        sharded = ShardedEvalBatchSampler.from_batch_sampler(
            batch_sampler, len(dataset), lengths, rank, world_size, sort=sort
        )
    else:
        if lengths is None:
            logger.warning(
                "No %r in the dataset: evaluation batches follow the dataset order", length_key
            )
        batches = fixed_size_batches(len(dataset), batch_size, lengths=lengths, sort=sort)
        sharded = ShardedEvalBatchSampler(
            batches, lengths, rank, world_size, sort=sort, num_items=len(dataset)
        )
    kwargs["batch_sampler"] = sharded
    return kwargs


def shard_items(
    items, lengths, rank=None, world_size=None, batch_size=None, dynamic=None, sort="ascending"
):
    """This rank's batches of ``items`` (e.g. ``(id, wav, words)`` tuples).

    The same plan as :func:`sharded_eval_loader_kwargs`, for code that does
    not go through a DataLoader (the pretrained interface's
    ``transcribe_batch``). Give ``batch_size`` or ``dynamic`` (a dict of
    ``DynamicBatchSampler`` kwargs such as ``max_batch_length``).
    """
    items = list(items)
    lengths = [float(x) for x in lengths]
    if len(items) != len(lengths):
        raise ValueError(f"{len(lengths)} lengths for {len(items)} items")
    batches = plan_batches(lengths, batch_size=batch_size, dynamic=dynamic, sort=sort)
    sampler = ShardedEvalBatchSampler(
        batches, lengths, rank, world_size, sort=sort, num_items=len(items)
    )
    return [[items[i] for i in batch] for batch in sampler]
