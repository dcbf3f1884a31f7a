"""Under DDP (2 ranks, gloo) only rank 0 downloads; rank 1 waits, then loads
from the cache; a fetch error reaches both ranks instead of hanging one."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fetch_helpers import EXAMPLE_WAV, fake_repo  # noqa: F401 - fixture
from network_guard import _forbid_network  # noqa: F401 - autouse fixture

from sbtemplate import servers
from sbtemplate.manifest import sha256_file
from sbtemplate.paths import REPO_ID

WORKER = r"""
import json, os, sys
tests_dir, hub_endpoint, url_base, repo_folder, cache, save = sys.argv[1:7]
sys.path.insert(0, tests_dir)
import network_guard
network_guard.install()

from sbtemplate import fetching
fetching.setup(hub_endpoint=hub_endpoint, cache_dir=cache)

import torch
import torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
rank = dist.get_rank()

from speechbrain.utils.fetching import FetchFrom, FetchSource, fetch
from speechbrain.utils.parameter_transfer import Pretrainer
from sbtemplate.manifest import sha256_file

pretrainer = Pretrainer(
    collect_in=save,
    loadables={name: torch.nn.Linear(1, 1) for name in ("asr", "lm", "tokenizer")},
    paths={
        "asr": FetchSource(FetchFrom.LOCAL, repo_folder + "/asr.ckpt"),
        "lm": FetchSource(FetchFrom.HUGGING_FACE, "%(repo)s/lm.ckpt"),
        "tokenizer": FetchSource(FetchFrom.URI, url_base + "/tokenizer.ckpt"),
    },
)
paths = pretrainer.collect_files()
wav = fetch("%(wav)s", FetchSource(FetchFrom.HUGGING_FACE, "%(repo)s"))
digests = {name: sha256_file(path) for name, path in paths.items()}
digests["wav"] = sha256_file(wav)

try:
    fetch("no-such.ckpt", FetchSource(FetchFrom.HUGGING_FACE, "%(repo)s"), savedir=save)
    error = None
except fetching.FetchError as exc:
    error = str(exc)

dist.barrier()
print("RESULT " + json.dumps({
    "rank": rank,
    "digests": digests,
    "records": [(r.filename, r.kind, r.status) for r in fetching.fetch_log],
    "error": error,
}), flush=True)
dist.destroy_process_group()
""" % {"repo": REPO_ID, "wav": EXAMPLE_WAV}  # noqa: UP031 - the template holds Python braces


def test_one_rank_downloads_the_others_wait_and_load(fake_repo, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    tests_dir = str(Path(__file__).resolve().parent)
    port = servers.unused_loopback_port()
    with servers.serve(fake_repo, REPO_ID) as served:
        procs = []
        for rank in range(2):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
            env.pop("HF_ENDPOINT", None)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(worker),
                        tests_dir,
                        served.hub_endpoint,
                        served.url_base,
                        str(fake_repo),
                        str(tmp_path / "cache"),
                        str(tmp_path / "save"),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=Path(tests_dir).parent,
                )
            )
        outputs = []
        try:
            for proc in procs:
                out, err = proc.communicate(timeout=240)
                outputs.append((proc.returncode, out, err))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        hub_gets = {
            name: len(served.hub.gets("/" + name))
            for name in ("lm.ckpt", EXAMPLE_WAV, "manifest.json", "no-such.ckpt")
        }
        url_gets = {
            name: len(served.urls.gets("/" + name)) for name in ("tokenizer.ckpt", "manifest.json")
        }

    results = {}
    for code, out, err in outputs:
        assert code == 0, err[-3000:]
        line = next(text for text in out.splitlines() if text.startswith("RESULT "))
        result = json.loads(line[len("RESULT ") :])
        results[result["rank"]] = result
    assert set(results) == {0, 1}

    expected = {
        "asr": sha256_file(fake_repo / "asr.ckpt"),
        "lm": sha256_file(fake_repo / "lm.ckpt"),
        "tokenizer": sha256_file(fake_repo / "tokenizer.ckpt"),
        "wav": sha256_file(fake_repo / EXAMPLE_WAV),
    }
    assert results[0]["digests"] == expected == results[1]["digests"]

    # Each file crossed the wire once: rank 0 downloaded, rank 1 did not.
    assert hub_gets == {"lm.ckpt": 1, EXAMPLE_WAV: 1, "manifest.json": 1, "no-such.ckpt": 0}
    assert url_gets == {"tokenizer.ckpt": 1, "manifest.json": 1}
    statuses = {rank: {f: s for f, _, s in results[rank]["records"]} for rank in results}
    assert statuses[0] == {
        "asr.ckpt": "local",
        "lm.ckpt": "downloaded",
        "tokenizer.ckpt": "downloaded",
        EXAMPLE_WAV: "downloaded",
    }
    assert statuses[1] == {
        "asr.ckpt": "local",
        "lm.ckpt": "cached",
        "tokenizer.ckpt": "cached",
        EXAMPLE_WAV: "cached",
    }

    # The error reached both ranks, with the same message.
    assert results[0]["error"] and results[0]["error"] == results[1]["error"]
    assert (
        "no-such.ckpt" in results[0]["error"]
        and "file not found in the repo" in results[0]["error"]
    )
