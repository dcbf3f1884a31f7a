"""Padding-invariant beam and greedy search for the attentional RNN decoder.

The stock searchers (``speechbrain.decoders.seq2seq``) derive the decoding step
limits from the *padded* encoder length: a short utterance in a batch may
decode for as many steps as the longest one, and its unfinished beams are
force-closed when the longest one's budget runs out rather than its own.  That
(and the rounding of relative lengths, see
:mod:`sbtemplate.padding_invariant.lengths`) is where the batched insertions
come from.  The searchers here

* take exact integer encoder lengths: ``enc_lens=`` if given, else the
  ``frame_lengths`` attached by the padding-invariant encoder, else (with a
  warning) the stock ``round(relative * frames)``;
* trim the encoder output to the longest utterance;
* apply ``min_decode_ratio`` / ``max_decode_ratio`` to each utterance's own
  length;
* close each utterance's beams (fill them up with ``eos``) at its own last step,
  with that step's scores, exactly as a batch of one ends its loop.

They subclass the stock searchers and keep their constructor arguments, so the
hyperparameters and checkpoints stay the same.
"""

import warnings

import torch
from speechbrain.decoders.scorer import (
    CoverageScorer,
    CTCScorer,
    LengthScorer,
    RNNLMScorer,
    TransformerLMScorer,
)
from speechbrain.decoders.seq2seq import S2SRNNBeamSearcher, S2SRNNGreedySearcher
from speechbrain.nnet.attention import ContentBasedAttention, LocationAwareAttention
from speechbrain.utils.data_utils import undo_padding
from torch.distributions import Categorical

from .ctc_prefix import vectorize_ctc_scorers
from .lengths import frame_lengths_of, relative_lengths
from .sub_batches import (
    SEARCH_MAX_LENGTH_RATIO,
    length_groups,
    scatter_padded,
    scatter_rows,
)


def resolve_encoder_lengths(enc_states, wav_len, enc_lens=None):
    """Exact encoder frame counts for a padded batch of encoder states.

    Arguments
    ---------
    enc_states : torch.Tensor
        ``[batch, frames, dim]`` encoder output.
    wav_len : torch.Tensor
        Relative lengths as passed by ``EncoderDecoderASR`` (used only when no
        exact lengths are available).
    enc_lens : torch.Tensor, optional
        Exact integer encoder lengths; overrides everything else.

    Returns
    -------
    torch.LongTensor
        Lengths on ``enc_states.device``, in ``[1, frames]``.
    """
    T = enc_states.shape[1]
    if enc_lens is None:
        enc_lens = frame_lengths_of(enc_states)
    if enc_lens is None:
        warnings.warn(
            "Encoder output carries no exact frame lengths; taking the relative "
            "lengths as fractions of the encoder frames (exact only if they were "
            "computed on the encoder frames). Use the padding-invariant encoder "
            "or pass enc_lens=.",
            stacklevel=3,
        )
        enc_lens = torch.round(T * wav_len.double())
    enc_lens = torch.as_tensor(enc_lens).to(device=enc_states.device)
    return enc_lens.long().clamp(min=1, max=T)


def per_utterance_steps(searcher, enc_lens):
    """(min_steps, max_steps) lists: the stock formula on each own length.

    ``int(length * ratio)`` then the searcher's ``change_max_decoding_length``
    hook, exactly as the stock searcher computes them for a batch of one.  The
    maximum is at least one step (the stock search fails with zero steps).
    """
    mins, maxs = [], []
    for n in enc_lens.tolist():
        lo = int(n * searcher.min_decode_ratio)
        hi = int(n * searcher.max_decode_ratio)
        lo, hi = searcher.change_max_decoding_length(lo, hi)
        mins.append(lo)
        maxs.append(max(int(hi), 1))
    return mins, maxs


class _BeamState:
    """The search state of ``S2SBeamSearcher.init_beam_search_data``, by name."""

    #: What ``search_step`` takes before the encoder states, and returns (then ``scores``).
    STEPPED = (
        "alived_hyps",
        "inp_tokens",
        "log_probs",
        "eos_hyps",
        "memory",
        "scorer_memory",
        "attn",
        "prev_attn_peak",
    )

    def __init__(self, *initial):
        """``initial``: what ``init_beam_search_data`` returns, in its order."""
        for name, value in zip(self.STEPPED + ("enc_states", "enc_lens"), initial, strict=True):
            setattr(self, name, value)
        self.scores = None

    def step(self, searcher, step):
        """One stock ``search_step`` on this state."""
        outputs = searcher.search_step(
            *(getattr(self, name) for name in self.STEPPED), self.enc_states, self.enc_lens, step
        )
        for name, value in zip(self.STEPPED + ("scores",), outputs):
            setattr(self, name, value)


