"""Padding-invariant batched decoding for the CRDNN + attention recognizer.

Batch size 8 gives the hypotheses of batch size 1: see
``docs/upstream-padding-fix.md`` for the leaks in SpeechBrain 1.1.2 and how each
component here closes one.

* :mod:`.lengths`: exact integer lengths, recovered once and carried along.
* :mod:`.encoder`: :class:`PaddingInvariantCRDNN`, :class:`PaddingInvariantEncoder`.
* :mod:`.search`: :class:`PaddingInvariantS2SRNNBeamSearcher`,
  :class:`PaddingInvariantS2SRNNGreedySearcher`.
* :mod:`.selection`: the ``padding_invariant`` YAML switch.
* :mod:`.sub_batches`: length groups inside one call (batching no longer
  changes a hypothesis, so a call may reorganise its work).
* :mod:`.ctc_prefix`: SpeechBrain's CTC prefix score without its per-row loops.
* :mod:`.convert`: :func:`make_padding_invariant`, one call for a recognizer
  loaded through SpeechBrain's own classes (the real model repos).
"""

from .convert import make_padding_invariant, padding_invariant_module
from .encoder import PaddingInvariantCRDNN, PaddingInvariantEncoder
from .lengths import FRAME_LENGTHS_ATTR, exact_lengths, frame_lengths_of
from .search import (
    PaddingInvariantBeamSearchMixin,
    PaddingInvariantS2SRNNBeamSearcher,
    PaddingInvariantS2SRNNGreedySearcher,
)

__all__ = [
    "FRAME_LENGTHS_ATTR",
    "PaddingInvariantBeamSearchMixin",
    "PaddingInvariantCRDNN",
    "PaddingInvariantEncoder",
    "PaddingInvariantS2SRNNBeamSearcher",
    "PaddingInvariantS2SRNNGreedySearcher",
    "exact_lengths",
    "frame_lengths_of",
    "make_padding_invariant",
    "padding_invariant_module",
]
