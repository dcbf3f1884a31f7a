"""Exact integer lengths: recovering them from relative lengths and carrying them.

SpeechBrain passes *relative* lengths (own length / padded length) between
stages and turns them back into frame counts by multiplying with the padded
length of whatever tensor is at hand (``round``, ``int`` or ``ceil``).  That is
exact only for the tensor the ratio was computed on: ``L / Lmax`` samples times
the padded number of *encoder frames* is not the number of encoder frames the
utterance has on its own.  The padding-invariant components therefore

* recover the exact sample count once, from the waveform's relative length and
  the waveform's own padded length (exact, see :func:`exact_lengths`);
* carry integer frame counts through every stage, each stage computing its
  output length from its input length exactly as it would for one utterance;
* hand the final counts to the searcher with the encoder output.

The last point uses a plain attribute on the encoder output tensor
(:data:`FRAME_LENGTHS_ATTR`).  ``EncoderDecoderASR.transcribe_batch`` passes the
encoder output object unchanged from ``mods.encoder`` to ``mods.decoder``
together with the *waveform's* relative lengths, from which the decoder alone
cannot recover encoder frame counts (it never sees the padded sample count).
The attribute travels with that very tensor object and nowhere else: any
operation that makes a new tensor drops it, in which case the searchers accept
the lengths explicitly (``enc_lens=``).
"""

import torch

#: Name of the attribute holding exact integer frame counts on an output tensor.
FRAME_LENGTHS_ATTR = "frame_lengths"


def exact_lengths(rel_lengths, padded_length):
    """Integer lengths from SpeechBrain relative lengths.

    ``round(rel * padded_length)`` computed in float64.  When ``rel`` was
    computed as ``L / padded_length`` and stored in float32, its relative error
    is below 2**-24, so the product is within 0.5 of ``L`` for any
    ``padded_length`` below 2**23 (8.7 minutes of 16 kHz audio): the sample
    count is recovered exactly.  ``None`` means every item is full length.

    Arguments
    ---------
    rel_lengths : torch.Tensor or None
        Relative lengths, shape ``[batch]``.
    padded_length : int
        Size of the padded axis the relative lengths refer to.

    Returns
    -------
    torch.LongTensor
        Lengths in ``[1, padded_length]`` (on the device of ``rel_lengths``).

    Example
    -------
    >>> rel = torch.tensor([16001 / 48000, 1.0])
    >>> exact_lengths(rel, 48000).tolist()
    [16001, 48000]
    """
    if rel_lengths is None:
        return None
    n = torch.round(rel_lengths.double() * padded_length).long()
    return n.clamp(min=1, max=padded_length)


def relative_lengths(lengths, padded_length):
    """SpeechBrain relative lengths ``lengths / padded_length`` (float32)."""
    return lengths.float() / float(padded_length)


def frames_mask(lengths, padded_length):
    """Boolean ``[batch, padded_length]`` mask, True on each item's own frames."""
    steps = torch.arange(padded_length, device=lengths.device)
    return steps.unsqueeze(0) < lengths.to(steps.device).unsqueeze(1)


def attach_frame_lengths(tensor, lengths):
    """Record exact frame counts on ``tensor`` (see the module docstring)."""
    setattr(tensor, FRAME_LENGTHS_ATTR, lengths)
    return tensor


def frame_lengths_of(tensor):
    """Exact frame counts recorded on ``tensor``, or None."""
    return getattr(tensor, FRAME_LENGTHS_ATTR, None)