#: Scorers whose memory :func:`_compact_scorer_memory` knows how to select.
_ROW_SCORERS = (RNNLMScorer, TransformerLMScorer)
_COMPACTABLE_SCORERS = _ROW_SCORERS + (CoverageScorer, CTCScorer, LengthScorer)
_COMPACTABLE_ATTENTION = (LocationAwareAttention, ContentBasedAttention)


def compactable(searcher):
    """Whether finished utterances can leave this searcher's batch.

    True for SpeechBrain's attentional RNN decoder with location-aware or
    content-based attention and the RNNLM, TransformerLM, coverage, CTC and
    length scorers; anything else keeps every utterance to the end (correct,
    only slower).
    """
    attention = getattr(getattr(searcher, "dec", None), "attn", None)
    if not isinstance(attention, _COMPACTABLE_ATTENTION):
        return False
    scorer = getattr(searcher, "scorer", None)
    if scorer is None:
        return True
    scorers = list(scorer.full_scorers.values()) + list(scorer.partial_scorers.values())
    return all(isinstance(s, _COMPACTABLE_SCORERS) for s in scorers)


def _compact_scorer_memory(scorer, memory, rows, keep, frames):
    """One scorer's memory restricted to ``rows`` (and ``frames`` encoder frames)."""
    if memory is None:
        return None
    if isinstance(scorer, _ROW_SCORERS):
        return scorer.permute_mem(memory, rows)
    if isinstance(scorer, CoverageScorer):
        return memory[rows, :frames]
    if isinstance(scorer, CTCScorer):
        ctc = scorer.ctc_score
        ctc.x = ctc.x[:, :frames].index_select(2, keep).contiguous()
        ctc.max_enc_len = frames
        ctc.batch_size = len(keep)
        ctc.batch_index = torch.arange(len(keep), device=keep.device)
        ctc.last_frame_index = ctc.last_frame_index[keep]
        r, psi = memory
        return r[:frames].index_select(2, rows).contiguous(), psi[rows]
    raise TypeError(f"no compaction rule for {type(scorer).__name__}")


