"""Build profiles: how much data and how big a model.

``full`` is the main job's default (about 14 minutes on 2 CPU cores);
``tiny`` exercises every code path in seconds to a couple of minutes and is
what the test suite builds. Both use the same code; only these numbers differ.
"""

PROFILES = {
    "full": {
        "corpus": {
            # speech splits (LibriSpeech layout)
            "general_train": 2160,
            "general_valid": 60,
            "general_test": 100,
            "target_test": 150,
            "target_valid": 200,
            # text-only splits
            "general_lm_train": 6000,
            "general_lm_valid": 300,
            "target_lm_train": 2000,
            "target_lm_valid": 200,
            "noise_files": 12,
            "rir_files": 12,
        },
        "tokenizer": {"vocab_size": 200},
        "lm": {"number_of_epochs": 4, "batch_size": 64},
        # The base LM continued on the target domain's text (published as
        # lm_commands.ckpt, the SLU recipe's LM).
        "domain_lm": {"number_of_epochs": 10, "batch_size": 64, "lr": 0.001},
        # What decides the training time is how soon the model leaves the CTC
        # blank plateau, and more distinct sentences beat more epochs over
        # fewer: 720 utterances x 32 epochs (44 min) gave 10.8% general test
        # WER, 2160 x 5 epochs (11 min) 6.85%, both decoded with SpeechBrain's
        # LibriSpeech settings. Two DDP ranks (torchrun, gloo, one thread each)
        # share each step of 8 utterances (Adam 1.4e-3; 2e-3 learned slower):
        # an epoch takes about 110 s, no faster than one 2-thread process at
        # the same batch, but 6 such epochs fit where 5 at batch 4 did. This
        # run left the plateau early (valid loss 1.47 after 3 epochs); when it
        # does varies between runs (one process, same batch and rate: 2.10;
        # batch 4: 1.96). A quarter of the rate for the last epoch, no dropout,
        # no augmentation (the test speech is clean synthetic speech).
        "asr": {"number_of_epochs": 6, "number_of_ctc_epochs": 6, "batch_size": 8, "ranks": 2,
                "ctc_weight": 0.5, "lr": 0.0014, "dropout": 0.0, "augment_prob": 0.0},
        # 20 ms frames with time pooling 2 keep the encoder's 40 ms frame rate
        # at half the CNN cost. One bidirectional GRU layer with CNN (24, 48)
        # costs 0.72x the step time of two layers with CNN (32, 64) and was
        # not slower to learn (valid loss after 3 epochs 1.69 against 1.82).
        "model_overrides": {"rnn_type": "GRU", "hop_length": 20, "time_pooling_size": 2,
                            "rnn_layers": 1, "cnn_channels": (24, 48)},
        # The published decoding settings, chosen on the general valid split
        # (python -m sbtemplate.tune_decoding --profile full --split valid
        # --lm-weights 0.3 0.5 0.8 --ctc-weights 0.3 0.5 --eos-thresholds 1.5 5 10 30 100):
        # valid WER 1.92% against 4.98% with SpeechBrain's LibriSpeech values
        # (CTC 0.3, EOS threshold 1.5), which let the decoder end a hypothesis
        # only when EOS is nearly the best token.
        "eval": {"beam_size": 8, "lm_weight": 0.5, "ctc_weight_decode": 0.5, "eos_threshold": 10.0},
    },
    "tiny": {
        "corpus": {
            "general_train": 48,
            "general_valid": 8,
            "general_test": 12,
            "target_test": 16,
            "target_valid": 8,
            "general_lm_train": 400,
            "general_lm_valid": 40,
            "target_lm_train": 120,
            "target_lm_valid": 30,
            "noise_files": 3,
            "rir_files": 3,
        },
        "tokenizer": {"vocab_size": 120},
        # One training thread on every machine: float rounding depends on the
        # thread count, so any core count gives the same models for the same
        # CPU kernels. Other kernels give other bytes (the --debug regression
        # check allows for that; see README, "Determinism").
        "threads": 1,
        "lm": {"number_of_epochs": 2, "batch_size": 32},
        "domain_lm": {"number_of_epochs": 1, "batch_size": 32, "lr": 0.001},
        # ctc_weight / augment_prob: the values this profile's cached model was
        # trained with (the regression expectations depend on it).
        "asr": {"number_of_epochs": 2, "number_of_ctc_epochs": 1, "batch_size": 8,
                "ctc_weight": 0.4, "augment_prob": 0.5},
        # smaller network, same architecture and code
        "model_overrides": {
            "cnn_channels": (8, 16),
            "rnn_neurons": 32,
            "dnn_neurons": 32,
            "emb_size": 16,
            "dec_neurons": 32,
            "attn_dim": 32,
            "lm_emb_size": 16,
            "lm_rnn_neurons": 64,
            "lm_dnn_neurons": 32,
        },
        "eval": {"beam_size": 4},
    },
}


def get_profile(name):
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"Unknown profile {name!r}: choose one of {', '.join(PROFILES)}"
        ) from None
