"""Choosing the decoding weights on the target-domain dev split."""

import json

import pytest

from sbtemplate import tune_decoding
from sbtemplate.paths import ProfilePaths


def test_score_counts_word_and_sentence_errors():
    items = [("a", "a.wav", "SET A TIMER NOW"), ("b", "b.wav", "CANCEL THE ALARM")]
    hyps = {"a": "SET A TIMER NOW", "b": "CANCEL THE ALARM TONIGHT"}
    result = tune_decoding.score(items, hyps)
    assert result["WER"] == pytest.approx(100 * 1 / 7)  # one insertion in 7 reference words
    assert result["SER"] == pytest.approx(50.0)


def test_grid_on_the_dev_split_picks_the_lowest_wer(tiny_build, tmp_path):
    out = tmp_path / "weights.json"
    tune_decoding.main(
        [
            "--profile",
            "tiny",
            "--lm",
            str(tiny_build.model_dir / "lm_commands.ckpt"),
            "--lm-weights",
            "0.0",
            "1.0",
            "--ctc-weights",
            "0.0",
            "0.5",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    dev = json.loads((tiny_build.manifests / "valid_target.json").read_text())
    assert result["utterances"] == len(dev) > 0
    pairs = {(r["lm_weight"], r["ctc_weight_decode"]) for r in result["grid"]}
    assert pairs == {(0.0, 0.0), (0.0, 0.5), (1.0, 0.0), (1.0, 0.5)}
    assert result["best"]["WER"] == min(r["WER"] for r in result["grid"])
    # The weights reach the searcher: they change what it decodes.
    assert len({(r["WER"], r["SER"]) for r in result["grid"]}) > 1


def test_missing_dev_split_is_named(tmp_path):
    paths = ProfilePaths.for_profile("tiny", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="valid_target.json"):
        tune_decoding.load_dev_set(paths)


def test_folder_without_a_recognizer_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tune_decoding.main(["--profile", "tiny", "--model", str(tmp_path)])
    assert str(tmp_path) in capsys.readouterr().err


def test_missing_lm_file_is_refused(tiny_build, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tune_decoding.main(["--profile", "tiny", "--lm", str(tmp_path / "nope.ckpt")])
    assert "nope.ckpt" in capsys.readouterr().err


def test_ctc_weight_one_is_refused(tiny_build, capsys):
    with pytest.raises(SystemExit):
        tune_decoding.main(
            ["--profile", "tiny", "--model", str(tiny_build.model_dir), "--ctc-weights", "1.0"]
        )
    assert "--ctc-weights" in capsys.readouterr().err


def test_eos_thresholds_join_the_grid(tiny_build, tmp_path):
    out = tmp_path / "settings.json"
    tune_decoding.main(
        [
            "--profile",
            "tiny",
            "--lm-weights",
            "0.5",
            "--ctc-weights",
            "0.5",
            "--eos-thresholds",
            "1.0",
            "100.0",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert [r["eos_threshold"] for r in result["grid"]] == [1.0, 100.0]
    # The best entry is the grid's lowest WER (then SER).
    assert result["best"] in result["grid"]
    assert (result["best"]["WER"], result["best"]["SER"]) == min(
        (r["WER"], r["SER"]) for r in result["grid"]
    )
    # The threshold reaches the searcher: at 1.0 EOS must be the best token to
    # end a hypothesis, at 100 almost any score will do, and the barely
    # trained tiny decoder ends its hypotheses elsewhere.
    first, second = result["grid"]
    assert (first["WER"], first["SER"]) != (second["WER"], second["SER"])


def test_non_positive_eos_threshold_is_refused(tiny_build, capsys):
    with pytest.raises(SystemExit):
        tune_decoding.main(["--profile", "tiny", "--eos-thresholds", "0"])
    assert "--eos-thresholds" in capsys.readouterr().err