class PaddingInvariantBeamSearchMixin:
    """Per-utterance step limits and closing for any ``S2SBeamSearcher``.

    Mix in before the stock class:
    ``class X(PaddingInvariantBeamSearchMixin, S2SRNNBeamSearcher)``.
    """

    #: Longest/shortest length ratio within one searched group (None: no groups).
    max_length_ratio = SEARCH_MAX_LENGTH_RATIO
    #: Let utterances whose beams are all closed leave the batch (see :meth:`_search`).
    compact_finished = True

    def forward(self, enc_states, wav_len, enc_lens=None):
        """Beam search; same returns as ``S2SBeamSearcher.forward``.

        A batch of mixed lengths is searched in groups of similar length
        (:mod:`sbtemplate.padding_invariant.sub_batches`; the
        ``max_length_ratio`` attribute, ``None`` searches the batch whole):
        each utterance's hypotheses are those of a batch of one either way.

        Arguments
        ---------
        enc_states : torch.Tensor
            The encoder states to be attended.
        wav_len : torch.Tensor
            Relative lengths (see :func:`resolve_encoder_lengths`).
        enc_lens : torch.Tensor, optional
            Exact integer encoder lengths.
        """
        lengths = resolve_encoder_lengths(enc_states, wav_len, enc_lens)
        groups = length_groups(lengths, self.max_length_ratio)
        if len(groups) <= 1:
            topk = self._search(enc_states, lengths)
        else:
            topk = self._search_groups(enc_states, lengths, groups)
        topk_hyps, topk_lengths, topk_scores, topk_log_probs = topk
        if self.return_topk:
            return topk_hyps, topk_lengths, topk_scores, topk_log_probs
        best_hyps = topk_hyps[:, 0, :]
        best_lens = topk_lengths[:, 0]
        best_scores = topk_scores[:, 0]
        best_log_probs = topk_log_probs[:, 0, :]
        hyps = undo_padding(best_hyps, best_lens)
        return hyps, best_lens, best_scores, best_log_probs

    def _search_groups(self, enc_states, lengths, groups):
        """:meth:`_search` on each group, results put back in batch order.

        Hypothesis lengths are SpeechBrain relative lengths of the hypotheses'
        padded width, so they are rescaled to the width of the whole batch.
        """
        parts = []
        for rows in groups:
            index = torch.as_tensor(rows, device=enc_states.device)
            width = int(lengths[rows[0]])
            parts.append(self._search(enc_states[index, :width], lengths[index]))
        hyps, rel_lens, scores, log_probs = zip(*parts)
        width = max(h.shape[-1] for h in hyps)
        own_lens = [torch.round(r * h.shape[-1]) / width for r, h in zip(rel_lens, hyps)]
        batch = enc_states.shape[0]
        return (
            scatter_padded([h.transpose(1, 2) for h in hyps], groups, batch).transpose(1, 2),
            scatter_rows(own_lens, groups, batch),
            scatter_rows(scores, groups, batch),
            scatter_padded([p.transpose(1, 2) for p in log_probs], groups, batch).transpose(1, 2),
        )

    def _search(self, enc_states, lengths):
        """Beam search of one batch with exact lengths: the top-k tensors.

        With ``compact_finished`` (and a decoder and scorers it knows, see
        :func:`compactable`), an utterance whose beams are all closed leaves the
        batch at the end of that step: nothing that happens to the batch after
        that can change its hypotheses, so it stops costing steps.
        """
        T = int(lengths.max().item())
        enc_states = enc_states[:, :T]
        # The stock initialisation computes round(T * rel): exact for own/T.
        rel = relative_lengths(lengths, T)
        state = _BeamState(*self.init_beam_search_data(enc_states, rel))
        batch = self.batch_size

        mins, maxs = per_utterance_steps(self, lengths)
        self.min_decode_steps, self.max_decode_steps = mins, maxs
        self._min_steps_rows = torch.tensor(mins, device=self.device).repeat_interleave(
            self.beam_size
        )
        closing = {}
        for b, last in enumerate(maxs):
            closing.setdefault(last - 1, []).append(b)
        compact = self.compact_finished and compactable(self)
        active = list(range(batch))  # batch index of each row block still searched
        own_lengths = [int(n) for n in lengths.tolist()]
        finished = {}

        for step in range(max(maxs)):
            if self._check_full_beams(state.eos_hyps):
                break
            state.step(self, step)
            if step in closing:
                position = {b: k for k, b in enumerate(active)}
                self._close_utterances(
                    [position[b] for b in closing[step] if b in position],
                    state.alived_hyps,
                    state.eos_hyps,
                    state.scores,
                )
            if self._check_end_condition(state.alived_hyps):
                break
            if compact:
                done = [k for k, e in enumerate(state.eos_hyps) if len(e) == self.beam_size]
                if done and len(done) < len(active):
                    for k in done:
                        finished[active[k]] = state.eos_hyps[k]
                    keep = [k for k in range(len(active)) if k not in set(done)]
                    active = [active[k] for k in keep]
                    self._compact(state, keep, max(own_lengths[b] for b in active))

        finals = self._fill_alived_hyps_with_eos_token(
            state.alived_hyps, state.eos_hyps, state.scores
        )
        for k, b in enumerate(active):
            finished[b] = finals[k]
        self.batch_size, self.n_bh = batch, batch * self.beam_size
        self.beam_offset = torch.arange(batch, device=self.device) * self.beam_size
        return self._get_topk_prediction([finished[b] for b in range(batch)])

    def _compact(self, state, keep, frames):
        """Keep only the row blocks of the utterances at positions ``keep``.

        Every piece of search state indexed by batch or beam row is selected,
        and everything over encoder frames is cut to ``frames`` (the longest
        remaining utterance; the frames cut are padding for every one left).
        """
        beam = self.beam_size
        old_rows = self.n_bh
        device = state.enc_states.device
        keep_t = torch.tensor(keep, device=device)
        rows = (keep_t.unsqueeze(1) * beam + torch.arange(beam, device=device)).view(-1)

        hyps = state.alived_hyps
        hyps.alived_seq = hyps.alived_seq[rows]
        hyps.alived_log_probs = hyps.alived_log_probs[rows]
        hyps.sequence_scores = hyps.sequence_scores[rows]
        state.eos_hyps = [state.eos_hyps[k] for k in keep]
        state.inp_tokens = state.inp_tokens[rows]
        state.log_probs = state.log_probs[rows]
        state.scores = state.scores[rows]
        state.prev_attn_peak = state.prev_attn_peak[rows]
        state.attn = state.attn[
            rows, :frames
        ]  # [rows, frames] for the attentions compactable() accepts
        state.enc_states = state.enc_states[rows, :frames]
        state.enc_lens = state.enc_lens[rows]
        self._min_steps_rows = self._min_steps_rows[rows]

        state.memory = self.permute_mem(state.memory, rows)
        attention = self.dec.attn
        for name in ("precomputed_enc_h", "mask", "prev_attn"):
            value = getattr(attention, name, None)
            if value is None:
                continue
            if value.shape[0] == old_rows:  # not already selected by permute_mem
                value = value[rows]
            setattr(attention, name, value[:, :frames])

        if state.scorer_memory is not None:
            scorers = {**self.scorer.full_scorers, **self.scorer.partial_scorers}
            for name, memory in state.scorer_memory.items():
                state.scorer_memory[name] = _compact_scorer_memory(
                    scorers[name], memory, rows, keep_t, frames
                )

        self.batch_size = len(keep)
        self.n_bh = len(keep) * beam
        self.beam_offset = torch.arange(len(keep), device=device) * beam

    def _update_reset_memory(self, enc_states, enc_lens):
        """The stock reset, then the vectorised CTC prefix score (same values, faster)."""
        memory, scorer_memory = super()._update_reset_memory(enc_states, enc_lens)
        vectorize_ctc_scorers(self.scorer)
        return memory, scorer_memory

    def _close_utterances(self, utterances, alived_hyps, eos_hyps, scores):
        """Fill the given utterances' beams with eos, as at the end of their own loop."""
        for b in utterances:
            for index in range(b * self.beam_size, (b + 1) * self.beam_size):
                if len(eos_hyps[b]) == self.beam_size:
                    break
                eos_hyps[b].append(
                    (
                        alived_hyps.alived_seq[index, :],
                        alived_hyps.alived_log_probs[index, :],
                        scores[index].clone(),
                    )
                )

    def _set_eos_minus_inf_step(self, log_probs, step, min_decode_steps):
        """Block eos on the rows of utterances still below their own minimum."""
        block = step < self._min_steps_rows
        if bool(block.any()):
            log_probs[block, self.eos_index] = self.minus_inf
        return log_probs


