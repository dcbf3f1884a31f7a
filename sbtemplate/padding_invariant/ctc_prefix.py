"""SpeechBrain's CTC prefix scorer with its Python loops vectorised or slimmed.

``speechbrain.decoders.ctc.CTCPrefixScore.forward_step`` (1.1.2) walks every
beam row in Python three times per decoding step (to set the prefix's own
last token in ``phi``, to scatter the candidates' scores into ``psi`` and to
set the ``eos`` score), and every encoder frame once (the forward recursion of
the prefix probabilities, Algorithm 2 lines 11-12). At batch size 16 and
beam 8 the row loops are 384 small tensor operations per step; the frame loop
costs about 16 tensor operations per frame per step (a ``stack``, a
``logsumexp`` of pairs and their indexing), so a step costs time in
proportion to the longest utterance's frames, whatever the batch size: on
long-form audio it was the largest single cost of decoding.

:class:`VectorizedCTCPrefixScore` computes the same step with one indexed
assignment, one ``scatter_`` and one gather in place of the row loops (values
moved, not computed: bit for bit the stock ones), and runs the frame recursion
as two kernels per frame, ``torch.logaddexp`` of the pairs written in place
and the frame's log-probabilities added (:func:`forward_recursion`). The
recursion's values equal the stock ones to float rounding (``logaddexp``
computes ``max + log1p(exp(-|a - b|))``, ``logsumexp`` ``max + log(exp(a -
max) + exp(b - max))``; the tests bound the difference); each row is
computed on its own, so a row's result never depends on the other rows of
the batch. The padding-invariant beam searcher installs it on its CTC scorers
(:func:`vectorize_ctc_scorers`); the stock searcher keeps the stock one.
"""

import torch
from speechbrain.decoders.ctc import CTCPrefixScore
from speechbrain.decoders.scorer import CTCScorer


class VectorizedCTCPrefixScore(CTCPrefixScore):
    """``CTCPrefixScore`` without per-row Python loops and with a two-kernel frame loop."""

    @torch.no_grad()
    def forward_step(self, inp_tokens, states, candidates=None, attn=None):
        """One step of the CTC prefix score; same arguments and returns as the stock method."""
        n_bh = inp_tokens.size(0)
        beam_size = n_bh // self.batch_size
        last_char = inp_tokens
        self.prefix_length += 1
        self.num_candidates = self.vocab_size if candidates is None else candidates.size(-1)
        if states is None:
            r_prev = torch.full(
                (self.max_enc_len, 2, self.batch_size, beam_size),
                self.minus_inf,
                device=self.device,
            )
            r_prev[:, 1] = torch.cumsum(self.x[0, :, :, self.blank_index], 0).unsqueeze(2)
            r_prev = r_prev.view(-1, 2, n_bh)
            psi_prev = torch.full((n_bh, self.vocab_size), 0.0, device=self.device)
        else:
            r_prev, psi_prev = states

        rows = torch.arange(n_bh, device=self.device)
        if candidates is not None:
            cand_offset = self.batch_index * self.vocab_size
            scoring_table = torch.full(
                (n_bh, self.vocab_size), -1, dtype=torch.long, device=self.device
            )
            scoring_table[rows.unsqueeze(1), candidates] = torch.arange(
                self.num_candidates, device=self.device
            )
            scoring_index = (
                candidates + cand_offset.unsqueeze(1).repeat(1, beam_size).view(-1, 1)
            ).view(-1)
            x_inflate = torch.index_select(
                self.x.view(2, -1, self.batch_size * self.vocab_size), 2, scoring_index
            ).view(2, -1, n_bh, self.num_candidates)
        else:
            scoring_table = None
            x_inflate = (
                self.x.unsqueeze(3)
                .repeat(1, 1, 1, beam_size, 1)
                .view(2, -1, n_bh, self.num_candidates)
            )

        r = torch.full(
            (self.max_enc_len, 2, n_bh, self.num_candidates),
            self.minus_inf,
            device=self.device,
        )
        if self.prefix_length == 0:
            r[0, 0] = x_inflate[0, 0]
        r_sum = torch.logsumexp(r_prev, 1)
        phi = r_sum.unsqueeze(2).repeat(1, 1, self.num_candidates)
        # the stock loop over rows: phi[:, i, pos(last_char[i])] = r_prev[:, 1, i]
        if candidates is not None:
            pos = scoring_table[rows, last_char]
            hit = (pos != -1).nonzero(as_tuple=True)[0]
            phi[:, hit, pos[hit]] = r_prev[:, 1, hit]
        else:
            phi[:, rows, last_char] = r_prev[:, 1, :]

        if self.ctc_window_size == 0 or attn is None:
            start = max(1, self.prefix_length)
            end = self.max_enc_len
        else:
            _, attn_peak = torch.max(attn, dim=1)
            max_frame = torch.max(attn_peak).item() + self.ctc_window_size
            min_frame = torch.min(attn_peak).item() - self.ctc_window_size
            start = max(max(1, self.prefix_length), int(min_frame))
            end = min(self.max_enc_len, int(max_frame))

        forward_recursion(r, phi, x_inflate, start, end)

        psi_init = r[start - 1, 0].unsqueeze(0)
        phix = torch.cat((phi[0].unsqueeze(0), phi[:-1]), dim=0) + x_inflate[0]
        if candidates is not None:
            psi = torch.full((n_bh, self.vocab_size), self.minus_inf, device=self.device)
            psi_ = torch.logsumexp(torch.cat((phix[start:end], psi_init), dim=0), dim=0)
            # the stock loop over rows: psi[i, candidates[i]] = psi_[i]
            psi.scatter_(1, candidates, psi_)
        else:
            psi = torch.logsumexp(torch.cat((phix[start:end], psi_init), dim=0), dim=0)
        # the stock loop over rows: psi[i, eos] = r_sum[last_frame_index[i // beam], i]
        last_frames = self.last_frame_index.repeat_interleave(beam_size)
        psi[:, self.eos_index] = r_sum[last_frames, rows]
        if self.eos_index != self.blank_index:
            psi[:, self.blank_index] = self.minus_inf
        return psi - psi_prev, (r, psi, scoring_table)


