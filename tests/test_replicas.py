"""The real SpeechBrain LibriSpeech recognizers, as random-weight replicas.

Reduced-width twins of ``speechbrain/asr-crdnn-rnnlm-librispeech`` and
``speechbrain/asr-crdnn-transformerlm-librispeech`` (same layers, token ids,
tokenizers and decoding options; an eighth of every width) are served on the
loopback Hub under the real repo ids and loaded through SpeechBrain's own
classes, as users load the real repos. Checked: one call makes them
padding-invariant (hypotheses at batch sizes 1, 8, 16 and dynamic identical on
mixed-length input) while the stock classes on the same topology differ; the
full-size architectures have the real checkpoints' parameter counts; the
fine-tuning variant of the real RNNLM runs on 2 ranks with the ASR frozen, and
its evaluation is the same on 1 and 2 ranks.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fetch_helpers import fetch_environment
from network_guard import _forbid_network  # noqa: F401 - autouse fixture

from sbtemplate import replicas
from sbtemplate.benchmarks.decoding import decode
from sbtemplate.benchmarks.padding import batchings
from sbtemplate.padding_invariant import (
    PaddingInvariantCRDNN,
    PaddingInvariantEncoder,
    PaddingInvariantS2SRNNBeamSearcher,
    make_padding_invariant,
)
from sbtemplate.profiles import profile_file

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
RNNLM, TRANSFORMERLM = replicas.REPO_IDS
SAMPLE_RATE = 16000
# The real checkpoints of asr-crdnn-rnnlm-librispeech (bytes, as the Hub lists them).
REAL_RNNLM_BYTES = {"asr": 479.6e6, "lm": 212.4e6}
BATCHINGS = ("bs8_file", "bs16_file", "dynamic")
# A short beam and hypotheses of at most half the encoder frames: random
# weights seldom emit eos, and the TransformerLM scorer re-reads the whole
# prefix every step, so the repo's settings would take minutes here.
DECODING = {"beam_size": 4, "max_decode_ratio": 0.5}


@pytest.fixture(scope="session")
def reduced(tmp_path_factory):
    """Both reduced replicas (written once; reused while their inputs are unchanged)."""
    return replicas.write_replicas("reduced", log=lambda line: None)


def mixed_set(n=16, seed=0):
    """Waveforms of 0.3 to 2.5 s in no particular order (a sweep in noise)."""
    g = torch.Generator().manual_seed(seed)
    seconds = (0.3 + 2.2 * torch.rand(n, generator=g)).tolist()
    wavs = []
    for s in seconds:
        t = torch.arange(int(s * SAMPLE_RATE)) / SAMPLE_RATE
        wavs.append(
            0.2 * torch.sin(2 * torch.pi * 300 * t) + 0.05 * torch.randn(t.shape, generator=g)
        )
    return wavs, seconds


def plans(seconds):
    """The padding benchmark's batchings compared against batch size 1, in file order."""
    every = batchings(seconds, dynamic_max_seconds=6 * sum(seconds) / len(seconds))
    return {name: every[name] for name in ("bs1", *BATCHINGS)}


@pytest.fixture(scope="module", params=replicas.REPO_IDS)
def decoded(request, reduced, tmp_path_factory):
    """One replica fetched from the loopback Hub by its real repo id, loaded with
    SpeechBrain's classes, decoded at every batching stock and converted."""
    from speechbrain.inference.ASR import EncoderDecoderASR

    repo_id = request.param
    tmp = tmp_path_factory.mktemp("replica")
    wavs, seconds = mixed_set()
    out = {"repo_id": repo_id}
    torch.set_num_threads(1)
    with fetch_environment(tmp, reduced[repo_id], repo_id):
        for name in ("stock", "invariant"):
            asr = EncoderDecoderASR.from_hparams(
                source=repo_id, savedir=str(tmp / name), overrides=DECODING
            )
            out[f"{name}_classes"] = (type(asr.mods.encoder), type(asr.mods.decoder))
            if name == "invariant":
                before = {k: v.clone() for k, v in asr.mods.state_dict().items()}
                assert make_padding_invariant(asr) is asr
                after = asr.mods.state_dict()
                out["weights_kept"] = before.keys() == after.keys() and all(
                    torch.equal(before[k], after[k]) for k in before
                )
                out["converted"] = asr
            out[name] = {b: decode(asr, wavs, batches) for b, batches in plans(seconds).items()}
    return out


