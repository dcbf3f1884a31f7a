"""DDP-valid evaluation: shard the test set, gather the metric, fail together.

- :mod:`.sharding`: whole, length-sorted batches per rank; no padding by
  repetition, nothing dropped, same batches for every world size.
- :mod:`.sync`: sync points where ranks exchange an ok/error status on a gloo
  group with its own timeout, so a failing rank fails every rank.
- :mod:`.gather`: one gather of ``ErrorRateStats`` scores per stage, ledger
  check, per-rank lines and summary printed once, merged files from rank 0.
- :mod:`.brain`: ``DDPEvalMixin`` for ``speechbrain.Brain`` (VALID/TEST loaders,
  collective-free evaluation loop, ``gather_eval_stats``).
- :mod:`.runner`: ``evaluate_sharded`` for lists of utterances (pretrained
  interface).
"""

from .brain import DDPEvalMixin, sync_module_state, unwrapped_ddp
from .gather import (
    EvalReport,
    LedgerError,
    check_ledger,
    gather_error_rate_stats,
    merge_error_rate_stats,
    read_utterance_file,
)
from .runner import evaluate_sharded
from .sharding import (
    ShardedEvalBatchSampler,
    assign_batches,
    dynamic_batches,
    fixed_size_batches,
    plan_batches,
    shard_items,
    sharded_eval_loader_kwargs,
)
from .sync import (
    RankFailure,
    SyncLost,
    SyncPoint,
    exchange,
    new_eval_group,
    rank_and_world_size,
)

__all__ = [
    "DDPEvalMixin",
    "EvalReport",
    "LedgerError",
    "RankFailure",
    "ShardedEvalBatchSampler",
    "SyncLost",
    "SyncPoint",
    "assign_batches",
    "check_ledger",
    "dynamic_batches",
    "evaluate_sharded",
    "exchange",
    "fixed_size_batches",
    "gather_error_rate_stats",
    "merge_error_rate_stats",
    "new_eval_group",
    "plan_batches",
    "rank_and_world_size",
    "read_utterance_file",
    "shard_items",
    "sharded_eval_loader_kwargs",
    "sync_module_state",
    "unwrapped_ddp",
]
