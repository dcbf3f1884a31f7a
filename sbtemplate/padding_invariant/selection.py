"""One YAML switch between the padding-invariant and the stock classes.

The inference hyperparameters build their encoder and searcher through these
factories (``!apply:``), passing ``padding_invariant: !ref <padding_invariant>``
and the stock constructor arguments.  ``True`` (the default) gives the classes
of this package, ``False`` the stock SpeechBrain classes, e.g. for comparison::

    EncoderDecoderASR.from_hparams(source=..., overrides={"padding_invariant": False})

Both variants have the same parameter names, so the same checkpoint loads into
either.
"""

from speechbrain.decoders.seq2seq import S2SRNNBeamSearcher, S2SRNNGreedySearcher
from speechbrain.lobes.models.CRDNN import CRDNN
from speechbrain.nnet.containers import LengthsCapableSequential

from .encoder import PaddingInvariantCRDNN, PaddingInvariantEncoder
from .search import (
    PaddingInvariantS2SRNNBeamSearcher,
    PaddingInvariantS2SRNNGreedySearcher,
)


def crdnn(padding_invariant=True, **kwargs):
    """A ``CRDNN`` (stock) or :class:`PaddingInvariantCRDNN`."""
    cls = PaddingInvariantCRDNN if padding_invariant else CRDNN
    return cls(**kwargs)


def encoder(padding_invariant=True, input_shape=None, **layers):
    """A ``LengthsCapableSequential`` (stock) or :class:`PaddingInvariantEncoder`.

    ``layers`` are the named layers in order (compute_features, normalize, model).
    """
    cls = PaddingInvariantEncoder if padding_invariant else LengthsCapableSequential
    return cls(input_shape=input_shape, **layers)


def rnn_beam_searcher(padding_invariant=True, **kwargs):
    """An ``S2SRNNBeamSearcher`` (stock) or its padding-invariant subclass."""
    cls = PaddingInvariantS2SRNNBeamSearcher if padding_invariant else S2SRNNBeamSearcher
    return cls(**kwargs)


def rnn_greedy_searcher(padding_invariant=True, **kwargs):
    """An ``S2SRNNGreedySearcher`` (stock) or its padding-invariant subclass."""
    cls = PaddingInvariantS2SRNNGreedySearcher if padding_invariant else S2SRNNGreedySearcher
    return cls(**kwargs)
