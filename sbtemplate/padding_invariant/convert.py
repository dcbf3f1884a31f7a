"""Make a stock-loaded recognizer padding-invariant, in place, keeping its weights.

The real model repos (``speechbrain/asr-crdnn-rnnlm-librispeech`` and its
siblings) name SpeechBrain's own classes in their ``hyperparams.yaml``. The
padding-invariant classes of this package subclass exactly those classes with
the same constructors and parameters, adding only methods, so a loaded module
becomes padding-invariant by taking the subclass as its class: no weight is
copied, no state is rebuilt, and the checkpoint stays what it was::

    from speechbrain.inference.ASR import EncoderDecoderASR
    from sbtemplate.padding_invariant import make_padding_invariant

    asr = make_padding_invariant(
        EncoderDecoderASR.from_hparams(source="speechbrain/asr-crdnn-rnnlm-librispeech")
    )

After that, ``transcribe_batch`` gives each utterance the hypothesis it gets in
a batch of one, whatever the batch. A module of a class without a
padding-invariant counterpart raises ``TypeError`` naming it, instead of
decoding with a leak.
"""

from speechbrain.decoders.seq2seq import S2SRNNBeamSearcher, S2SRNNGreedySearcher
from speechbrain.lobes.models.CRDNN import CRDNN
from speechbrain.nnet.containers import LengthsCapableSequential

from .encoder import PaddingInvariantCRDNN, PaddingInvariantEncoder
from .search import PaddingInvariantS2SRNNBeamSearcher, PaddingInvariantS2SRNNGreedySearcher

#: Stock class -> its padding-invariant subclass (same constructor and state).
COUNTERPARTS = {
    LengthsCapableSequential: PaddingInvariantEncoder,
    CRDNN: PaddingInvariantCRDNN,
    S2SRNNBeamSearcher: PaddingInvariantS2SRNNBeamSearcher,
    S2SRNNGreedySearcher: PaddingInvariantS2SRNNGreedySearcher,
}
_INVARIANT = tuple(COUNTERPARTS.values())


def padding_invariant_module(module):
    """``module`` (and any stock CRDNN inside it) given its padding-invariant class.

    Usable from YAML: ``!apply:sbtemplate.padding_invariant.padding_invariant_module
    [!ref <encoder>]``. A module that already is padding-invariant is returned
    as it is.
    """
    if not isinstance(module, _INVARIANT):
        cls = COUNTERPARTS.get(type(module))
        if cls is None:
            raise TypeError(
                f"{type(module).__module__}.{type(module).__name__} has no padding-invariant "
                f"counterpart (known: {', '.join(c.__name__ for c in COUNTERPARTS)})"
            )
        module.__class__ = cls
    for inner in module.modules():
        if type(inner) is CRDNN:
            inner.__class__ = PaddingInvariantCRDNN
    return module


def padding_invariant_if(padding_invariant, module):
    """:func:`padding_invariant_module` of ``module`` if ``padding_invariant``, else ``module``.

    The YAML switch of a recipe that loads SpeechBrain's own classes::

        test_search: !apply:sbtemplate.padding_invariant.convert.padding_invariant_if
            - !ref <padding_invariant>
            - !ref <recognizer[decoder]>
    """
    return padding_invariant_module(module) if padding_invariant else module


def make_padding_invariant(asr):
    """Give a loaded ``EncoderDecoderASR`` padding-invariant decoding, in place.

    Converts ``asr.mods.encoder`` (a ``LengthsCapableSequential`` holding a
    ``CRDNN``) and ``asr.mods.decoder`` (an ``S2SRNNBeamSearcher`` or
    ``S2SRNNGreedySearcher``, with any of SpeechBrain's RNNLM, TransformerLM,
    coverage and CTC scorers). Returns ``asr``.
    """
    mods = getattr(asr, "mods", None)
    if mods is None or "encoder" not in mods or "decoder" not in mods:
        raise TypeError(
            f"{type(asr).__name__} has no mods.encoder / mods.decoder: "
            "make_padding_invariant takes an EncoderDecoderASR"
        )
    padding_invariant_module(mods.encoder)
    padding_invariant_module(mods.decoder)
    return asr
