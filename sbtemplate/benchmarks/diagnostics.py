"""Per-stage padding-leak measurements: batched against one-by-one.

Each function runs one stage of a recognizer on a padded batch and on every
utterance alone and reports how far the batch's result is from the lone one,
for the stock classes and for the padding-invariant ones alike.  The tests pin
these figures and the padding benchmark reports them.

``asr`` below is an ``EncoderDecoderASR`` built from the project's inference
hyperparameters (either value of ``padding_invariant``): ``asr.mods.encoder``
holds ``compute_features``, ``normalize`` and ``model`` (the CRDNN) and
``asr.mods.decoder`` is the beam searcher.
"""

import torch

from sbtemplate.padding_invariant.encoder import (
    PaddingInvariantCRDNN,
    rnn_own_lengths,
    run_with_lengths,
)
from sbtemplate.padding_invariant.lengths import frame_lengths_of, relative_lengths
from sbtemplate.padding_invariant.search import (
    PaddingInvariantBeamSearchMixin,
    PaddingInvariantS2SRNNGreedySearcher,
)


def pad_batch(seqs):
    """Zero-pad a list of ``[time, ...]`` tensors; returns (batch, relative lengths)."""
    T = max(s.shape[0] for s in seqs)
    batch = seqs[0].new_zeros((len(seqs), T) + tuple(seqs[0].shape[1:]))
    for i, s in enumerate(seqs):
        batch[i, : s.shape[0]] = s
    rel = torch.tensor([s.shape[0] / T for s in seqs], device=seqs[0].device)
    return batch, rel


def _valid_diff(batch_out, lone_outs):
    return max(
        (batch_out[i, : o.shape[1]] - o[0]).abs().max().item() for i, o in enumerate(lone_outs)
    )


def is_padding_invariant(asr):
    """Whether the recognizer's CRDNN is the padding-invariant one."""
    return isinstance(asr.mods.encoder.model, PaddingInvariantCRDNN)


@torch.no_grad()
def feature_leak(asr, wavs):
    """Max |batched - alone| of the normalised features over each own frame."""
    wavs = [w.to(asr.device) for w in wavs]
    enc = asr.mods.encoder
    batch, rel = pad_batch(wavs)
    fb = enc.normalize(enc.compute_features(batch), torch.ones(len(wavs), device=asr.device))
    lone = [
        enc.normalize(enc.compute_features(w.unsqueeze(0)), torch.ones(1, device=asr.device))
        for w in wavs
    ]
    return _valid_diff(fb, lone)


@torch.no_grad()
def conv_boundary_leak(asr, wavs):
    """Max |batched - alone| after the CNN blocks, over each utterance's frames.

    The input is the same for both (each utterance's lone features, zero-padded
    into a batch), so only the convolutions' boundary handling differs.
    """
    wavs = [w.to(asr.device) for w in wavs]
    enc = asr.mods.encoder
    lone_feats = [
        enc.normalize(enc.compute_features(w.unsqueeze(0)), torch.ones(1, device=asr.device))[0]
        for w in wavs
    ]
    batch, _ = pad_batch(lone_feats)
    n = torch.tensor([f.shape[0] for f in lone_feats])
    cnn = enc.model.CNN
    if is_padding_invariant(asr):
        out, _ = run_with_lengths(cnn, batch, n)
    else:
        out = cnn(batch)
    return _valid_diff(out, [cnn(f.unsqueeze(0)) for f in lone_feats])


@torch.no_grad()
def rnn_leak(asr, wavs):
    """Max |batched - alone| after the recurrent layers, over each own frame.

    The RNN input is each utterance's lone pre-RNN activation, zero-padded into
    a batch, so only the recurrent layers' handling of the padding differs.
    """
    wavs = [w.to(asr.device) for w in wavs]
    enc = asr.mods.encoder
    model = enc.model
    pre = []
    for w in wavs:
        f = enc.normalize(enc.compute_features(w.unsqueeze(0)), torch.ones(1, device=asr.device))
        x = model.time_pooling(model.CNN(f))
        pre.append(x.reshape(1, x.shape[1], -1)[0])
    batch, _ = pad_batch(pre)
    n = torch.tensor([p.shape[0] for p in pre])
    if is_padding_invariant(asr):
        out = rnn_own_lengths(model.RNN, batch, n)
    else:
        out = model.RNN(batch)[0]
    return _valid_diff(out, [model.RNN(p.unsqueeze(0))[0] for p in pre])


