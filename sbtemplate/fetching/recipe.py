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
from pathlib import Path

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
        where = "loopback servers" if self.mode == "loopback" else "public endpoints"
        return f"{where}: Hub {self.hub_endpoint}, URLs {self.url_base}/<file>"


def _plain_overrides(overrides):
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    import ruamel.yaml

    loaded = ruamel.yaml.YAML(typ="safe", pure=True).load(overrides)
    return dict(loaded or {})


def read_plain_keys(hparams_file, keys, overrides=None):
    """Read top-level keys of a HyperPyYAML file without building anything.

    Plain scalars are returned as they are; ``!ref <key>`` (with text around
    it) is resolved against the other top-level keys and the overrides.
    Nothing is imported or instantiated, so this can run before the Hub
    endpoint is configured.
    """
    import re

    import ruamel.yaml

    text = Path(hparams_file).read_text()
    document = ruamel.yaml.YAML(typ="rt").load(text) or {}
    given = _plain_overrides(overrides)

    def value_of(key, depth=0):
        if key in given:
            return given[key]
        if key not in document or depth > 20:
            raise KeyError(f"{key!r} is not a top-level key of {hparams_file}")
        node = document[key]
        tag = getattr(getattr(node, "tag", None), "value", None) or getattr(node, "tag", None)
        if isinstance(tag, str) and tag.startswith("!"):
            if tag != "!ref":
                raise ValueError(f"{key!r} in {hparams_file} must be a plain value or a !ref")
            return re.sub(
                r"<([^<>]+)>", lambda m: str(value_of(m.group(1), depth + 1)), str(node.value)
            )
        return node

    return {key: value_of(key) for key in keys}


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
        ("fetch_endpoints", "profile", "artifacts", "repo_id", "hub_repo_id", "public_hub_endpoint"),
        given,
    )
    mode = str(keys["fetch_endpoints"])
    if mode not in ENDPOINT_MODES:
        raise ValueError(f"fetch_endpoints must be one of {ENDPOINT_MODES}, got {mode!r}")
    hub_repo_id = str(keys["hub_repo_id"])
    if mode == "public":
        hub = str(keys["public_hub_endpoint"]).rstrip("/")
        given.update(hub_endpoint=hub, url_base=f"{hub}/{hub_repo_id}/resolve/main")
        setup(hub_endpoint=hub, cache_dir=cache_dir)
        yield Endpoints(mode, hub, given["url_base"], given)
        return
    paths = ProfilePaths.for_profile(str(keys["profile"]), root=keys["artifacts"])
    folder = paths.local_repo
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Nothing to serve: {folder} does not exist (build the '{paths.profile}' profile "
            f"with python -m sbtemplate.build --profile {paths.profile})"
        )
    with servers.serve(folder, hub_repo_id) as served:
        given.update(hub_endpoint=served.hub_endpoint, url_base=served.url_base)
        setup(hub_endpoint=served.hub_endpoint, cache_dir=cache_dir)
        yield Endpoints(mode, served.hub_endpoint, served.url_base, given, served)


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
