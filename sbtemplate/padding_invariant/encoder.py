"""Length-aware encoder path: padding-invariant CRDNN and feature pipeline.

Two subclasses of SpeechBrain classes, with the stock constructors and therefore
the stock parameter names (checkpoints load unchanged):

* :class:`PaddingInvariantCRDNN` (a ``speechbrain.lobes.models.CRDNN.CRDNN``)
  runs the stock layers, but walks them with each utterance's exact frame
  count: before every time-padded convolution it writes each utterance's own
  boundary padding (its reflection) just past its own end, it computes the time
  pooling's output length exactly, and it runs the recurrent layers on each
  utterance's own length (each direction within its own frames).
* :class:`PaddingInvariantEncoder` (a
  ``speechbrain.nnet.containers.LengthsCapableSequential``) is the
  ``compute_features -> normalize -> model`` chain of the inference
  hyperparameters.  It recovers exact sample counts from the relative lengths,
  zeroes the waveform padding, derives exact feature-frame counts from the
  STFT's hop, and returns the encoder output with the exact encoder frame
  counts attached (see :mod:`sbtemplate.padding_invariant.lengths`).

In both, every frame past an utterance's own length is set to zero in the
output, so the output does not depend on what the padding held.

A layer type without a rule here raises ``TypeError`` instead of silently
leaking; frame-wise layers (linear, normalisation over features, activations,
dropout, pooling over the feature axis) need none.
"""

import functools

import torch
from speechbrain.lobes.models.CRDNN import CRDNN
from speechbrain.nnet import RNN as sb_rnn
from speechbrain.nnet.CNN import Conv2d, get_padding_elem
from speechbrain.nnet.containers import LengthsCapableSequential, Sequential
from speechbrain.nnet.dropout import Dropout2d
from speechbrain.nnet.linear import Linear
from speechbrain.nnet.normalization import (
    BatchNorm1d,
    BatchNorm2d,
    LayerNorm,
)
from speechbrain.nnet.pooling import Pooling1d, Pooling2d
from speechbrain.processing.features import InputNormalization

from .lengths import (
    attach_frame_lengths,
    exact_lengths,
    frames_mask,
    relative_lengths,
)
from .sub_batches import (
    ENCODER_MAX_LENGTH_RATIO,
    length_groups,
    scatter_padded,
    scatter_rows,
)

# Layers that act on each frame on its own (in eval mode): no length rule needed.
FRAMEWISE_LAYERS = (
    Linear,
    LayerNorm,
    BatchNorm1d,
    BatchNorm2d,
    Dropout2d,
    torch.nn.Linear,
    torch.nn.LayerNorm,
    torch.nn.Dropout,
    torch.nn.Identity,
    torch.nn.LeakyReLU,
    torch.nn.ReLU,
    torch.nn.PReLU,
    torch.nn.ELU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Tanh,
    torch.nn.Sigmoid,
)

# SpeechBrain recurrent wrappers around a torch.nn.RNNBase (``.rnn``).
TORCH_BACKED_RNNS = (sb_rnn.RNN, sb_rnn.LSTM, sb_rnn.GRU)
# Recurrent layers without a torch.nn.RNNBase: run one utterance at a time.
UNTORCH_BACKED_RNNS = (sb_rnn.LiGRU, sb_rnn.SLiGRU, sb_rnn.QuasiRNN)


# --------------------------------------------------------------------------- #
# Convolution boundary
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=256)
def _own_padding_index(lengths, T, pad, mode):
    """(rows, destination frames, source frames or None) for fill_own_padding."""
    rows, dst, src = [], [], []
    for b, n in enumerate(lengths):
        if n >= T:
            continue
        for j in range(pad):
            if n + j >= T:
                break
            rows.append(b)
            dst.append(n + j)
            if mode == "reflect":
                src.append(max(n - 2 - j, 0))
            elif mode == "replicate":
                src.append(n - 1)
    if not rows:
        return None
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return as_long(rows), as_long(dst), (as_long(src) if src else None)


