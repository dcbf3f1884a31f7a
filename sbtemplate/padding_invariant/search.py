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
from speechbrain.decoders.seq2seq import S2SRNNBeamSearcher, S2SRNNGreedySearcher
from speechbrain.utils.data_utils import undo_padding
from torch.distributions import Categorical

from .lengths import frame_lengths_of, relative_lengths


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


class PaddingInvariantBeamSearchMixin:
    """Per-utterance step limits and closing for any ``S2SBeamSearcher``.

    Mix in before the stock class:
    ``class X(PaddingInvariantBeamSearchMixin, S2SRNNBeamSearcher)``.
    """

    def forward(self, enc_states, wav_len, enc_lens=None):  # noqa: C901
        """Beam search; same returns as ``S2SBeamSearcher.forward``.

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
        T = int(lengths.max().item())
        enc_states = enc_states[:, :T]
        # The stock initialisation computes round(T * rel): exact for own/T.
        rel = relative_lengths(lengths, T)
        (
            alived_hyps,
            inp_tokens,
            log_probs,
            eos_hyps_and_log_probs_scores,
            memory,
            scorer_memory,
            attn,
            prev_attn_peak,
            enc_states,
            enc_lens_bh,
        ) = self.init_beam_search_data(enc_states, rel)

        mins, maxs = per_utterance_steps(self, lengths)
        self.min_decode_steps, self.max_decode_steps = mins, maxs
        self._min_steps_rows = torch.tensor(
            mins, device=self.device
        ).repeat_interleave(self.beam_size)
        closing = {}
        for b, last in enumerate(maxs):
            closing.setdefault(last - 1, []).append(b)

        scores = None
        for step in range(max(maxs)):
            if self._check_full_beams(eos_hyps_and_log_probs_scores):
                break
            (
                alived_hyps,
                inp_tokens,
                log_probs,
                eos_hyps_and_log_probs_scores,
                memory,
                scorer_memory,
                attn,
                prev_attn_peak,
                scores,
            ) = self.search_step(
                alived_hyps,
                inp_tokens,
                log_probs,
                eos_hyps_and_log_probs_scores,
                memory,
                scorer_memory,
                attn,
                prev_attn_peak,
                enc_states,
                enc_lens_bh,
                step,
            )
            if step in closing:
                self._close_utterances(
                    closing[step], alived_hyps, eos_hyps_and_log_probs_scores, scores
                )
            if self._check_end_condition(alived_hyps):
                break

        finals = self._fill_alived_hyps_with_eos_token(
            alived_hyps, eos_hyps_and_log_probs_scores, scores
        )
        topk_hyps, topk_lengths, topk_scores, topk_log_probs = (
            self._get_topk_prediction(finals)
        )
        if self.return_topk:
            return topk_hyps, topk_lengths, topk_scores, topk_log_probs
        best_hyps = topk_hyps[:, 0, :]
        best_lens = topk_lengths[:, 0]
        best_scores = topk_scores[:, 0]
        best_log_probs = topk_log_probs[:, 0, :]
        hyps = undo_padding(best_hyps, best_lens)
        return hyps, best_lens, best_scores, best_log_probs

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


class PaddingInvariantS2SRNNBeamSearcher(
    PaddingInvariantBeamSearchMixin, S2SRNNBeamSearcher
):
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
            logits, memory, _ = self.forward_step(
                inp_tokens, memory, enc_states, enc_lens_int
            )
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
