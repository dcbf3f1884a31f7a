"""sbtemplate.outcome_checks on their own: each check passes on a right
result and fails, naming its seam, on the wrong result it is there to catch."""

import random

import numpy as np
import pytest
import soundfile
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.decoders.scorer import RNNLMScorer
from speechbrain.lobes.models.RNNLM import RNNLM

from sbtemplate import outcome_checks as oc


def test_edit_counts_equal_jiwer():
    import jiwer

    rng = random.Random(0)
    words = "A B C D E".split()
    for _ in range(200):
        ref = [rng.choice(words) for _ in range(rng.randint(1, 8))]
        hyp = [rng.choice(words) for _ in range(rng.randint(0, 8))]
        edits, n = oc.edit_counts(ref, hyp)
        out = jiwer.process_words(" ".join(ref), " ".join(hyp) or "")
        assert edits == out.substitutions + out.deletions + out.insertions
        assert n == len(ref)


def test_check_wer_accepts_a_right_count_and_names_a_miscount():
    refs = {"a": "ONE TWO THREE", "b": "FOUR FIVE"}
    hyps = {"a": "ONE TOO THREE EXTRA", "b": "FOUR"}
    right = {"WER": 60.0, "num_edits": 3, "num_scored_tokens": 5, "num_scored_sents": 2}
    assert "60.00%" in oc.check_wer(right, hyps, refs, "test")
    wrong = {**right, "WER": 3 / 7 * 100}  # words + sentences in the denominator
    with pytest.raises(oc.OutcomeError, match=r"^\[scoring\] test: WER 42\.8571%"):
        oc.check_wer(wrong, hyps, refs, "test")
    with pytest.raises(oc.OutcomeError, match=r"^\[samplers/DDP\].*missing \['b'\]"):
        oc.check_wer(right, {"a": hyps["a"]}, refs, "test")


def _lm():
    torch.manual_seed(0)
    return RNNLM(
        output_neurons=20,
        embedding_dim=8,
        rnn_layers=1,
        dropout=0.0,
        rnn_neurons=16,
        dnn_blocks=1,
        dnn_neurons=8,
        return_hidden=True,
    ).eval()


def test_a_module_that_does_not_hold_its_file_is_named(tmp_path):
    lm = _lm()
    path = tmp_path / "lm.ckpt"
    torch.save(lm.state_dict(), path)
    assert "tensors equal" in oc.check_loadable_holds_file("lm", lm, path, "here")
    other = _lm()
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    with pytest.raises(oc.OutcomeError, match=r"^\[fetching/loading\] module 'lm' does not hold"):
        oc.check_loadable_holds_file("lm", other, path, "here")


class _Searcher:
    def __init__(self, scorer):
        self.scorer = type("Builder", (), {"full_scorers": {"rnnlm": scorer}})()


def test_lm_scores_are_recomputed_from_the_module(monkeypatch):
    lm = _lm()
    searcher = _Searcher(RNNLMScorer(lm))
    assert "log-softmax" in oc.check_lm_scores(searcher, lm, bos_index=1)
    original = RNNLMScorer.score

    def silenced(self, *args):
        log_probs, hidden = original(self, *args)
        return log_probs * 0.0, hidden

    monkeypatch.setattr(RNNLMScorer, "score", silenced)
    with pytest.raises(oc.OutcomeError, match=r"^\[LM in decoding\].*RNNLMScorer"):
        oc.check_lm_scores(searcher, lm, bos_index=1)
    with pytest.raises(oc.OutcomeError, match="another LM"):
        oc.check_lm_scores(searcher, _lm(), bos_index=1)


def _items(n, seed=1):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        tokens = [rng.randrange(3, 20) for _ in range(rng.randint(2, 7))]
        items.append(
            {
                "id": f"s{i}",
                "tokens_bos": torch.LongTensor([1] + tokens),
                "tokens_eos": torch.LongTensor(tokens + [2]),
            }
        )
    return items


class _Clip:
    max_grad_norm = 5.0


def _fit_batch(lm, optimizer, zero_grad=True, clip=_Clip):
    """A Brain-like fit_batch: masked mean NLL, clipping to ``clip.max_grad_norm``, Adam step."""

    def fit_batch(batch):
        tokens, _ = batch.tokens_bos
        targets, rel = batch.tokens_eos
        logits, _ = lm(tokens)
        logp = torch.log_softmax(logits, dim=-1)
        steps = targets.shape[1]
        mask = (torch.arange(steps)[None, :] < torch.round(rel * steps)[:, None]).float()
        nll = -logp.gather(2, targets.unsqueeze(2)).squeeze(2)
        ((nll * mask).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), clip.max_grad_norm)
        optimizer.step()
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)

    return fit_batch


def test_optimizer_steps_are_checked_against_adam_from_fresh_gradients():
    lm = _lm()
    items = _items(12)
    batches = [items[:4], items[4:8], items[8:]]
    norms = (5.0, 5.0, 1e-4)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    optimizer = torch.optim.Adam(lm.parameters(), lr=0.01)
    clip = _Clip()
    line = oc.check_optimizer_steps(
        _fit_batch(lm, optimizer, clip=clip), lm, optimizer, batches, norms, clipping=clip
    )
    assert line.startswith("optimizer steps: 3 Brain steps = Adam")
    # the LM, the optimizer and the clipping norm are as they were
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())
    assert not optimizer.state and clip.max_grad_norm == 5.0
    stale = _fit_batch(lm, optimizer, zero_grad=False, clip=clip)
    with pytest.raises(oc.OutcomeError, match=r"^\[fine-tuning step\] optimizer step 2"):
        oc.check_optimizer_steps(stale, lm, optimizer, batches, norms, clipping=clip)
    unclipped = _fit_batch(lm, optimizer, clip=_Clip())  # ignores the norm it is given
    with pytest.raises(oc.OutcomeError, match=r"^\[fine-tuning step\] optimizer step 3"):
        oc.check_optimizer_steps(unclipped, lm, optimizer, batches, norms, clipping=clip)
    slow = torch.optim.Adam(lm.parameters(), lr=0.01)
    slow_step = _fit_batch(lm, torch.optim.Adam(lm.parameters(), lr=0.001), clip=clip)
    with pytest.raises(oc.OutcomeError, match=r"^\[fine-tuning step\] optimizer step 1"):
        oc.check_optimizer_steps(slow_step, lm, slow, batches, norms, clipping=clip)