def fill_own_padding(x, lengths, pad, mode="reflect", inplace=False):
    """Write each item's own boundary padding just past its own end.

    ``torch.nn.functional.pad`` applied to a padded batch pads at the *batch*
    tensor's edge, so a short utterance's last frames see the batch padding
    instead of their own reflection.  This writes, for every item shorter than
    the tensor, the ``pad`` frames that padding the item alone would have put
    after its last frame (a small gather).  Time is axis 1.  Unless
    ``inplace``, the input is not modified (a copy is returned when there is
    anything to write).

    Arguments
    ---------
    x : torch.Tensor
        ``[batch, time, ...]``.
    lengths : torch.LongTensor
        Exact lengths, ``[batch]``.
    pad : int
        Number of frames the convolution pads on the right.
    mode : str
        The ``torch.nn.functional.pad`` mode of the convolution: ``reflect``,
        ``replicate`` or ``constant`` (zeros).
    inplace : bool
        Write into ``x``.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.

    Example
    -------
    >>> x = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    >>> fill_own_padding(x, torch.tensor([3, 5]), pad=1)[0].tolist()
    [1.0, 2.0, 3.0, 2.0, 0.0]
    """
    if mode not in ("reflect", "replicate", "constant"):
        raise ValueError(f"Unsupported padding mode {mode!r}")
    if pad <= 0:
        return x
    index = _own_padding_index(tuple(lengths.tolist()), x.shape[1], pad, mode)
    if index is None:
        return x
    rows, dst, src = (None if t is None else t.to(x.device) for t in index)
    if not inplace:
        x = x.clone()
    if src is None:
        x[rows, dst] = 0.0
    else:
        x[rows, dst] = x[rows, src]
    return x


def conv2d_own_padding(conv, x, lengths, inplace=False):
    """Stock ``speechbrain.nnet.CNN.Conv2d`` forward with per-utterance padding.

    The convolution itself is the stock module's forward; only the frames just
    past each utterance's end are replaced first (:func:`fill_own_padding`,
    into ``x`` itself if ``inplace``).  When an utterance's own padding would
    reach past the tensor's end, the tensor is first extended with zero frames,
    and the output trimmed back.
    """
    if conv.swap or conv.skip_transpose:
        raise TypeError("Conv2d with swap/skip_transpose has no length rule here")
    if conv.padding in ("causal", "valid"):
        if conv.padding == "valid":
            raise TypeError("Conv2d padding='valid' changes the length: no rule here")
        return conv(x)  # causal: pads on the left only, no leak from the right
    if conv.stride[-1] != 1:
        raise TypeError("Conv2d with a time stride has no length rule here")
    if conv.padding_mode not in ("reflect", "replicate", "constant"):
        # circular padding also wraps each start around to the batch's end
        raise TypeError(f"Conv2d padding_mode={conv.padding_mode!r}: no rule here")
    pad = get_padding_elem(
        conv.in_channels, conv.stride[-1], conv.kernel_size[-1], conv.dilation[-1]
    )[1]
    T = x.shape[1]
    short = lengths < T
    if not bool(short.any()):
        return conv(x)
    if bool((short & (lengths + pad > T)).any()):
        # a short item's own padding passes the tensor's end: extend it, sized
        # for every item (after extension even full-length items are short)
        extra = int(lengths.max()) + pad - T
        tail = x.new_zeros((x.shape[0], extra) + tuple(x.shape[2:]))
        x = torch.cat([x, tail], dim=1)
        inplace = True  # a fresh tensor
    x = fill_own_padding(x, lengths, pad, conv.padding_mode, inplace=inplace)
    out = conv(x)
    return out[:, :T] if out.shape[1] > T else out


# --------------------------------------------------------------------------- #
# Pooling over time
# --------------------------------------------------------------------------- #
def _pool_axis_params(pool):
    """{axis: (kernel, stride, padding, dilation)} of a SpeechBrain pooling layer, or None."""
    layer = pool.pool_layer
    values = (layer.kernel_size, layer.stride, layer.padding, getattr(layer, "dilation", 1))

    def pick(value, i):  # the i-th of a per-axis pair, or the one value of every axis
        return value[i] if isinstance(value, (tuple, list)) else value

    if isinstance(pool, Pooling1d):  # input_dims=4 pools with (1, k): the last of each pair
        return {pool.pool_axis: tuple(pick(v, -1) for v in values)}
    if isinstance(pool, Pooling2d):
        return {a: tuple(pick(v, i) for v in values) for i, a in enumerate(tuple(pool.pool_axis))}
    return None


def _time_pool_params(pool):
    """(kernel, stride, padding, dilation, ceil_mode) along time, or None."""
    params = _pool_axis_params(pool)
    if params is None or 1 not in params:
        return None
    return params[1] + (pool.pool_layer.ceil_mode,)


