"""Where the offline build puts things, per profile.

Everything generated lives under ``artifacts/<profile>/`` (ignored by git), so
the ``tiny`` profile of the tests never touches the ``full`` one of the main job.
``SBTEMPLATE_ARTIFACTS`` moves the whole tree elsewhere.
"""

import os
from dataclasses import dataclass
from pathlib import Path

# The Hub-style id the base recognizer is published under. The data is
# synthetic (espeak-ng), so the name says so.
REPO_ID = "synthspeech/asr-crdnn-rnnlm-synth"
EXPERIMENT = "CRDNN_BPE_synth_RNNLM"
SEED = 2602

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def artifacts_root():
    """Root of all generated artefacts (env ``SBTEMPLATE_ARTIFACTS``)."""
    return Path(os.environ.get("SBTEMPLATE_ARTIFACTS", PROJECT_ROOT / "artifacts"))


@dataclass(frozen=True)
class ProfilePaths:
    """The layout of one profile's artefacts."""

    profile: str
    root: Path

    @classmethod
    def for_profile(cls, profile, root=None):
        """The layout of ``profile`` under ``root`` (default: :func:`artifacts_root`).

        An unknown profile raises ValueError here, before any path is used.
        """
        from sbtemplate.profiles import profile_file

        profile_file(profile)  # an unknown profile is named here
        base = Path(root) if root is not None else artifacts_root()
        return cls(profile, base / profile)

    @property
    def corpus(self):
        """LibriSpeech-layout data root (``{data_root}`` in the manifests)."""
        return self.root / "corpus"

    @property
    def manifests(self):
        """JSON descriptors (train/valid/test) and text-only LM files."""
        return self.root / "manifests"

    @property
    def experiment(self):
        """``results/<experiment>/<seed>`` as SpeechBrain recipes lay it out."""
        return self.root / "results" / EXPERIMENT / str(SEED)

    @property
    def model_dir(self):
        """The published recognizer: asr/lm/tokenizer/normalizer ckpts + hyperparams.yaml."""
        return self.experiment / "save" / "CKPT+latest"

    @property
    def local_repo(self):
        """Folder named like the Hub repo id, a symlink to ``model_dir``."""
        return self.root / REPO_ID

    @property
    def build_report(self):
        """JSON with the base recognizer's WERs, written at the end of a build."""
        return self.root / "build_report.json"


def artifacts_folder():
    """:func:`artifacts_root` as text, for the recipes' YAML.

    ``artifacts: !applyref:sbtemplate.paths.artifacts_folder []``
    """
    return str(artifacts_root())
