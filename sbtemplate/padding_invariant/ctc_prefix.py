"""SpeechBrain's CTC prefix scorer with its per-row Python loops vectorised.

``speechbrain.decoders.ctc.CTCPrefixScore.forward_step`` (1.1.2) walks every
beam row in Python three times per decoding step (to set the prefix's own
last token in ``phi``, to scatter the candidates' scores into ``psi`` and to
set the ``eos`` score). At batch size 16 and beam 8 that is 384 small tensor
operations per step, which no batching amortises: it was the largest cost of a
batched step that grows with the batch.

:class:`VectorizedCTCPrefixScore` computes the same step with one indexed
assignment, one ``scatter_`` and one gather in place of the three loops; every
other line is the stock method's. The values are the stock ones bit for bit
(the loops only move values, no arithmetic changes): the tests compare both on
the same states. The padding-invariant beam searcher installs it on its CTC
scorers (:func:`vectorize_ctc_scorers`); the stock searcher keeps the stock one.
"""

import torch
from speechbrain.decoders.ctc import CTCPrefixScore
from speechbrain.decoders.scorer import CTCScorer


class VectorizedCTCPrefixScore(CTCPrefixScore):
    """``CTCPrefixScore`` whose ``forward_step`` has no per-row Python loops."""

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

        for t in range(start, end):
            rnb_prev = r[t - 1, 0]
            rb_prev = r[t - 1, 1]
            r_ = torch.stack([rnb_prev, phi[t - 1], rnb_prev, rb_prev]).view(
                2, 2, n_bh, self.num_candidates
            )
            r[t] = torch.logsumexp(r_, 1) + x_inflate[:, t]

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


__all__ = ["VectorizedCTCPrefixScore", "vectorize_ctc_scorers"]