def identical_to_bs1(runs, batching):
    return sum(a == b for a, b in zip(runs["bs1"]["tokens"], runs[batching]["tokens"]))


def test_replicas_load_through_stock_classes_from_the_hub(decoded):
    from speechbrain.decoders.seq2seq import S2SRNNBeamSearcher
    from speechbrain.nnet.containers import LengthsCapableSequential

    assert decoded["stock_classes"] == (LengthsCapableSequential, S2SRNNBeamSearcher)
    asr = decoded["converted"]
    assert type(asr.mods.encoder) is PaddingInvariantEncoder
    assert type(asr.mods.encoder.model) is PaddingInvariantCRDNN
    assert type(asr.mods.decoder) is PaddingInvariantS2SRNNBeamSearcher
    assert decoded["weights_kept"]
    assert make_padding_invariant(asr) is asr  # a second call changes nothing


@pytest.mark.parametrize("batching", BATCHINGS)
def test_converted_replica_decodes_every_batching_like_batch_size_one(decoded, batching):
    runs = decoded["invariant"]
    n = len(runs["bs1"]["tokens"])
    assert identical_to_bs1(runs, batching) == n, (decoded["repo_id"], batching)
    assert all(runs["bs1"]["tokens"])  # random weights: hypotheses run long, none empty
    assert max(abs(a - b) for a, b in zip(runs["bs1"]["scores"], runs[batching]["scores"])) < 1e-3


def test_stock_classes_leak_on_the_same_topology(decoded):
    """The control: the same weights through SpeechBrain's classes change
    hypotheses with the batch (otherwise the test above proves nothing)."""
    runs = decoded["stock"]
    n = len(runs["bs1"]["tokens"])
    assert min(identical_to_bs1(runs, b) for b in BATCHINGS) < n, decoded["repo_id"]


def test_converted_bs1_equals_stock_bs1(decoded):
    """Alone in a batch there is no padding: the conversion changes no hypothesis."""
    assert decoded["invariant"]["bs1"]["tokens"] == decoded["stock"]["bs1"]["tokens"]


def test_published_hyperparams_name_only_speechbrain_classes(reduced):
    for repo_id, folder in reduced.items():
        lines = (folder / "hyperparams.yaml").read_text().splitlines()
        text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
        assert "sbtemplate" not in text and "!PLACEHOLDER" not in text, repo_id
        classes = set(re.findall(r"!(?:new|name):([\w.]+)", text))
        assert classes and all(
            c.split(".")[0] in ("speechbrain", "torch", "sentencepiece") for c in classes
        )
        assert {p.name for p in folder.iterdir()} >= {
            "hyperparams.yaml",
            "asr.ckpt",
            "lm.ckpt",
            "tokenizer.ckpt",
            "normalizer.ckpt",
            "example.wav",
            "manifest.json",
        }


