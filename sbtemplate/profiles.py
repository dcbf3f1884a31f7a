"""Build profiles: how much data and how big a model, one YAML file each.

The profiles are the files ``sbtemplate/hparams/profiles/<name>.yaml``:
``full`` is the main job's default, ``tiny`` what the tests build. Every YAML
that builds the recognizer reads a profile through ``!include:`` (the key
``build_profile``); Python reads the same files through :func:`get_profile`.
"""

from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent / "hparams" / "profiles"


def profile_names():
    """The profiles there are: one per YAML file in ``PROFILES_DIR``."""
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def profile_file(name):
    """The YAML file of profile ``name``; a clear error for an unknown name."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(
            f"Unknown profile {name!r}: choose one of {', '.join(profile_names())} "
            f"(the files in {PROFILES_DIR})"
        )
    return path


def include_override(name):
    """The HyperPyYAML override that makes a recipe YAML use profile ``name``.

    ``build_profile: !include:<file>`` (an absolute path, so it works for a YAML
    file anywhere). On the command line the same is
    ``--build_profile='!include:sbtemplate/hparams/profiles/<name>.yaml'``.
    """
    return f"build_profile: !include:{profile_file(name)}"


def get_profile(name):
    """Profile ``name`` as plain data: ``name``, ``recognizer`` and ``build``."""
    from hyperpyyaml import load_hyperpyyaml

    with open(profile_file(name)) as handle:
        profile = load_hyperpyyaml(handle)
    if profile.get("name") != name:
        raise ValueError(f"{profile_file(name)} says name: {profile.get('name')!r}, not {name!r}")
    return profile
