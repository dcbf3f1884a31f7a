"""Pieces of the LM fine-tuning recipe, in-process and fast: DDP dynamic
batching plans, frozen modules and their digests, token-length datasets."""

import pytest
import torch

from sbtemplate.ddp_dynamic_batching import (
    DistributedDynamicBatchSampler,
    NotEnoughBatches,
    equalize_batches,
    padding_stats,
)
from sbtemplate.frozen import FrozenModule, freeze, state_digest, trainable_parameters

LENGTHS = [3 + (7 * i) % 23 for i in range(101)]
OPTIONS = dict(
    max_batch_length=120,
    num_buckets=4,
    shuffle=True,
    batch_ordering="random",
    max_batch_ex=16,
    seed=7,
)


def shares(world_size, epoch=0, lengths=LENGTHS, **options):
    options = {**OPTIONS, **options}
    return [
        DistributedDynamicBatchSampler(
            lengths, rank=r, world_size=world_size, epoch=epoch, **options
        )
        for r in range(world_size)
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_equal_batch_counts_and_every_item_once(world_size):
    samplers = shares(world_size)
    counts = {len(s) for s in samplers}
    assert len(counts) == 1, "every rank must get the same number of batches"
    items = sorted(i for s in samplers for b in s for i in b)
    assert items == list(range(len(LENGTHS))), "nothing dropped, nothing repeated"
    for s in samplers:
        for batch in s:
            assert len(batch) * max(LENGTHS[i] for i in batch) <= OPTIONS["max_batch_length"]


def test_plan_is_deterministic_per_epoch_and_changes_between_epochs():
    a, b = shares(2, epoch=3), shares(2, epoch=3)
    assert [list(s) for s in a] == [list(s) for s in b]
    a[0].set_epoch(4)
    assert list(a[0]) != list(b[0])
    b[0].set_epoch(4)
    assert list(a[0]) == list(b[0])


def test_fewer_batches_than_ranks_is_a_clear_error():
    with pytest.raises(NotEnoughBatches, match="2 batches for a world size of 3"):
        equalize_batches([[0, 1], [2]], 3)
    with pytest.raises(NotEnoughBatches, match="world size of 2"):
        shares(
            2,
            lengths=[5, 6, 7],
            max_batch_length=1000,
            num_buckets=None,
            bucket_boundaries=[10],
            max_batch_ex=100,
        )
    with pytest.raises(NotEnoughBatches, match="cannot be shared equally"):
        equalize_batches([[0], [1], [2]], 2)


def test_splitting_keeps_items_and_balances_counts():
    batches = equalize_batches([[0, 1, 2, 3], [4], [5, 6]], 2)
    assert len(batches) == 4 and sorted(i for b in batches for i in b) == list(range(7))


def test_padding_stats():
    stats = padding_stats([[0, 1], [2]], [2, 4, 3])
    assert stats == {
        "batches": 2,
        "items": 3,
        "real": 9.0,
        "padded": 11.0,
        "padding_fraction": pytest.approx(2 / 11),
    }


def test_frozen_module_stays_in_eval_mode_and_has_no_gradients():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    frozen = freeze(net)
    assert isinstance(frozen, FrozenModule) and freeze(frozen) is frozen
    holder = torch.nn.ModuleDict({"frozen": frozen, "lm": torch.nn.Linear(2, 2)})
    holder.train()
    assert not frozen.training and not net[1].training
    assert holder["lm"].training
    assert all(not p.requires_grad for p in net.parameters())
    assert trainable_parameters(holder) == list(holder["lm"].parameters())


def test_digest_sees_parameters_buffers_and_normaliser_statistics():
    from speechbrain.processing.features import InputNormalization

    net = torch.nn.Linear(2, 2)
    before = state_digest(net)
    assert state_digest(net) == before
    with torch.no_grad():
        net.weight[0, 0] += 1e-7
    assert state_digest(net) != before

    norm = InputNormalization(norm_type="global")
    norm(torch.randn(2, 5, 3), torch.ones(2))  # train mode: statistics update
    digest = state_digest(norm)
    frozen = freeze(norm)
    frozen(torch.randn(2, 5, 3) + 10, torch.ones(2))  # eval mode: no update
    assert state_digest(norm) == digest
    norm.train()
    norm(torch.randn(2, 5, 3) + 10, torch.ones(2))
    assert state_digest(norm) != digest


def test_lm_text_dataset_lengths_are_token_counts():
    from sbtemplate.base_recognizer import lm_text_dataset

    class Tok:
        def encode_as_ids(self, words):
            return [3 + len(w) for w in words.split()]

    data = lm_text_dataset({"a": "ONE TWO", "b": "THREE"}, Tok(), 1, 2)
    assert [data.data[i]["length"] for i in data.data_ids] == [3, 2]
    item = data[0]
    assert item["tokens_bos"].tolist() == [1, 6, 6] and item["tokens_eos"].tolist() == [6, 6, 2]


def test_launcher_options_are_taken_out_of_the_arguments():
    from sbtemplate.run_setup import pop_option

    argv = ["finetune.yaml", "--local-rank", "1", "--lr=0.1"]
    assert pop_option(argv, "--local-rank") == "1" and argv == ["finetune.yaml", "--lr=0.1"]
    argv = ["finetune.yaml", "--local_rank=0"]
    assert pop_option(argv, "--local_rank") == "0" and argv == ["finetune.yaml"]
    assert pop_option(argv, "--local_rank") is None