def _pool_axes(pool, ndim):
    """[(axis, kernel)] of a SpeechBrain max pooling that tiles its axes, else None.

    Tiling: max pooling, stride equal to the kernel, no padding, dilation 1,
    floor mode. Axes are counted from the front of a ``ndim``-dimensional input.
    """
    layer = pool.pool_layer
    if not isinstance(layer, (torch.nn.MaxPool1d, torch.nn.MaxPool2d)) or layer.ceil_mode:
        return None
    params = _pool_axis_params(pool)
    if params is None:
        return None
    for kernel, stride, padding, dilation in params.values():
        if stride != kernel or padding != 0 or dilation != 1:
            return None
    return [(axis % ndim, kernel) for axis, (kernel, *_) in params.items()]


def max_pool_tiled(pool, x):
    """A SpeechBrain max pooling layer's output, computed as element-wise maxima.

    The stock ``Pooling1d``/``Pooling2d`` transpose the pooled axis to the end
    and call ``max_pool2d`` on the strided view, which on a CPU costs about
    30 times the maxima themselves (16 ms against 0.5 ms for a batch of 16
    three-second utterances after the first CNN block). When the pooling tiles
    its axes (see :func:`_pool_axes`), each output is the maximum of its
    ``kernel`` inputs: ``torch.maximum`` over strided slices gives exactly the
    stock values. Other poolings run the stock layer.
    """
    axes = _pool_axes(pool, x.ndim)
    if axes is None:
        return pool(x)
    for axis, kernel in axes:
        n = x.shape[axis] // kernel
        tiles = x.narrow(axis, 0, n * kernel).unflatten(axis, (n, kernel))
        out = tiles.select(axis + 1, 0)
        for j in range(1, kernel):
            out = torch.maximum(out, tiles.select(axis + 1, j))
        x = out
    return x


def pooled_lengths(pool, lengths):
    """Exact output lengths of a SpeechBrain pooling layer (identity if not over time)."""
    params = _time_pool_params(pool)
    if params is None:
        return lengths
    kernel, stride, padding, dilation, ceil_mode = params
    if padding != 0 or ceil_mode:
        raise TypeError(
            "Time pooling with padding or ceil_mode pools the batch padding "
            "into the last window: no length rule here"
        )
    # floor((n - dilation*(kernel-1) - 1) / stride) + 1, never below 0
    span = dilation * (kernel - 1) + 1
    return torch.div(lengths - span, stride, rounding_mode="floor").clamp(min=-1) + 1


# --------------------------------------------------------------------------- #
# Recurrent layers
# --------------------------------------------------------------------------- #
_RNN_FUNCTIONS = {
    "LSTM": torch.lstm,
    "GRU": torch.gru,
    "RNN_TANH": torch.rnn_tanh,
    "RNN_RELU": torch.rnn_relu,
}


def reverse_within(x, lengths):
    """Reverse each item along time within its own length (padding stays put)."""
    B, T = x.shape[0], x.shape[1]
    t = torch.arange(T, device=x.device).unsqueeze(0)
    n = lengths.to(x.device).unsqueeze(1)
    index = torch.where(t < n, n - 1 - t, t)
    return x.gather(1, index.view(B, T, 1).expand(B, T, x.shape[2]))


def _direction_params(rnn, layer, reverse):
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if rnn.bias else [])
    return [getattr(rnn, name + suffix) for name in names]


def _run_direction(rnn, x, params):
    """One layer, one direction of a ``torch.nn.RNNBase``, from a zero state."""
    h0 = x.new_zeros(1, x.shape[0], rnn.hidden_size)
    if rnn.mode == "LSTM":
        return torch.lstm(x, (h0, h0), params, rnn.bias, 1, 0.0, False, False, True)[0]
    return _RNN_FUNCTIONS[rnn.mode](x, h0, params, rnn.bias, 1, 0.0, False, False, True)[0]


