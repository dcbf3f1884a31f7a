"""Build profiles: how much data and how big a model.

``full`` is the main job's default (about 47 minutes on 2 CPU cores);
``tiny`` exercises every code path in seconds to a couple of minutes and is
what the test suite builds. Both use the same code; only these numbers differ.
"""

PROFILES = {
    "full": {
        "corpus": {
            # speech splits (LibriSpeech layout)
            "general_train": 720,
            "general_valid": 60,
            "general_test": 100,
            "target_test": 150,
            "target_valid": 80,
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
        # The CTC blank plateau decides the training time: Adam at 1e-3 with
        # small batches and no dropout leaves it (at 3e-3 it stays there). With
        # word lists in the corpus the attention decoder cannot lean on the
        # sentence templates: it leaves the plateau after about 9 epochs and
        # needs about 30 (general test WER 14.6% after 22, 10.8% after 32).
        # Clean synthetic test speech: no augmentation.
        "asr": {"number_of_epochs": 32, "number_of_ctc_epochs": 32, "batch_size": 4,
                "ctc_weight": 0.5, "lr": 0.001, "dropout": 0.0, "augment_prob": 0.0},
        # A GRU encoder with the full CNN front end leaves the CTC plateau in
        # far fewer epochs than an LSTM with CNN (16, 32) (valid WER 36% against
        # 97% after 9 epochs on the corpus without word lists), for about twice
        # the step time. A GRU with CNN (16, 32) (0.6x the step time) was still
        # on the plateau after 7 epochs (valid WER 139%).
        "model_overrides": {"rnn_type": "GRU"},
        "eval": {"beam_size": 8},
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
        # thread count, and the --debug regression expectation pins the bytes
        # of this profile's models.
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
