"""Padding-invariant batched decoding: batch size 8 gives the hypotheses of batch size 1.

Per-stage checks pin each leak separately (convolution boundary, recurrent
layers, encoder lengths, search step limits), each run on the stock classes
(where the leak must show, so the check would catch a regression) and on the
padding-invariant ones (where it must be gone).  End-to-end checks decode
utterances of very different lengths with ``EncoderDecoderASR.transcribe_batch``
at batch size 1, 8 and in dynamic batches, on a random-initialised recognizer
and on the trained tiny one.
"""

import contextlib
import copy
import json
import os
import random

import pytest
import torch
from speechbrain.inference.ASR import EncoderDecoderASR
from speechbrain.lobes.models.CRDNN import CRDNN
from speechbrain.nnet.CNN import Conv2d
from speechbrain.nnet.pooling import Pooling1d, Pooling2d
from speechbrain.nnet.RNN import LSTM, pack_padded_sequence

from sbtemplate.benchmarks import diagnostics as diag
from sbtemplate.benchmarks.decoding import (
    by_length,
    compare,
    decode,
    dynamic_batches,
    fixed_size_batches,
    wer,
)
from sbtemplate.benchmarks.padding import data_root
from sbtemplate.benchmarks.random_model import write_random_recognizer
from sbtemplate.padding_invariant import (
    PaddingInvariantCRDNN,
    PaddingInvariantS2SRNNBeamSearcher,
    exact_lengths,
)
from sbtemplate.padding_invariant.encoder import (
    conv2d_own_padding,
    max_pool_tiled,
    normalizer_statistics_to,
    pooled_lengths,
    rnn_own_lengths,
)
from sbtemplate.padding_invariant.selection import rnn_greedy_searcher
from sbtemplate.padding_invariant.sub_batches import length_groups
from sbtemplate.paths import ProfilePaths

SAMPLE_RATE = 16000

if os.environ.get("SBTEMPLATE_DEVICE", "cpu").startswith("cuda"):
    # TF32 convolutions and matmuls round differently for each tensor shape,
    # which the per-stage 1e-4/1e-5 bounds are not meant to absorb.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
# Very different lengths (0.2 s to 2.3 s), in no particular order.
LENGTHS_S = [0.21, 2.3, 0.55, 1.12, 0.31, 1.73, 0.87, 0.43, 1.41, 0.66]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _waveforms(lengths_s, seed=1):
    g = torch.Generator().manual_seed(seed)
    wavs = []
    for s in lengths_s:
        n = int(s * SAMPLE_RATE) + int(torch.randint(0, 160, (1,), generator=g))
        # noise with a slow envelope: less uniform than white noise
        env = torch.sin(torch.linspace(0, 3.14 * (1 + 3 * s), n)).abs() + 0.1
        wavs.append(0.1 * env * torch.randn(n, generator=g))
    return wavs


def _load(source, savedir, padding_invariant, **overrides):
    asr = EncoderDecoderASR.from_hparams(
        source=str(source),
        savedir=str(savedir),
        overrides={"padding_invariant": padding_invariant, **overrides},
        # SBTEMPLATE_DEVICE=cuda:0 runs the same checks on a GPU (gpu_check.sh).
        run_opts={"device": os.environ.get("SBTEMPLATE_DEVICE", "cpu")},
    )
    normalizer_statistics_to(asr.mods, asr.device)
    return asr


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    return write_random_recognizer(tmp_path_factory.mktemp("random_recognizer"), seed=0)


@pytest.fixture(scope="module")
def random_asr(random_model_dir, tmp_path_factory):
    """The random recognizer loaded twice: {True: padding-invariant, False: stock}."""
    return {
        pi: _load(random_model_dir, tmp_path_factory.mktemp(f"savedir_{pi}"), pi)
        for pi in (True, False)
    }


@pytest.fixture(scope="module")
def wavs():
    return _waveforms(LENGTHS_S)


@contextlib.contextmanager
def whole_batches(*modules):
    """Encode/search each batch whole instead of in length groups.

    The per-stage checks need it: with the groups on, a mixed batch is split
    and the per-utterance arithmetic the checks are about is hardly exercised.
    """
    for module in modules:
        module.max_length_ratio = None
    try:
        yield
    finally:
        for module in modules:
            del module.max_length_ratio  # back to the class default


def _whole(asr):
    return whole_batches(asr.mods.encoder, asr.mods.decoder)


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #
def test_exact_lengths_recovers_sample_counts():
    rng = random.Random(0)
    for _ in range(2000):
        padded = rng.randint(1, 2**23 - 1)
        n = rng.randint(1, padded)
        rel = torch.tensor([n / padded], dtype=torch.float32)
        assert exact_lengths(rel, padded).item() == n