def test_tokenizers_have_the_real_sizes_and_special_ids(reduced):
    import sentencepiece as spm

    expected = {RNNLM: (1000, 0, -1, -1), TRANSFORMERLM: (5000, 0, 1, 2)}
    for repo_id, folder in reduced.items():
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.ckpt"))
        assert (sp.get_piece_size(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == expected[repo_id]
        assert sp.decode_ids(sp.encode_as_ids("SET A TIMER FOR TEN MINUTES")) == (
            "SET A TIMER FOR TEN MINUTES"
        )


def full_size(repo_id):
    """The full-size modules of a replica (in memory, under 1 GB). The counts
    and shapes do not depend on the initialisation: SpeechBrain's orthogonal
    re-initialisation of the recurrent layers (half the time) is skipped."""
    from unittest import mock

    from hyperpyyaml import load_hyperpyyaml

    with torch.no_grad(), mock.patch("speechbrain.nnet.RNN.rnn_init", lambda module: None):
        return load_hyperpyyaml(replicas.replica_hparams(repo_id, "full"))


def test_full_size_rnnlm_replica_has_the_real_checkpoint_sizes():
    counts = replicas.parameter_counts(full_size(RNNLM))
    for part, real_bytes in REAL_RNNLM_BYTES.items():
        assert abs(4 * counts[part] / real_bytes - 1) < 0.01, (part, counts[part])


def test_full_size_transformerlm_replica_has_the_published_topology():
    hp = full_size(TRANSFORMERLM)
    lm = hp["lm_model"]
    ffn = lm.encoder.layers[0].pos_ffn.ffn[0]
    assert len(lm.encoder.layers) == 12 and (ffn.in_features, ffn.out_features) == (768, 3072)
    assert lm.custom_src_module.emb.Embedding.num_embeddings == 5000
    rnns = [m for m in hp["enc"].modules() if isinstance(m, torch.nn.LSTM)]
    assert len(rnns) == 4 and all(r.hidden_size == 1024 and r.bidirectional for r in rnns)
    assert (hp["bos_index"], hp["eos_index"], hp["blank_index"]) == (1, 2, 0)


def test_make_padding_invariant_names_what_it_cannot_convert():
    from speechbrain.inference.ASR import EncoderDecoderASR

    class Odd(torch.nn.Module):
        pass

    asr = EncoderDecoderASR.__new__(EncoderDecoderASR)
    torch.nn.Module.__init__(asr)
    asr.mods = torch.nn.ModuleDict({"encoder": Odd(), "decoder": Odd()})
    with pytest.raises(TypeError, match="Odd has no padding-invariant counterpart"):
        make_padding_invariant(asr)
    with pytest.raises(TypeError, match="takes an EncoderDecoderASR"):
        make_padding_invariant(torch.nn.Linear(2, 2))


def test_an_interrupted_write_leaves_no_replica(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(replicas, "train_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        replicas.write_replica(RNNLM, "reduced", root=tmp_path, log=lambda line: None)
    parent = replicas.replica_folder(RNNLM, "reduced", tmp_path).parent
    assert list(parent.iterdir()) == []


def test_an_up_to_date_replica_is_not_written_again(reduced):
    folder = reduced[RNNLM]
    stamp = (folder / "asr.ckpt").stat().st_mtime_ns
    lines = []
    assert replicas.write_replica(RNNLM, "reduced", log=lines.append) == folder
    assert (folder / "asr.ckpt").stat().st_mtime_ns == stamp
    assert lines and "up to date" in lines[0]


# --------------------------------------------------------------------------
# The fine-tuning variant on the real RNNLM (reduced twin, tiny profile data)

VARIANT = "finetune_rnnlm_librispeech.yaml"
VARIANT_OVERRIDES = [
    f"--build_profile=!include:{profile_file('tiny')}",
    "--replica_size=!include:sbtemplate/hparams/replicas/sizes/reduced.yaml",
    "--number_of_epochs=1",
    "--test_limit=6",
    "--test_batch_size=2",
    "--beam_size=4",
    "--max_decode_ratio=0.6",
    "--noprogressbar",
    "--collective_timeout_s=120",
]


def run_variant(out, nproc):
    from test_finetune import _env, _free_port

    cmd = [str(PYTHON.parent / "torchrun"), "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd += ["finetune.py", VARIANT, *VARIANT_OVERRIDES, f"--output_folder={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def variant_runs(tiny_build, reduced, tmp_path_factory):
    base = tmp_path_factory.mktemp("variant")
    return {n: (base / f"ws{n}", run_variant(base / f"ws{n}", n)) for n in (2, 1)}


def test_variant_fine_tunes_the_real_rnnlm_on_two_ranks(variant_runs):
    out, proc = variant_runs[2]
    results = json.loads((out / "results.json").read_text())
    assert "Fine-tuning the LM of speechbrain/asr-crdnn-rnnlm-librispeech" in proc.stdout
    assert results["world_size"] == 2
    assert results["frozen"]["unchanged_on_every_rank"] and results["frozen"]["ranks_agree"]
    assert results["lm"]["changed"]
    assert all(e["ranks_identical"] for e in results["epochs"])
    assert results["paths"]["identical_hypotheses"]
    assert (
        results["perplexity"]["finetuned"]["target_valid"]
        < (results["perplexity"]["base"]["target_valid"])
    )
    # The Hub served the replica under the real repo id.
    assert re.search(
        r"URLs http://127\.0\.0\.1:\d+/speechbrain/asr-crdnn-rnnlm-librispeech/", proc.stdout
    )


def test_variant_evaluation_is_the_same_on_one_and_two_ranks(variant_runs):
    def summary(out):
        data = json.loads((out / "eval" / "test_base_lm_summary.json").read_text())
        return {k: v for k, v in data.items() if k not in ("world_size", "per_rank")}

    def utterances(out):
        return (out / "eval" / "test_base_lm_utterances.tsv").read_text()

    (one, _), (two, _) = variant_runs[1], variant_runs[2]
    assert summary(one) == summary(two)
    assert utterances(one) == utterances(two)


def test_variant_names_the_command_that_writes_a_missing_replica(tmp_path, monkeypatch):
    from sbtemplate import run_setup

    monkeypatch.setenv("SBTEMPLATE_ARTIFACTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError, match=r"python -m sbtemplate\.replicas --size reduced"):
        hparams_file, _, overrides = run_setup.parse_arguments([VARIANT, *VARIANT_OVERRIDES[:2]])
        run_setup.load_hparams(hparams_file, overrides)


def test_single_node_check_runs_on_a_replica_by_its_real_repo_id(reduced, tiny_build, tmp_path):
    cmd = [
        str(PYTHON),
        "single_node_pretrained.py",
        "single_node_pretrained.yaml",
        f"--build_profile=!include:{profile_file('tiny')}",
        f"--repo_id={RNNLM}",
        f"--local_repo={reduced[RNNLM]}",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--savedir={tmp_path / 'savedir'}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: fetched from the Hub" in proc.stdout
    assert f"downloaded from Hugging Face Hub repo {RNNLM}" in proc.stdout


def test_variant_keeps_every_other_setting_of_finetune_yaml():
    """The variant differs from finetune.yaml in the model and its source only:
    a training, data or evaluation setting changed in one file and not in the
    other fails here."""
    import io

    import ruamel.yaml

    yaml = ruamel.yaml.YAML(typ="rt")

    def values(name):
        document = yaml.load((ROOT / name).read_text())
        dumped = {}
        for key, value in document.items():
            out = io.StringIO()
            yaml.dump({key: value}, out)
            dumped[key] = out.getvalue()
        return dumped

    base, variant = values("finetune.yaml"), values(VARIANT)
    model_keys = {
        "local_repo",
        "repo_id",
        "endpoints",
        "pretrained_folder",
        "recognizer",
        "test_encoder",
        "test_search",
        "decoding_overrides",
        "output_folder",  # its own: a checkpoint of one LM never resumes the other
        # random weights: no WER is recorded or bounded
        "recorded_wer",
        "wer_tolerance",
    }
    differ = {k for k in base.keys() & variant.keys() if base[k] != variant[k]}
    assert differ == model_keys
    assert set(base) - set(variant) == set()
    assert set(variant) - set(base) == {"replica_size", "beam_size"}


def test_replica_benchmark_measures_both_parts(reduced, tiny_build):
    """A small run of the full-size benchmark's code: every figure it reports exists."""
    from sbtemplate.benchmarks import replicas as bench

    fig = bench.run(
        size="reduced",
        profile="tiny",
        repo_ids=(RNNLM,),
        utterances=6,
        beam_size=4,
        batchings_names=("bs1", "bs8_file"),
        step_batch_size=2,
        step_repeats=1,
        log=lambda line: None,
    )
    model = fig["models"][RNNLM]
    decoding, step = model["decoding"], model["step"]
    assert decoding["identical_to_bs1"]["padding_invariant"]["bs8_file"] == fig["utterances"] == 6
    assert decoding["bs1_stock_equals_invariant"]
    assert all(v > 0 for v in decoding["invariant_vs_stock"].values())
    assert step["lm_only"]["trainable_params"] == model["parameters"]["lm"]
    assert step["whole_recognizer"]["trainable_params"] == model["parameters"]["asr"]
    assert step["ratio"] > 0 and step["whole_recognizer"]["peak_rss_mb"] > 0
    assert RNNLM in bench.format_table(fig)
