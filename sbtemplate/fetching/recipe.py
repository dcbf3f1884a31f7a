"""Configurations that declare their sources (finetune.yaml and the like).

A recipe's HyperPyYAML file names its Hub repo, its URL base and whether
they are served by the loopback servers or the public endpoints
(``fetch_endpoints: loopback`` or ``public``). :func:`read_plain_keys` reads
such keys without building anything (so before the Hub endpoint is set),
:func:`fetch_endpoints` resolves the endpoints, starts the servers if needed
and sets fetching up, and :func:`collect_pretrained` collects the
configuration's Pretrainers on every DDP rank.
"""

import dataclasses
from contextlib import contextmanager

from sbtemplate.fetching.hook import installed, setup

ENDPOINT_MODES = ("loopback", "public")


@dataclasses.dataclass
class Endpoints:
    """Where a configuration's Hub and URL sources point, once resolved."""

    mode: str
    hub_endpoint: str
    url_base: str
    overrides: dict
    served: object = None  # sbtemplate.servers.Served in loopback mode

    def describe(self):
        """One line for the logs: loopback servers or public endpoints, the Hub and the URL base."""
        where = "loopback servers" if self.mode == "loopback" else "public endpoints"
        return f"{where}: Hub {self.hub_endpoint}, URLs {self.url_base}/<file>"


def _plain_overrides(overrides):
    """Overrides as a mapping. YAML text is read round-trip, so that tags such
    as ``build_profile: !include:...`` stay tags for HyperPyYAML."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    import ruamel.yaml

    return dict(ruamel.yaml.YAML(typ="rt").load(overrides) or {})


def read_plain_keys(hparams_file, keys, overrides=None):
    """Top-level values of a HyperPyYAML file, without building anything.

    HyperPyYAML resolves the file as it will when it loads it (overrides,
    ``!include:``, ``!ref``), but no object is made and nothing is imported,
    so this can run before the Hub endpoint is configured.
    """
    import ruamel.yaml
    from hyperpyyaml import resolve_references

    with open(hparams_file) as handle:
        text = resolve_references(handle, _plain_overrides(overrides)).getvalue()
    document = ruamel.yaml.YAML(typ="rt").load(text) or {}
    missing = [key for key in keys if key not in document]
    if missing:
        raise KeyError(f"{', '.join(map(repr, missing))}: not a top-level key of {hparams_file}")
    return {key: document[key] for key in keys}


@contextmanager
def fetch_endpoints(hparams_file, overrides=None, *, cache_dir=None):
    """Resolve the endpoints of a configuration with ``fetch_endpoints``.

    ``loopback`` starts the Hub and URL servers over the profile's folder
    named like the repo id; ``public`` uses ``public_hub_endpoint``. In both
    cases the Hub client is pointed at the endpoint, the fetch hook is
    installed, and the yielded :class:`Endpoints` carries the overrides
    (``hub_endpoint``, ``url_base``, ``artifacts``) to load the file with.
    The servers stop on exit.
    """
    from sbtemplate import servers
    from sbtemplate.paths import ProfilePaths, artifacts_root

    given = _plain_overrides(overrides)
    given.setdefault("artifacts", str(artifacts_root()))
    keys = read_plain_keys(
        hparams_file,
        (
            "fetch_endpoints",
            "profile",
            "artifacts",
            "repo_id",
            "hub_repo_id",
            "public_hub_endpoint",
            "hub_endpoint",
            "url_base",
        ),
        given,
    )
    # A user's own endpoint or URL base is used as it is.
    own = {key: str(keys[key]).rstrip("/") for key in ("hub_endpoint", "url_base") if keys[key]}
    mode = str(keys["fetch_endpoints"])
    if mode not in ENDPOINT_MODES:
        raise ValueError(f"fetch_endpoints must be one of {ENDPOINT_MODES}, got {mode!r}")
    hub_repo_id = str(keys["hub_repo_id"])
    if mode == "public":
        hub = str(keys["public_hub_endpoint"]).rstrip("/")
        given.update({"hub_endpoint": hub, "url_base": f"{hub}/{hub_repo_id}/resolve/main", **own})
        setup(hub_endpoint=given["hub_endpoint"], cache_dir=cache_dir)
        yield Endpoints(mode, given["hub_endpoint"], given["url_base"], given)
        return
    paths = ProfilePaths.for_profile(str(keys["profile"]), root=keys["artifacts"])
    folder = paths.local_repo
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Nothing to serve: {folder} does not exist (build the '{paths.profile}' profile "
            f"with python -m sbtemplate.build --profile {paths.profile})"
        )
    with servers.serve(folder, hub_repo_id) as served:
        given.update({"hub_endpoint": served.hub_endpoint, "url_base": served.url_base, **own})
        setup(hub_endpoint=given["hub_endpoint"], cache_dir=cache_dir)
        yield Endpoints(mode, given["hub_endpoint"], given["url_base"], given, served)


PRETRAINER_KEYS = ("pretrainer_asr", "pretrainer_lm", "pretrainer_tokenizer")


def collect_pretrained(hparams, keys=PRETRAINER_KEYS, load=True):
    """Collect (and load) the Pretrainers named ``keys`` of loaded hparams.

    Every rank calls this: fetching is coordinated inside (one download,
    errors everywhere). Returns {pretrainer key: {loadable: local path}}.
    """
    if not installed():
        raise RuntimeError("call sbtemplate.fetching.setup() (or fetch_endpoints()) first")
    collected = {}
    for key in keys:
        pretrainer = hparams[key]
        if pretrainer.collect_in is not None:  # Pretrainer creates only the last level
            pretrainer.collect_in.mkdir(parents=True, exist_ok=True)
        collected[key] = {name: str(path) for name, path in pretrainer.collect_files().items()}
        if load:
            pretrainer.load_collected()
    return collected