@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant"])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (5, 1), (3, 2)])
def test_conv_own_padding_matches_lone_utterance(mode, kernel, dilation):
    torch.manual_seed(0)
    conv = Conv2d(
        out_channels=4,
        kernel_size=(kernel, kernel),
        input_shape=(1, 30, 8, 3),
        dilation=(dilation, dilation),
        padding_mode=mode,
    ).eval()
    lengths = torch.tensor([30, 7, 29, 12])  # 29: own padding reaches past the batch
    x = torch.randn(4, 30, 8, 3)
    with torch.no_grad():
        out = conv2d_own_padding(conv, x, lengths)
        stock = conv(x)
        for i, n in enumerate(lengths.tolist()):
            alone = conv(x[i : i + 1, :n])
            assert torch.allclose(out[i, :n], alone[0], atol=1e-5)
        # the stock batch differs for the short items (the leak)
        assert (stock[1, :7] - conv(x[1:2, :7])[0]).abs().max() > 1e-3


def test_conv_circular_padding_is_refused():
    conv = Conv2d(
        out_channels=2, kernel_size=(3, 3), input_shape=(1, 9, 4, 1), padding_mode="circular"
    )
    with pytest.raises(TypeError, match="circular"):
        conv2d_own_padding(conv, torch.randn(2, 9, 4, 1), torch.tensor([9, 5]))