def test_token_nll_pads_from_the_items_own_lengths():
    lm = _lm()
    items = _items(3)
    with torch.no_grad():
        alone = [float(oc.token_nll(lm, [item])) for item in items]
        together = float(oc.token_nll(lm, items))
    counts = [len(item["tokens_bos"]) for item in items]
    assert together == pytest.approx(np.dot(alone, counts) / sum(counts), rel=1e-5)


def test_examples_seen_twice_or_missing_are_named():
    assert "each once" in oc.check_seen_once([["a", "b"], ["c"]], ["a", "b", "c"], "epoch 1")
    with pytest.raises(oc.OutcomeError, match=r"twice \['a'\], missing \['c'\]"):
        oc.check_seen_once([["a", "b"], ["a"]], ["a", "b", "c"], "epoch 1")
    assert oc.check_seen_once([["a"], []], ["a", "b"], "resumed", partial=True)
    with pytest.raises(oc.OutcomeError, match=r"^\[samplers/DDP\] epoch 1: ranks ran \[3, 2\]"):
        oc.check_batch_counts([3, 2], [3, 3], "epoch 1")


def _checkpoint(folder, name, value, lm, unixtime, end_of_epoch=True):
    ckpt = folder / f"CKPT+{name}"
    ckpt.mkdir(parents=True)
    (ckpt / "CKPT.yaml").write_text(
        f"valid_perplexity: {value}\nunixtime: {unixtime}\nend-of-epoch: {end_of_epoch}\n"
    )
    torch.save(lm.state_dict(), ckpt / "lm.ckpt")
    (ckpt / "counter.ckpt").write_text(f"{name}\n")


def test_the_recovered_checkpoint_must_be_the_best_and_resume_the_newest(tmp_path):
    good, bad = _lm(), _lm()
    with torch.no_grad():
        next(bad.parameters()).add_(1.0)
    _checkpoint(tmp_path, "1", 3.0, bad, 100.0)
    _checkpoint(tmp_path, "2", 2.0, good, 200.0)
    assert "CKPT+2" in oc.check_recovered_best(tmp_path, good, "valid_perplexity", [3.0, 2.0])
    with pytest.raises(oc.OutcomeError, match=r"^\[checkpoint/resume\] the LM recovered"):
        oc.check_recovered_best(tmp_path, bad, "valid_perplexity", [3.0, 2.0])
    with pytest.raises(oc.OutcomeError, match="the best epoch had 1.5"):
        oc.check_recovered_best(tmp_path, good, "valid_perplexity", [3.0, 1.5])
    counter = type("Counter", (), {"current": 2})()
    line, end_of_epoch = oc.check_resumed_from_newest(tmp_path, good, counter)
    assert "CKPT+2" in line and end_of_epoch
    with pytest.raises(oc.OutcomeError, match="does not start from the newest"):
        oc.check_resumed_from_newest(tmp_path, bad, counter)
    assert oc.check_resumed_from_newest(tmp_path / "none", good, counter) is None


def test_audio_read_through_speechbrain_equals_soundfile(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    entries = {}
    for i, n in enumerate((1600, 2400)):
        path = tmp_path / f"{i}.flac"
        soundfile.write(path, (rng.standard_normal(n) * 0.1).astype("float32"), 16000)
        entries[f"u{i}"] = {"wav": str(path)}
    assert "2 files equal" in oc.check_audio(entries)
    import speechbrain.dataio.dataio as dataio

    real = dataio.read_audio
    monkeypatch.setattr(dataio, "read_audio", lambda path: real(path)[:-1])
    with pytest.raises(oc.OutcomeError, match=r"^\[audio/data\] read_audio"):
        oc.check_audio(entries)
    monkeypatch.setattr(dataio, "read_audio", real)
    import speechbrain.dataio.batch as batch_module

    class ShortLengths(PaddedBatch):
        def __init__(self, examples, *args, **kwargs):
            super().__init__(examples, *args, **kwargs)
            wavs, lens = self.sig
            self.sig = type(self.sig)(wavs, lens * 0.5)

    monkeypatch.setattr(batch_module, "PaddedBatch", ShortLengths)
    with pytest.raises(oc.OutcomeError, match=r"^\[audio/data\] a padded batch"):
        oc.check_audio(entries)


def test_the_wer_bound_fails_a_doubled_wer():
    tolerance = {"points": 2.0, "relative": 0.25}
    for recorded in (5.0, 12.0, 25.0):
        bound = oc.wer_bound(recorded, tolerance)
        assert oc.check_quality(recorded * 1.1, bound, "x", "decoding", "here")
        with pytest.raises(oc.OutcomeError, match=r"^\[decoding\] x: WER"):
            oc.check_quality(recorded * 2, bound, "x", "decoding", "here")