def torch_rnn_own_lengths(rnn, x, lengths):
    """A batch-first ``torch.nn.RNNBase`` run on each item's own length, unpacked.

    Layer by layer: the forward direction runs on the padded batch as it is
    (padding only follows the valid frames); the backward direction runs on
    each item reversed within its own length, so it starts from a zero state at
    the item's own last frame, and is reversed back.  This is the arithmetic
    of the stock module (the same ``torch.lstm``/``torch.gru`` kernels and
    weights, one direction at a time) without packed sequences, which are 1.3
    to 3 times slower on CPU at these sizes.  Frames past each length hold
    arbitrary values.
    """
    if getattr(rnn, "proj_size", 0) or not rnn.batch_first:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=rnn.batch_first, enforce_sorted=False
        )
        out, _ = rnn(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(
            out, batch_first=rnn.batch_first, total_length=x.shape[1]
        )
        return out
    for layer in range(rnn.num_layers):
        if layer > 0 and rnn.training and rnn.dropout > 0:
            x = torch.nn.functional.dropout(x, rnn.dropout, True)
        out = _run_direction(rnn, x, _direction_params(rnn, layer, False))
        if rnn.bidirectional:
            back = _run_direction(
                rnn, reverse_within(x, lengths), _direction_params(rnn, layer, True)
            )
            out = torch.cat([out, reverse_within(back, lengths)], dim=-1)
        x = out
    return x


def rnn_own_lengths(rnn, x, lengths):
    """Run a SpeechBrain recurrent layer on each utterance's own length.

    ``speechbrain.nnet.RNN.{RNN,LSTM,GRU}`` run their ``torch.nn.RNNBase`` with
    :func:`torch_rnn_own_lengths` (SpeechBrain's own packing would use
    ``relative * T`` truncated towards zero).  Recurrent layers without a
    ``torch.nn.RNNBase`` are run one utterance at a time on its own frames.
    Without padding at all, the stock forward is used unchanged.
    """
    B, T = x.shape[0], x.shape[1]
    if x.ndim == 4:
        x = x.reshape(B, T, x.shape[2] * x.shape[3])
    lengths = lengths.clamp(min=1)
    if bool((lengths >= T).all()):
        out = rnn(x)
        return out[0] if isinstance(out, tuple) else out
    if isinstance(rnn, TORCH_BACKED_RNNS):
        return torch_rnn_own_lengths(rnn.rnn, x, lengths)
    outs = []
    for i in range(B):
        n = int(lengths[i])
        o = rnn(x[i : i + 1, :n])
        o = o[0] if isinstance(o, tuple) else o
        outs.append(torch.nn.functional.pad(o, (0, 0, 0, T - n)))
    return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------- #
# CRDNN
# --------------------------------------------------------------------------- #
def _is_elementwise_activation(layer):
    """torch.nn activation modules (all element-wise but attention/softmax)."""
    return type(layer).__module__ == "torch.nn.modules.activation" and not isinstance(
        layer,
        (torch.nn.MultiheadAttention, torch.nn.Softmax, torch.nn.LogSoftmax),
    )


def run_with_lengths(layer, x, lengths, own_input=False):
    """Apply ``layer`` to a padded batch, carrying exact integer lengths.

    Returns ``(output, output_lengths)``.  Containers are walked recursively.
    ``own_input`` says ``x`` may be written into (frames past each length only);
    intermediate activations always may, unless autograd needs them.
    """
    if hasattr(layer, "forward_with_lengths"):
        return layer.forward_with_lengths(x, lengths)
    if isinstance(layer, (Sequential, torch.nn.Sequential)):
        children = layer.values() if isinstance(layer, Sequential) else layer
        given = x
        for child in children:
            x, lengths = run_with_lengths(child, x, lengths, own_input or x is not given)
        return x, lengths
    if isinstance(layer, Conv2d):
        inplace = own_input and not (torch.is_grad_enabled() and x.requires_grad)
        return conv2d_own_padding(layer, x, lengths, inplace), lengths
    if isinstance(layer, (Pooling1d, Pooling2d)):
        return max_pool_tiled(layer, x), pooled_lengths(layer, lengths)
    if isinstance(layer, TORCH_BACKED_RNNS + UNTORCH_BACKED_RNNS):
        return rnn_own_lengths(layer, x, lengths), lengths
    if isinstance(layer, FRAMEWISE_LAYERS) or _is_elementwise_activation(layer):
        out = layer(x)
        return (out[0] if isinstance(out, tuple) else out), lengths
    raise TypeError(
        f"{type(layer).__name__} has no padding-invariant length rule; "
        "add one in sbtemplate.padding_invariant.encoder"
    )


def zero_padding_frames(x, lengths):
    """Set every frame past each item's length to zero (time is axis 1)."""
    mask = frames_mask(lengths, x.shape[1])
    shape = mask.shape + (1,) * (x.ndim - 2)
    return x.masked_fill(~mask.view(shape), 0.0)


class PaddingInvariantCRDNN(CRDNN):
    """CRDNN whose output for an utterance does not depend on the batch's padding.

    Same constructor and parameter names as
    ``speechbrain.lobes.models.CRDNN.CRDNN``; only the forward differs (see the
    module docstring).  ``forward`` takes SpeechBrain relative lengths of the
    *input frames* (exact when they are ``frames / padded frames``);
    ``forward_with_lengths`` takes and returns integer frame counts.

    Example
    -------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = PaddingInvariantCRDNN(
    ...     input_shape=[None, None, 20], cnn_blocks=1, cnn_channels=[4],
    ...     time_pooling=True, time_pooling_size=4, rnn_class=sb_rnn.LSTM,
    ...     rnn_layers=1, rnn_neurons=8, dnn_blocks=1, dnn_neurons=8,
    ... ).eval()
    >>> x = torch.randn(2, 50, 20)
    >>> out, n = net.forward_with_lengths(x, torch.tensor([33, 50]))
    >>> n.tolist(), out.shape
    ([8, 12], torch.Size([2, 12, 8]))
    >>> alone, _ = net.forward_with_lengths(x[:1, :33], torch.tensor([33]))
    >>> bool(torch.allclose(out[:1, :8], alone, atol=1e-5))
    True
    """

    def forward_with_lengths(self, x, lengths):
        """Encode a padded batch of features with exact frame counts.

        Arguments
        ---------
        x : torch.Tensor
            ``[batch, frames, features]``.
        lengths : torch.LongTensor
            Exact feature-frame counts, ``[batch]``.

        Returns
        -------
        out : torch.Tensor
            ``[batch, max(out_lengths), dnn_neurons]``, zero past each length.
        out_lengths : torch.LongTensor
            Exact encoder frame counts.
        """
        lengths = lengths.to(torch.long)
        given = x
        for layer in self.values():
            x, lengths = run_with_lengths(layer, x, lengths, own_input=x is not given)
        lengths = lengths.clamp(min=0)
        x = x[:, : max(int(lengths.max().item()), 1)] if lengths.numel() else x
        return zero_padding_frames(x, lengths), lengths

    def forward(self, x, lengths=None):
        """Encode; ``lengths`` are relative to ``x.shape[1]`` (None: all full).

        The output carries the exact encoder frame counts as its
        ``frame_lengths`` attribute.
        """
        if lengths is None:
            n = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        else:
            n = exact_lengths(lengths, x.shape[1])
        out, out_lengths = self.forward_with_lengths(x, n.to(x.device))
        return attach_frame_lengths(out, out_lengths)


# --------------------------------------------------------------------------- #
# Feature pipeline + encoder
# --------------------------------------------------------------------------- #
def stft_frame_lengths(features, n_samples):
    """Exact number of STFT frames each utterance has on its own.

    ``features`` is a SpeechBrain feature extractor holding a ``compute_STFT``
    (Fbank, MFCC, Spectrogram-like).  Its time padding must be zeros
    (``pad_mode="constant"``, the default) so that zeroing the waveform padding
    makes the batch identical to each utterance's own padding, and it must not
    use the deltas or context window (both pad at the batch edge).
    """
    stft = getattr(features, "compute_STFT", None)
    if stft is None:
        raise TypeError(f"{type(features).__name__}: no compute_STFT, no frame-count rule here")
    if getattr(features, "deltas", False) or getattr(features, "context", False):
        raise TypeError("Feature deltas/context pad at the batch edge: unsupported")
    if stft.center and stft.pad_mode != "constant":
        raise TypeError(f"STFT pad_mode={stft.pad_mode!r} pads at the batch edge: unsupported")
    hop = stft.hop_length
    if stft.center:
        return torch.div(n_samples, hop, rounding_mode="floor") + 1
    return torch.div(n_samples - stft.n_fft, hop, rounding_mode="floor") + 1


def _statistics_to(normalizer, device):
    """Move an ``InputNormalization``'s global statistics to ``device``.

    They are plain tensor attributes, not buffers: loaded from a checkpoint
    they stay on the CPU when the module is moved, and an evaluation on a GPU
    fails.  Only the global statistics are moved (eval mode reads nothing else).
    """
    for name in ("glob_mean", "glob_std"):
        value = getattr(normalizer, name, None)
        if isinstance(value, torch.Tensor) and value.device != device:
            setattr(normalizer, name, value.to(device))


def normalizer_statistics_to(module, device):
    """Move the statistics of every ``InputNormalization`` inside ``module``.

    Needed for the stock classes on a GPU (the padding-invariant encoder does
    it by itself): ``EncoderDecoderASR.from_hparams(..., run_opts={"device":
    "cuda"})`` moves modules, not these plain tensor attributes.
    """
    from speechbrain.processing.features import InputNormalization

    for layer in module.modules():
        if isinstance(layer, InputNormalization):
            _statistics_to(layer, torch.device(device))
    return module


class PaddingInvariantEncoder(LengthsCapableSequential):
    """``compute_features -> normalize -> model`` with exact lengths throughout.

    Built exactly like the stock ``LengthsCapableSequential`` of the inference
    hyperparameters (``input_shape``, then the named layers).  ``forward(wavs,
    lengths)`` takes the waveform relative lengths of ``EncoderDecoderASR`` and
    returns the encoder output trimmed to the longest utterance, zero past each
    utterance's end, with the exact encoder frame counts attached as
    ``frame_lengths`` (read by the padding-invariant searchers).

    Supported layers: a SpeechBrain STFT-based feature extractor, an
    ``InputNormalization``, any layer with ``forward_with_lengths`` (e.g.
    :class:`PaddingInvariantCRDNN`) and the layers :func:`run_with_lengths`
    knows.

    ``forward`` encodes a batch of mixed lengths in groups of similar length
    (:mod:`sbtemplate.padding_invariant.sub_batches`): the
    ``max_length_ratio`` attribute bounds a group's longest/shortest ratio;
    ``None`` encodes the batch whole. The output is the same either way.
    """

    #: Longest/shortest length ratio within one encoded group (None: no groups).
    max_length_ratio = ENCODER_MAX_LENGTH_RATIO

    def forward_with_lengths(self, wavs, n_samples):
        """Encode waveforms with exact sample counts; returns (out, lengths)."""
        n = n_samples.to(device=wavs.device, dtype=torch.long)
        if bool((n < wavs.shape[1]).any()):
            wavs = zero_padding_frames(wavs, n)
        x = wavs
        for layer in self.values():
            if hasattr(layer, "compute_STFT"):
                x = layer(x)
                n = stft_frame_lengths(layer, n)
                expected = int(stft_frame_lengths(layer, torch.tensor(wavs.shape[1])))
                if x.shape[1] != expected:
                    raise RuntimeError(f"Feature frames {x.shape[1]} != expected {expected}")
            elif isinstance(layer, InputNormalization):
                _statistics_to(layer, x.device)
                x = layer(x, relative_lengths(n, x.shape[1]))
            else:
                x, n = run_with_lengths(layer, x, n)
        x = x[:, : max(int(n.max().item()), 1)]
        return zero_padding_frames(x, n), n

    def forward(self, x, lengths=None):
        """Encode a padded batch of waveforms.

        Arguments
        ---------
        x : torch.Tensor
            ``[batch, samples]`` waveforms.
        lengths : torch.Tensor
            Relative lengths (own samples / padded samples); None: all full.

        Returns
        -------
        torch.Tensor
            Encoder output with exact ``frame_lengths`` attached.
        """
        if lengths is None:
            n = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        else:
            n = exact_lengths(lengths, x.shape[1])
        groups = length_groups(n, self.max_length_ratio)
        if len(groups) <= 1:
            out, out_lengths = self.forward_with_lengths(x, n)
            return attach_frame_lengths(out, out_lengths)
        # Each group padded only to its own longest member (sub_batches module).
        outs, out_lengths = [], []
        for rows in groups:
            index = torch.as_tensor(rows, device=x.device)
            width = int(n[rows[0]])
            out, lens = self.forward_with_lengths(x[index, :width], n[rows])
            outs.append(out)
            out_lengths.append(lens)
        out = scatter_padded(outs, groups, x.shape[0])
        lens = scatter_rows(out_lengths, groups, x.shape[0])
        return attach_frame_lengths(out, lens)