def test_pooled_lengths_match_lone_pooling():
    pool = Pooling1d("max", kernel_size=4, input_dims=4, pool_axis=1)
    for n in range(4, 60):
        out = pool(torch.randn(1, n, 5, 2))
        assert pooled_lengths(pool, torch.tensor([n])).item() == out.shape[1]
    freq_pool = Pooling1d("max", kernel_size=2, input_dims=4, pool_axis=2)
    assert pooled_lengths(freq_pool, torch.tensor([17])).item() == 17


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: Pooling1d("max", kernel_size=2, input_dims=4, pool_axis=2), (3, 17, 41, 5)),
        (lambda: Pooling1d("max", kernel_size=3, input_dims=4, pool_axis=1), (2, 20, 6, 4)),
        (lambda: Pooling1d("max", kernel_size=2, input_dims=3, pool_axis=1), (2, 13, 7)),
        (lambda: Pooling2d("max", kernel_size=(2, 3), pool_axis=(1, 2)), (2, 11, 10, 3)),
        # not tiling its axis, or not max: the stock layer runs
        (
            lambda: Pooling1d("max", kernel_size=3, input_dims=4, pool_axis=1, stride=2),
            (2, 9, 4, 2),
        ),
        (
            lambda: Pooling1d("max", kernel_size=2, input_dims=4, pool_axis=2, padding=1),
            (2, 9, 5, 2),
        ),
        (lambda: Pooling1d("avg", kernel_size=2, input_dims=4, pool_axis=2), (2, 9, 6, 2)),
    ],
)
def test_tiled_max_pooling_gives_the_stock_values(make, shape):
    """The encoder's pooling shortcut is exact (ties, -0.0 and all) or falls back."""
    pool = make()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g)
    x[..., ::3] = x[..., ::3].round()  # ties within windows
    x[0, 0] = -0.0
    expected = pool(x)
    got = max_pool_tiled(pool, x)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_stock_rnn_packing_truncates_relative_lengths():
    """SpeechBrain packs ``relative * T`` cast to int: a frame can go missing."""
    T = 100
    lost = [n for n in range(1, T + 1) if int(torch.tensor(n / T) * T) != n]
    assert lost, "float32 n/T*T lands below n for some n"
    # the padding-invariant path packs the integer lengths instead
    lstm = LSTM(hidden_size=4, input_shape=(1, T, 3), bidirectional=True).eval()
    x = torch.randn(2, T, 3)
    n = lost[0]
    with torch.no_grad():
        packed = pack_padded_sequence(x, torch.tensor([n / T, 1.0]))
        assert packed.batch_sizes.numel() == T  # still T steps, item 0 one short
        ours = rnn_own_lengths(lstm, x, torch.tensor([n, T]))
        alone = lstm(x[:1, :n])[0]
        assert torch.allclose(ours[0, :n], alone[0], atol=1e-6)
        stock = lstm(x, lengths=torch.tensor([n / T, 1.0]))[0]
        assert (stock[0, :n] - alone[0]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LiGRU"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_rnn_own_lengths_matches_lone_utterance(kind, bidirectional):
    import speechbrain.nnet.RNN as sb_rnn

    torch.manual_seed(0)
    cls = getattr(sb_rnn, kind)
    extra = {"nonlinearity": "relu"} if kind == "LiGRU" else {}
    rnn = cls(
        hidden_size=6,
        input_shape=(1, 20, 5),
        num_layers=2,
        bidirectional=bidirectional,
        **extra,
    ).eval()
    x = torch.randn(3, 20, 5)
    n = torch.tensor([20, 9, 14])
    with torch.no_grad():
        out = rnn_own_lengths(rnn, x, n)
        for i in range(3):
            alone = rnn(x[i : i + 1, : n[i]])[0]
            assert torch.allclose(out[i, : n[i]], alone[0], atol=1e-5)


def _crdnn_kwargs(**changes):
    kwargs = dict(
        input_shape=[None, None, 40],
        cnn_blocks=2,
        cnn_channels=(4, 8),
        time_pooling=True,
        time_pooling_size=4,
        rnn_class=LSTM,
        rnn_layers=2,
        rnn_neurons=8,
        rnn_bidirectional=True,
        rnn_re_init=True,
        dnn_blocks=2,
        dnn_neurons=8,
    )
    kwargs.update(changes)
    return kwargs


@pytest.mark.parametrize(
    "changes",
    [
        {},  # the project's layout
        {"rnn_layers": 4, "dnn_blocks": 2, "projection_dim": 16},  # Hub-recipe-like
        {"using_2d_pooling": True},
    ],
)
def test_stock_checkpoint_loads_unchanged(changes):
    torch.manual_seed(0)
    stock = CRDNN(**_crdnn_kwargs(**changes)).eval()
    fixed = PaddingInvariantCRDNN(**_crdnn_kwargs(**changes)).eval()
    assert list(stock.state_dict()) == list(fixed.state_dict())
    fixed.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(3, 81, 40)
    with torch.no_grad():
        # no padding: the same output as the stock module
        assert torch.allclose(fixed(x), stock(x), atol=1e-6)
        # padding: each utterance's output as alone
        n = torch.tensor([81, 37, 55])
        out, out_n = fixed.forward_with_lengths(x, n)
        for i in range(3):
            alone = stock(x[i : i + 1, : n[i]])
            assert out_n[i] == alone.shape[1]
            assert torch.allclose(out[i, : out_n[i]], alone[0], atol=1e-5)


def test_encoder_walks_a_stock_crdnn():
    """The encoder also makes a stock CRDNN model padding-invariant (finetune.yaml)."""
    from speechbrain.lobes.features import Fbank
    from speechbrain.processing.features import InputNormalization

    from sbtemplate.padding_invariant import PaddingInvariantEncoder

    torch.manual_seed(0)
    fbank = Fbank(n_mels=40)
    norm = InputNormalization(norm_type="global")
    with torch.no_grad():
        norm(fbank(0.1 * torch.randn(2, 16000)), torch.ones(2))
    norm.eval()
    encoder = PaddingInvariantEncoder(
        input_shape=[None, None, 40],
        compute_features=fbank,
        normalize=norm,
        model=CRDNN(**_crdnn_kwargs()),
    ).eval()
    wavs = [0.1 * torch.randn(n) for n in (16000, 5321, 9000)]
    batch, rel = diag.pad_batch(wavs)
    with torch.no_grad():
        out = encoder(batch, rel)
        for i, w in enumerate(wavs):
            alone = encoder(w.unsqueeze(0), torch.ones(1))
            assert out.frame_lengths[i] == alone.shape[1]
            assert torch.allclose(out[i, : alone.shape[1]], alone[0], atol=1e-5)


# --------------------------------------------------------------------------- #
# Per-stage leaks, stock against padding-invariant, on the random recognizer
# --------------------------------------------------------------------------- #
def test_features_are_not_a_leak(random_asr, wavs):
    for pi in (True, False):
        assert diag.feature_leak(random_asr[pi], wavs) < 1e-5


def test_stage_conv_boundary(random_asr, wavs):
    assert diag.conv_boundary_leak(random_asr[False], wavs) > 1e-2
    assert diag.conv_boundary_leak(random_asr[True], wavs) < 1e-4


def test_stage_rnn(random_asr, wavs):
    assert diag.rnn_leak(random_asr[False], wavs) > 1e-3
    assert diag.rnn_leak(random_asr[True], wavs) < 1e-5


def _rounding_victims(padded, hop=160, pool=4, count=3):
    """Sample counts whose stock encoder length round(rel * T_enc) is wrong."""
    t_enc = (padded // hop + 1) // pool
    victims = []
    for n in range(padded // 10, padded, 97):
        rel = torch.tensor(n / padded)
        if (n // hop + 1) // pool != int(torch.round(rel * t_enc)):
            victims.append(n)
    return victims[:: max(1, len(victims) // count)][:count]


def test_stage_encoder_lengths(random_asr):
    padded = 36877
    lengths = [padded] + _rounding_victims(padded)
    g = torch.Generator().manual_seed(4)
    sub = [0.1 * torch.randn(n, generator=g) for n in lengths]
    own, seen = diag.encoder_lengths(random_asr[False], sub)
    assert sum(a != b for a, b in zip(own, seen)) == len(lengths) - 1
    with _whole(random_asr[True]):
        own, seen = diag.encoder_lengths(random_asr[True], sub)
        assert own == seen
        assert diag.encoder_leak(random_asr[True], sub) < 1e-4


def test_stage_search_limits(random_asr, wavs):
    """Identical encoder states, exact relative lengths: only the step limits differ.

    A beam search without scorers keeps this check cheap; the end-to-end tests
    run the published one (LM, coverage and CTC scorers).
    """
    enc = diag.lone_encoder_outputs(random_asr[True], wavs)
    same, total, _, _, _ = diag.search_leak(_searcher(random_asr[True], False), enc)
    assert same < total
    same, total, diff, _, _ = diag.search_leak(_searcher(random_asr[True], True), enc)
    assert same == total and diff < 1e-4


def _searcher(asr, padding_invariant, kind="beam", eos_bias=0.0, **changes):
    """A searcher over the recognizer's decoder, optionally pushed towards eos."""
    stock = asr.mods.decoder
    linear = copy.deepcopy(stock.fc)
    with torch.no_grad():
        linear.w.bias[stock.eos_index] += eos_bias
    kwargs = dict(
        embedding=stock.emb,
        decoder=stock.dec,
        linear=linear,
        bos_index=stock.bos_index,
        eos_index=stock.eos_index,
        min_decode_ratio=changes.pop("min_decode_ratio", 0.0),
        max_decode_ratio=changes.pop("max_decode_ratio", 1.0),
    )
    if kind == "greedy":
        return rnn_greedy_searcher(padding_invariant=padding_invariant, **kwargs)
    from sbtemplate.padding_invariant.selection import rnn_beam_searcher

    kwargs.update(beam_size=4, eos_threshold=1.5)
    kwargs.update(changes)
    searcher = rnn_beam_searcher(padding_invariant=padding_invariant, **kwargs)
    if padding_invariant:
        searcher.max_length_ratio = None  # the whole batch: the step limits are under test
    return searcher


def test_stage_min_decode_steps_per_utterance(random_asr, wavs):
    """With eos favoured, hypotheses end at the minimum: it must be each one's own."""
    asr = random_asr[True]
    enc = diag.lone_encoder_outputs(asr, wavs)
    stock = _searcher(asr, False, eos_bias=8.0, min_decode_ratio=0.3)
    same, total, _, _, _ = diag.search_leak(stock, enc)
    assert same < total
    fixed = _searcher(asr, True, eos_bias=8.0, min_decode_ratio=0.3)
    same, total, diff, _, _ = diag.search_leak(fixed, enc)
    assert same == total and diff < 1e-4


def test_greedy_min_decode_steps_per_utterance(random_asr, wavs):
    """The stock greedy searcher ignores the minimum (it shortens the step range
    instead); the padding-invariant one blocks eos until each own minimum."""
    asr = random_asr[True]
    enc = diag.lone_encoder_outputs(asr, wavs)
    stock = _searcher(asr, False, kind="greedy", eos_bias=8.0, min_decode_ratio=0.3)
    _, _, _, _, lone = diag.search_leak(stock, enc)
    assert all(len(h) == 0 for h in lone)
    fixed = _searcher(asr, True, kind="greedy", eos_bias=8.0, min_decode_ratio=0.3)
    same, total, diff, _, lone = diag.search_leak(fixed, enc)
    assert same == total and diff < 1e-4
    assert [len(h) for h in lone] == [int(e.shape[1] * 0.3) for e in enc]


def test_stage_greedy_max_steps(random_asr, wavs):
    asr = random_asr[True]
    enc = diag.lone_encoder_outputs(asr, wavs)
    same, total, _, _, _ = diag.search_leak(_searcher(asr, False, kind="greedy"), enc)
    assert same < total
    same, total, diff, _, _ = diag.search_leak(_searcher(asr, True, kind="greedy"), enc)
    assert same == total and diff < 1e-4


def test_searcher_without_exact_lengths_warns(random_asr, wavs):
    asr = random_asr[True]
    enc = diag.lone_encoder_outputs(asr, wavs[:2])
    batch, rel = diag.pad_batch([e[0] for e in enc])  # a new tensor: no lengths
    with pytest.warns(UserWarning, match="no exact frame lengths"):
        asr.mods.decoder(batch, rel)


# --------------------------------------------------------------------------- #
# End to end: transcribe_batch at batch size 1, 8 and dynamic batches
# --------------------------------------------------------------------------- #
def _decodings(asr, wavs, durations, dynamic=True):
    n = len(wavs)
    out = {
        "bs1": decode(asr, wavs, fixed_size_batches(n, 1)),
        "bs8": decode(asr, wavs, fixed_size_batches(n, 8)),
    }
    if dynamic:
        # About 3 to 6 utterances a batch: the first budget whose buckets give
        # batches of several sizes (which one depends on the corpus's lengths).
        mean = sum(durations) / len(durations)
        for factor in (4, 3, 5, 6):
            batches = dynamic_batches(durations, max_batch_length=factor * mean)
            if len({len(b) for b in batches}) > 1:
                break
        assert len({len(b) for b in batches}) > 1, "batches of several sizes"
        out["dynamic"] = decode(asr, wavs, batches)
    return out


def _check(decodings, refs, invariant):
    ref = decodings["bs1"]
    ref_wer = wer(refs, ref["words"])
    for name in [k for k in decodings if k != "bs1"]:
        cmp = compare(ref, decodings[name])
        if invariant:
            assert cmp["identical"] == cmp["total"], (name, cmp)
            assert cmp["max_score_diff"] < 1e-4, (name, cmp)
            assert wer(refs, decodings[name]["words"]) == ref_wer
            assert decodings[name]["words"] == ref["words"]
    if not invariant:
        cmp = compare(ref, decodings["bs8"])
        assert cmp["identical"] < cmp["total"], "the stock classes should leak here"


@pytest.fixture(scope="module")
def random_refs():
    rng = random.Random(3)
    words = ["nako", "fumi", "gize", "tora", "lepi", "sado"]
    return [" ".join(rng.choice(words) for _ in range(4)) for _ in LENGTHS_S]


@pytest.mark.parametrize("groups", ["length groups", "whole batches"])
def test_batch_matches_batch_size_one_random_model(random_asr, wavs, random_refs, groups):
    asr = random_asr[True]
    assert isinstance(asr.mods.decoder, PaddingInvariantS2SRNNBeamSearcher)
    with _whole(asr) if groups == "whole batches" else contextlib.nullcontext():
        _check(_decodings(asr, wavs, LENGTHS_S), random_refs, invariant=True)


def test_stock_classes_differ_random_model(random_asr, wavs, random_refs):
    assert not diag.is_padding_invariant(random_asr[False])
    _check(
        _decodings(random_asr[False], wavs, LENGTHS_S, dynamic=False),
        random_refs,
        invariant=False,
    )


@pytest.mark.parametrize("groups", ["length groups", "whole batches"])
def test_padding_past_the_longest_utterance(random_asr, wavs, groups):
    """Extra padding after the longest utterance (e.g. to a multiple) changes nothing."""
    asr = random_asr[True]
    sub = wavs[:4]
    sig, rel = diag.pad_batch(sub)
    L = sig.shape[1]
    extra = torch.cat([sig, torch.randn(len(sub), 8000)], dim=1)  # non-zero junk
    rel_extra = rel * L / extra.shape[1]
    whole = _whole(asr) if groups == "whole batches" else contextlib.nullcontext()
    with torch.no_grad(), whole:
        _, tok_a = asr.transcribe_batch(sig, rel)
        _, tok_b = asr.transcribe_batch(extra, rel_extra)
    assert [list(map(int, t)) for t in tok_a] == [list(map(int, t)) for t in tok_b]
    # the stock classes fail here: the CTC scorer's mask is sized by the longest
    # rounded length, the encoder output by the padded one
    # CPU: "... must match the size of tensor b ..."; CUDA: "... must match the existing size ..."
    with pytest.raises(RuntimeError, match="must match the (existing )?size"), torch.no_grad():
        random_asr[False].transcribe_batch(extra, rel_extra)


# --------------------------------------------------------------------------- #
# Trained tiny model
# --------------------------------------------------------------------------- #
def _tiny_paths(request):
    try:
        return request.getfixturevalue("tiny_build")
    except pytest.FixtureLookupError:
        return ProfilePaths.for_profile("tiny")


def _test_manifest(paths):
    candidates = sorted(paths.manifests.glob("*test*.json"))
    return candidates[0] if candidates else None


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    paths = _tiny_paths(request)
    manifest = _test_manifest(paths)
    if not (paths.model_dir / "hyperparams.yaml").is_file() or manifest is None:
        pytest.skip(
            f"trained tiny model not built ({paths.model_dir}); "
            "run `python -m sbtemplate.build --profile tiny`"
        )
    import soundfile as sf

    entries = json.loads(manifest.read_text())
    items = sorted(entries.items())
    # the 12 most different lengths: alternate short and long
    items.sort(key=lambda kv: kv[1]["length"])
    pick = []
    while items and len(pick) < 12:
        pick.append(items.pop(0))
        if items:
            pick.append(items.pop())
    wavs, refs, durations = [], [], []
    for _, e in pick:
        path = e["wav"].replace("{data_root}", str(data_root(paths)))
        audio, sr = sf.read(path, dtype="float32")
        wavs.append(torch.from_numpy(audio))
        refs.append(e["words"])
        durations.append(e["length"])
    asr = {
        pi: _load(paths.model_dir, tmp_path_factory.mktemp(f"tiny_{pi}"), pi)
        for pi in (True, False)
    }
    return {"asr": asr, "wavs": wavs, "refs": refs, "durations": durations}


@pytest.mark.parametrize("groups", ["length groups", "whole batches"])
def test_batch_matches_batch_size_one_trained_tiny(tiny, groups):
    asr = tiny["asr"][True]
    with _whole(asr) if groups == "whole batches" else contextlib.nullcontext():
        d = _decodings(asr, tiny["wavs"], tiny["durations"])
    _check(d, tiny["refs"], invariant=True)


def test_stages_trained_tiny(tiny):
    fixed, stock = tiny["asr"][True], tiny["asr"][False]
    wavs = tiny["wavs"]
    assert diag.conv_boundary_leak(stock, wavs) > 1e-3
    assert diag.conv_boundary_leak(fixed, wavs) < 1e-4
    assert diag.rnn_leak(stock, wavs) > 1e-4
    assert diag.rnn_leak(fixed, wavs) < 1e-5
    with _whole(fixed):
        own, seen = diag.encoder_lengths(fixed, wavs)
        assert own == seen
        same, total, diff, _, _ = diag.search_leak(
            fixed.mods.decoder, diag.lone_encoder_outputs(fixed, wavs)
        )
    assert same == total and diff < 1e-4


def test_stock_and_invariant_classes_agree_at_batch_size_one_trained_tiny(tiny):
    """Without padding there is nothing to leak: one utterance at a time, the
    stock classes give the padding-invariant hypotheses (the fixes change only
    what padding does)."""
    batches = fixed_size_batches(len(tiny["wavs"]), 1)
    stock = decode(tiny["asr"][False], tiny["wavs"], batches)
    invariant = decode(tiny["asr"][True], tiny["wavs"], batches)
    cmp = compare(stock, invariant)
    assert cmp["identical"] == cmp["total"] == len(tiny["wavs"]), cmp
    assert cmp["max_score_diff"] < 1e-4, cmp


# --------------------------------------------------------------------------- #
# Length groups inside one call
# --------------------------------------------------------------------------- #
def test_length_groups_partition_the_batch_within_the_ratio():
    rng = random.Random(7)
    for _ in range(300):
        lengths = [rng.randint(1, 400) for _ in range(rng.randint(1, 20))]
        ratio = rng.choice([1.0, 1.2, 1.5, 3.0])
        groups = length_groups(lengths, ratio)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)
            assert lengths[g[-1]] * ratio >= lengths[g[0]]
        heads = [lengths[g[0]] for g in groups]
        assert heads == sorted(heads, reverse=True)
        # greedy: the next group's longest would not have fitted the previous group
        for a, b in zip(groups, groups[1:]):
            assert lengths[b[0]] * ratio < lengths[a[0]]
    assert length_groups([5, 50, 7], None) == [[1, 2, 0]]
    with pytest.raises(ValueError, match="at least 1"):
        length_groups([1, 2], 0.5)


def _spy(monkeypatch, module, method):
    """Record the batch shapes ``module.method`` is called with."""
    calls = []
    original = getattr(module, method)

    def spy(x, lengths):
        calls.append((tuple(x.shape[:2]), [int(n) for n in lengths]))
        return original(x, lengths)

    monkeypatch.setattr(module, method, spy)
    return calls


def test_a_mixed_batch_is_encoded_and_searched_in_groups(random_asr, wavs, monkeypatch):
    """Each group is run padded to its own longest member; the results equal the whole batch's."""
    asr = random_asr[True]
    sig, rel = diag.pad_batch(wavs)
    with torch.no_grad(), _whole(asr):
        _, whole_tokens = asr.transcribe_batch(sig, rel)
        whole_enc = asr.encode_batch(sig, rel)
    enc_calls = _spy(monkeypatch, asr.mods.encoder, "forward_with_lengths")
    search_calls = _spy(monkeypatch, asr.mods.decoder, "_search")
    with torch.no_grad():
        enc = asr.encode_batch(sig, rel)
        _, tokens = asr.transcribe_batch(sig, rel)
    groups = length_groups([len(w) for w in wavs], asr.mods.encoder.max_length_ratio)
    frame_groups = length_groups(enc.frame_lengths, asr.mods.decoder.max_length_ratio)
    assert len(groups) > 2 and len(frame_groups) > 2
    assert len(enc_calls) == 2 * len(groups)  # encode_batch, then transcribe_batch
    for (shape, lengths), rows in zip(enc_calls, groups + groups):
        assert shape == (len(rows), len(wavs[rows[0]]))  # padded to its own longest
        assert lengths == [len(wavs[i]) for i in rows]
    frames = enc.frame_lengths.tolist()
    assert [c[1] for c in search_calls] == [[frames[i] for i in g] for g in frame_groups]
    assert [c[0][1] for c in search_calls] == [frames[g[0]] for g in frame_groups]
    assert [list(map(int, t)) for t in tokens] == [list(map(int, t)) for t in whole_tokens]
    assert enc.shape == whole_enc.shape
    assert enc.frame_lengths.tolist() == whole_enc.frame_lengths.tolist()
    assert (enc - whole_enc).abs().max().item() < 1e-5


def test_grouped_search_returns_what_the_whole_batch_returns(random_asr, wavs):
    """Every output of the searcher, top-k included: tokens, relative lengths, scores."""
    asr = random_asr[True]
    enc = diag.lone_encoder_outputs(asr, wavs)
    batch, rel = diag.pad_batch([e[0] for e in enc])
    enc_lens = torch.tensor([e.shape[1] for e in enc])
    searcher = asr.mods.decoder
    for topk in (False, True):
        searcher.return_topk = topk
        try:
            with torch.no_grad():
                grouped = searcher(batch, rel, enc_lens=enc_lens)
                with whole_batches(searcher):
                    whole = searcher(batch, rel, enc_lens=enc_lens)
        finally:
            searcher.return_topk = False
        if topk:
            hyps_g, lens_g, scores_g, logp_g = grouped
            hyps_w, lens_w, scores_w, logp_w = whole
            width = hyps_w.shape[-1]
            assert hyps_g.shape[-1] == width
            assert torch.equal(torch.round(lens_g * width), torch.round(lens_w * width))
            for b in range(len(wavs)):
                for k in range(hyps_w.shape[1]):
                    n = int(torch.round(lens_w[b, k] * width))
                    assert torch.equal(hyps_g[b, k, :n], hyps_w[b, k, :n])
        else:
            assert grouped[0] == whole[0]
            assert torch.equal(grouped[1], whole[1])
            scores_g, scores_w = grouped[2], whole[2]
        assert (scores_g - scores_w).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- #
# Finished utterances leave the batch; the vectorised CTC prefix score
# --------------------------------------------------------------------------- #
def test_finished_utterances_leave_the_batch(random_asr, wavs, monkeypatch):
    """Rows shrink as utterances finish, and every output equals the uncompacted search."""
    asr = random_asr[True]
    searcher = asr.mods.decoder
    enc = diag.lone_encoder_outputs(asr, wavs)
    batch, rel = diag.pad_batch([e[0] for e in enc])
    enc_lens = torch.tensor([e.shape[1] for e in enc])
    rows = []
    step = searcher.search_step

    def spy(alived_hyps, inp_tokens, *args):
        rows.append(inp_tokens.shape[0])
        return step(alived_hyps, inp_tokens, *args)

    monkeypatch.setattr(searcher, "search_step", spy)
    with torch.no_grad(), whole_batches(searcher):
        compacted = searcher(batch, rel, enc_lens=enc_lens)
        steps_compacted, rows[:] = list(rows), []
        searcher.compact_finished = False
        try:
            full = searcher(batch, rel, enc_lens=enc_lens)
        finally:
            del searcher.compact_finished
    beam = searcher.beam_size
    assert steps_compacted[0] == len(wavs) * beam and steps_compacted[-1] < len(wavs) * beam
    assert steps_compacted == sorted(steps_compacted, reverse=True)
    assert set(rows) == {len(wavs) * beam}  # without compaction every step has every row
    assert sum(steps_compacted) < sum(rows)
    assert compacted[0] == full[0]
    assert torch.equal(compacted[1], full[1])
    assert (compacted[2] - full[2]).abs().max().item() < 1e-4


def test_unknown_scorers_keep_every_utterance_to_the_end(random_asr):
    from speechbrain.decoders.scorer import BaseScorerInterface

    from sbtemplate.padding_invariant.search import compactable

    searcher = copy.copy(random_asr[True].mods.decoder)
    assert compactable(searcher)
    searcher.scorer = copy.copy(searcher.scorer)
    searcher.scorer.full_scorers = {**searcher.scorer.full_scorers, "mine": BaseScorerInterface()}
    assert not compactable(searcher)


def _close(a, b):
    """Equal integer tensors; float tensors equal to float rounding (-1e20 stands for -inf)."""
    if a is None or b is None:
        return a is None and b is None
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("partial", [True, False])
def test_vectorized_ctc_prefix_score_equals_the_stock_one(partial):
    """Same inputs, several steps with the stock permutation between them: the stock values."""
    from speechbrain.decoders.ctc import CTCPrefixScore

    from sbtemplate.padding_invariant.ctc_prefix import VectorizedCTCPrefixScore

    g = torch.Generator().manual_seed(5)
    batch, frames, vocab, beam = 3, 23, 17, 4
    x = torch.log_softmax(3 * torch.randn(batch, frames, vocab, generator=g), dim=-1)
    enc_lens = torch.tensor([23, 11, 17])
    scorers = [cls(x.clone(), enc_lens, 0, 2) for cls in (CTCPrefixScore, VectorizedCTCPrefixScore)]
    states = [None, None]
    tokens = torch.full((batch * beam,), 1, dtype=torch.long)
    for _ in range(6):
        candidates = None
        if partial:
            candidates = torch.stack(
                [torch.randperm(vocab, generator=g)[:6] for _ in range(batch * beam)]
            )
        outs = [s.forward_step(tokens, st, candidates) for s, st in zip(scorers, states)]
        assert _close(outs[0][0], outs[1][0])
        assert (outs[0][0] - outs[1][0]).abs().max() < 1e-4
        for a, b in zip(outs[0][1], outs[1][1]):
            assert _close(a, b)
        # next step: a random choice of (beam, token) per utterance, as the searcher makes
        width = outs[0][0].shape[-1]
        pick = torch.stack([torch.randperm(beam * width, generator=g)[:beam] for _ in range(batch)])
        states = [s.permute_mem(o[1], pick) for s, o in zip(scorers, outs)]
        tokens = (pick % width).view(-1)
        assert all(_close(a, b) for a, b in zip(states[0], states[1]))


def test_ctc_forward_recursion_of_a_row_does_not_depend_on_the_others():
    """Each row alone gives what it gives in a batch, including frames past a short row."""
    from sbtemplate.padding_invariant.ctc_prefix import forward_recursion

    g = torch.Generator().manual_seed(2)
    frames, rows, cand = 30, 5, 4
    x = torch.log_softmax(torch.randn(2, frames, rows, cand, generator=g), dim=-1)
    x[:, 18:, 1] = -1e20  # a row whose own frames end at 18
    x[1, 18:, 1] = 0.0
    phi = torch.randn(frames, rows, cand, generator=g) - 2
    r = torch.full((frames, 2, rows, cand), -1e20)
    r[2] = torch.randn(2, rows, cand, generator=g) - 1
    batch = r.clone()
    forward_recursion(batch, phi, x, 3, frames)
    for k in range(rows):
        alone = r[:, :, k : k + 1].clone()
        forward_recursion(alone, phi[:, k : k + 1], x[:, :, k : k + 1], 3, frames)
        assert torch.allclose(alone[:, :, 0], batch[:, :, k], rtol=1e-6, atol=1e-5)
    assert torch.equal(batch[:3], r[:3])  # frames before start untouched
    assert (batch[18:, 0, 1] < -1e19).all()  # past its own end a row stays at -inf