def forward_recursion(r, phi, x, start, end):
    """Fill ``r[start:end]``: the CTC prefix forward probabilities, frame by frame.

    For each frame ``t`` (Algorithm 2, lines 11-12)::

        r[t, 0] = logaddexp(r[t-1, 0], phi[t-1]) + x[0, t]   # ends in the new token
        r[t, 1] = logaddexp(r[t-1, 0], r[t-1, 1]) + x[1, t]  # ends in blank

    Both lines of a frame are one ``torch.logaddexp`` and one in-place add on
    a work buffer laid out per frame as ``(r_nb, phi, r_b)``: the pair a
    frame reads, ``(phi, r_b)`` of the frame before, is contiguous, and the
    pair it writes, ``(r_nb, r_b)``, is a strided view.

    Arguments
    ---------
    r : torch.Tensor
        ``[frames, 2, rows, candidates]``; ``r[start - 1]`` is read, ``r[start:end]``
        written.
    phi : torch.Tensor
        ``[frames, rows, candidates]``.
    x : torch.Tensor
        ``[2, frames, rows, candidates]``: token and blank log-probabilities.
    start, end : int
        Frames to fill (``start >= 1``).
    """
    if end <= start:
        return
    work = r.new_empty((end, 3) + tuple(r.shape[2:]))
    work[start - 1 : end - 1, 1] = phi[start - 1 : end - 1]
    work[start - 1, 0] = r[start - 1, 0]
    work[start - 1, 2] = r[start - 1, 1]
    for t in range(start, end):
        previous = work[t - 1]
        out = work[t, 0::2]
        torch.logaddexp(previous[0:1], previous[1:3], out=out)
        out += x[:, t]
    r[start:end] = work[start:end, 0::2]


def vectorize_ctc_scorers(scorer):
    """Give every ``CTCScorer`` of a ``ScorerBuilder`` the vectorised prefix score.

    Called after the scorers' ``reset_mem`` (which builds a stock
    ``CTCPrefixScore`` per search): the object keeps its state, only its class
    changes (the subclass adds no state).
    """
    if scorer is None:
        return
    for impl in list(scorer.full_scorers.values()) + list(scorer.partial_scorers.values()):
        if isinstance(impl, CTCScorer) and type(impl.ctc_score) is CTCPrefixScore:
            impl.ctc_score.__class__ = VectorizedCTCPrefixScore


__all__ = ["VectorizedCTCPrefixScore", "forward_recursion", "vectorize_ctc_scorers"]
