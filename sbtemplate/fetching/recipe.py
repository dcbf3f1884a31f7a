"""Configurations that declare their sources (finetune.yaml and the like).

A recipe's HyperPyYAML file names its Hub repo and whether it is reached
through loopback servers or the public endpoints, in one block that
HyperPyYAML resolves while it loads the file::

    endpoints: !applyref:sbtemplate.fetching.resolve_endpoints
        mode: !ref <fetch_endpoints>          # loopback | public
        local_repo: !ref <local_repo>
        hub_repo_id: !ref <hub_repo_id>
        public_hub_endpoint: !ref <public_hub_endpoint>
    hub_endpoint: !ref <endpoints[hub_endpoint]>
    url_base: !ref <endpoints[url_base]>

:func:`resolve_endpoints` starts the loopback servers (once per process and
folder; :func:`stop_serving` stops them) and returns the Hub endpoint and URL
base the sources are written with. :func:`use_endpoints` points the Hub
client at the loaded file's ``hub_endpoint`` and installs the fetch hook;
:func:`collect_pretrained` collects the configuration's Pretrainers on every
DDP rank.

Module state: ``_serving``, the loopback servers this process runs.
"""

import atexit
import contextlib
from pathlib import Path

from sbtemplate.fetching.hook import installed, setup

ENDPOINT_MODES = ("loopback", "public")

_serving = {}  # (folder, repo id) -> (ExitStack, sbtemplate.servers.Served)


def resolve_endpoints(mode, local_repo, hub_repo_id, public_hub_endpoint, profile=None, build=None):
    """The Hub endpoint and URL base of ``mode``, as a mapping for the YAML.

    ``loopback`` serves ``local_repo`` as Hub repo ``hub_repo_id`` on
    127.0.0.1 (started on the first call for that folder, reused after, so a
    file that is resolved again gets the same addresses); ``public`` is
    ``public_hub_endpoint`` and its ``resolve/main`` URLs. The error for a
    missing ``local_repo`` names the command that makes it: ``build``, or the
    build of ``profile``.
    """
    from sbtemplate.config_checks import ConfigError

    mode = str(mode)
    if mode not in ENDPOINT_MODES:
        raise ConfigError(f"fetch_endpoints must be one of {ENDPOINT_MODES}, got {mode!r}")
    hub_repo_id = str(hub_repo_id)
    if mode == "public":
        hub = str(public_hub_endpoint).rstrip("/")
        return {"mode": mode, "hub_endpoint": hub, "url_base": f"{hub}/{hub_repo_id}/resolve/main"}
    if build is None:
        build = f"python -m sbtemplate.build --profile {profile or '<name>'}"
    served = loopback_servers(local_repo, hub_repo_id, build)
    return {"mode": mode, "hub_endpoint": served.hub_endpoint, "url_base": served.url_base}


def loopback_servers(local_repo, hub_repo_id, build=None):
    """The running loopback servers of ``local_repo`` (started if need be);
    ``build``: the command that makes a missing ``local_repo``."""
    from sbtemplate import servers

    folder = Path(local_repo)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Nothing to serve: {folder} does not exist (build it first: "
            f"{build or 'python -m sbtemplate.build --profile <name>'}; "
            "or set fetch_endpoints: public)"
        )
    key = (str(folder.resolve()), str(hub_repo_id))
    if key not in _serving:
        if not _serving:
            atexit.register(stop_serving)
        stack = contextlib.ExitStack()
        _serving[key] = (stack, stack.enter_context(servers.serve(folder, str(hub_repo_id))))
    return _serving[key][1]


def stop_serving():
    """Stop every loopback server :func:`resolve_endpoints` started."""
    while _serving:
        _key, (stack, _served) = _serving.popitem()
        stack.close()


def use_endpoints(hparams, cache_dir):
    """Point the Hub client at the loaded file's ``hub_endpoint`` and install
    the fetch hook (cache under ``cache_dir``). Returns one line for the logs."""
    setup(hub_endpoint=hparams["hub_endpoint"], cache_dir=cache_dir)
    mode = hparams["endpoints"]["mode"]
    where = "loopback servers" if mode == "loopback" else "public endpoints"
    return f"{where}: Hub {hparams['hub_endpoint']}, URLs {hparams['url_base']}/<file>"


PRETRAINER_KEYS = ("pretrainer_asr", "pretrainer_lm", "pretrainer_tokenizer")


def collect_pretrained(hparams, keys=PRETRAINER_KEYS, load=True):
    """Collect (and load) the Pretrainers named ``keys`` of loaded hparams.

    Every rank calls this: fetching is coordinated inside (one download,
    errors everywhere). Returns {pretrainer key: {loadable: local path}}.
    """
    if not installed():
        raise RuntimeError("call sbtemplate.fetching.setup() (or use_endpoints()) first")
    collected = {}
    for key in keys:
        pretrainer = hparams[key]
        if pretrainer.collect_in is not None:  # Pretrainer creates only the last level
            pretrainer.collect_in.mkdir(parents=True, exist_ok=True)
        collected[key] = {name: str(path) for name, path in pretrainer.collect_files().items()}
        if load:
            pretrainer.load_collected()
    return collected