class PaddingInvariantS2SRNNBeamSearcher(PaddingInvariantBeamSearchMixin, S2SRNNBeamSearcher):
    """``S2SRNNBeamSearcher`` with per-utterance step limits and exact lengths.

    Same constructor as ``speechbrain.decoders.S2SRNNBeamSearcher``.  Its
    ``forward(enc_states, wav_len, enc_lens=None)`` returns the hypotheses a
    batch of one would give for each utterance.
    """


class PaddingInvariantS2SRNNGreedySearcher(S2SRNNGreedySearcher):
    """``S2SRNNGreedySearcher`` with per-utterance step limits and exact lengths.

    Same constructor as ``speechbrain.decoders.S2SRNNGreedySearcher``.  Each
    utterance stops at its own ``eos`` or after ``int(own_length *
    max_decode_ratio)`` steps.  ``min_decode_ratio`` blocks ``eos`` before
    ``int(own_length * min_decode_ratio)`` steps (the stock greedy searcher
    instead starts its step counter there, which shortens the budget; the two
    agree for the usual ``min_decode_ratio: 0``).
    """

    @torch.no_grad()
    def forward(self, enc_states, wav_len, enc_lens=None):
        """Greedy search; same returns as ``S2SGreedySearcher.forward``."""
        lengths = resolve_encoder_lengths(enc_states, wav_len, enc_lens)
        T = int(lengths.max().item())
        enc_states = enc_states[:, :T]
        device = enc_states.device
        batch_size = enc_states.shape[0]
        enc_lens_int = lengths.int()

        mins, maxs = per_utterance_steps(self, lengths)
        self.min_decode_steps, self.max_decode_steps = mins, maxs
        min_t = torch.tensor(mins, device=device)
        max_t = torch.tensor(maxs, device=device)

        memory = self.reset_mem(batch_size, device=device)
        inp_tokens = enc_states.new_zeros(batch_size).fill_(self.bos_index).long()
        has_ended = enc_states.new_zeros(batch_size).bool()
        log_probs_lst = []
        for step in range(max(maxs)):
            logits, memory, _ = self.forward_step(inp_tokens, memory, enc_states, enc_lens_int)
            block = step < min_t
            if bool(block.any()):
                logits[block, self.eos_index] = -torch.inf
            if self.temperature == 0:
                inp_tokens = logits.argmax(dim=-1)
            else:
                inp_tokens = Categorical(logits=logits / self.temperature).sample()
            log_probs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
            log_probs_lst.append(log_probs)

            has_ended = has_ended | (inp_tokens == self.eos_index)
            log_probs[has_ended] = -torch.inf
            inp_tokens[has_ended] = self.eos_index
            # each utterance's own step budget
            has_ended = has_ended | (step + 1 >= max_t)
            if has_ended.all() or self._check_end_condition(memory):
                break

        log_probs = torch.stack(log_probs_lst, dim=1)
        scores, predictions = log_probs.max(dim=-1)
        mask = scores == -torch.inf
        scores[mask] = 0
        predictions[mask] = self.eos_index
        top_hyps, top_lengths, top_scores, top_log_probs = self._get_top_prediction(
            predictions, scores, log_probs
        )
        hyps = undo_padding(top_hyps[:, 0], top_lengths)
        return hyps, top_lengths, top_scores, top_log_probs


__all__ = [
    "PaddingInvariantBeamSearchMixin",
    "PaddingInvariantS2SRNNBeamSearcher",
    "PaddingInvariantS2SRNNGreedySearcher",
    "per_utterance_steps",
    "resolve_encoder_lengths",
]