@torch.no_grad()
def encoder_lengths(asr, wavs):
    """Encoder frame counts: each utterance alone, and as the decoder sees them batched.

    Returns ``(own, seen)`` lists.  The stock decoder sees
    ``round(wav_rel * padded encoder frames)``; the padding-invariant one the
    exact counts attached by the encoder.
    """
    wavs = [w.to(asr.device) for w in wavs]
    batch, rel = pad_batch(wavs)
    out = asr.encode_batch(batch, rel)
    own = [
        asr.encode_batch(w.unsqueeze(0), torch.ones(1, device=asr.device)).shape[1] for w in wavs
    ]
    seen = frame_lengths_of(out)
    if seen is None:
        seen = torch.round(out.shape[1] * rel)
    return own, [int(s) for s in seen]


@torch.no_grad()
def encoder_leak(asr, wavs):
    """Max |batched - alone| of the encoder output over each own frame."""
    wavs = [w.to(asr.device) for w in wavs]
    batch, rel = pad_batch(wavs)
    out = asr.encode_batch(batch, rel)
    lone = [asr.encode_batch(w.unsqueeze(0), torch.ones(1, device=asr.device)) for w in wavs]
    return _valid_diff(out, lone)


@torch.no_grad()
def search_leak(searcher, enc_outs):
    """Decode identical encoder states batched and alone.

    ``enc_outs`` are lone encoder outputs ``[1, T_i, D]``.  The batch gets the
    exact relative lengths ``T_i / max T`` (so no length rounding is involved):
    what remains is the searcher's own handling of the step limits.
    Returns ``(identical, total, max_score_diff, batch_hyps, lone_hyps)``.
    """
    batch, rel = pad_batch([e[0] for e in enc_outs])
    invariant = isinstance(
        searcher, (PaddingInvariantBeamSearchMixin, PaddingInvariantS2SRNNGreedySearcher)
    )
    if invariant:
        enc_lens = torch.tensor([e.shape[1] for e in enc_outs])
        hb, _, sb, _ = searcher(batch, rel, enc_lens=enc_lens)
    else:
        hb, _, sb, _ = searcher(batch, rel)
    lone = [searcher(e, torch.ones(1, device=e.device)) for e in enc_outs]
    hl = [out[0][0] for out in lone]
    sl = [out[2].reshape(-1)[0] for out in lone]
    sb = sb.reshape(len(enc_outs), -1)[:, 0]
    same = sum(a == b for a, b in zip(hb, hl))
    diff = max(abs(float(sb[i]) - float(s)) for i, s in enumerate(sl))
    return same, len(hl), diff, hb, hl


def lone_encoder_outputs(asr, wavs):
    """Each utterance's encoder output on its own, ``[1, T_i, D]``."""
    wavs = [w.to(asr.device) for w in wavs]
    with torch.no_grad():
        return [asr.encode_batch(w.unsqueeze(0), torch.ones(1, device=asr.device)) for w in wavs]


def stage_report(asr, wavs):
    """All per-stage figures for one recognizer, as a dict."""
    wavs = [w.to(asr.device) for w in wavs]
    own, seen = encoder_lengths(asr, wavs)
    same, total, score_diff, _, _ = search_leak(asr.mods.decoder, lone_encoder_outputs(asr, wavs))
    return {
        "features_max_diff": feature_leak(asr, wavs),
        "conv_boundary_max_diff": conv_boundary_leak(asr, wavs),
        "rnn_max_diff": rnn_leak(asr, wavs),
        "encoder_length_mismatches": sum(a != b for a, b in zip(own, seen)),
        "encoder_max_diff": encoder_leak(asr, wavs),
        "search_identical": same,
        "search_total": total,
        "search_max_score_diff": score_diff,
    }


__all__ = [
    "conv_boundary_leak",
    "encoder_leak",
    "encoder_lengths",
    "feature_leak",
    "is_padding_invariant",
    "lone_encoder_outputs",
    "pad_batch",
    "relative_lengths",
    "rnn_leak",
    "search_leak",
    "stage_report",
]
