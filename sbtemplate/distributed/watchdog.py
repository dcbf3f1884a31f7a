"""Hang watchdog: end a DDP run whose ranks wait for each other forever.

Why: when a regression makes the ranks call different collectives (rank 0 in
a SpeechBrain ``all_reduce``, rank 1 in this project's ``all_gather_object``),
or when one rank stops making progress (stopped process, dead file system),
every rank waits silently until the collective timeout (15 min and more), and
then gloo names neither the ranks nor the call sites. A timeout short enough
to catch this would also cut a slow but healthy evaluation short.

So instead of shortening a timeout, each rank runs a daemon thread that every
``poll_s`` seconds samples the *main* thread's Python stack and publishes a
heartbeat: whether the rank is inside a ``torch.distributed`` collective (and
which one, at which call site), and how long ago it last made progress (its
stack changed, or it used CPU: a decoding loop or one long tensor operation
both count). Each thread reads the other ranks' heartbeats and ends the run
(one line on stderr, then ``os._exit(1)``; torchrun then stops the others)
only when:

* every rank has been waiting in a collective for ``mismatch_s`` or more, at
  two or more different call sites (they can never match); or
* this rank waits in a collective while another rank, outside any
  collective, has made no progress for ``stall_s`` or more, or has sent no
  heartbeat for that long (frozen or dead process); or
* every rank waits in a collective and none has made progress for ``stall_s``.

DDP reduces gradients inside autograd's C++ engine, where no Python frame
shows it: a rank idle inside ``backward`` for two samples counts as waiting
in a collective, ``backward (DDP gradient all_reduce)``.

A rank waiting while another computes (stack changing or CPU busy) is
healthy however long it takes: no timeout is shortened.

Heartbeats go through the process group's TCPStore (the one torchrun's agent
hosts, shared by every rank on every node) on a connection of the watchdog's
own, so the watchdog never contends for the main thread's store client; with
a non-TCP store (``file://`` init) the default store itself is used. The
watchdog thread never touches the main thread's objects except to read its
frames (``sys._current_frames``): no lock is taken on the main thread's path.
"""

import json
import os
import site
import sys
import sysconfig
import threading
import time
from datetime import timedelta
from pathlib import Path

SEAM = "samplers/DDP"
DEFAULT_MISMATCH_S = 30.0
DEFAULT_STALL_S = 75.0
DEFAULT_POLL_S = 2.0
# Frames that only forward to a collective: the call site named is their caller's.
DEFAULT_WRAPPERS = ("speechbrain/utils/distributed.py", "sbtemplate/distributed/sync.py")
# A rank whose process (and its child processes) used at least this share of
# one core since the last sample is computing, even if its stack is unchanged.
BUSY_CPU_SHARE = 0.1
_REPO_ROOT = Path(__file__).resolve().parents[2]
_GENERIC_TORCH = {"wrapper", "inner", "decorator", "_fn"}
# DDP reduces gradients inside autograd's C++ engine: no torch.distributed frame
# shows it. A backward that neither computes nor moves is taken as that wait.
_BACKWARD = {"_engine_run_backward", "run_backward"}
BACKWARD_WAIT = "backward (DDP gradient all_reduce)"


class _NoWatchdog:
    """What :func:`start_watchdog` returns outside a multi-rank process group."""

    active = False

    def stop(self):
        """Nothing to stop."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_watchdog(
    rank,
    world_size,
    mismatch_s=DEFAULT_MISMATCH_S,
    stall_s=DEFAULT_STALL_S,
    poll_s=DEFAULT_POLL_S,
    label=None,
    store=None,
    on_hang=None,
    wrappers=DEFAULT_WRAPPERS,
):
    """Start the hang watchdog of this rank; a no-op object when ``world_size`` is 1.

    Call it on every rank right after the process group is initialised; call
    ``.stop()`` (or leave the ``with`` block) before ``destroy_process_group``.
    ``label``: a string or a callable returning one (the current stage), shown
    in the hang line. ``store``: a ``torch.distributed.Store`` shared by the
    ranks (default: a connection to the default process group's store).
    ``on_hang(line)``: replaces writing ``line`` to stderr and ``os._exit(1)``.
    """
    if world_size <= 1:
        return _NoWatchdog()
    watchdog = HangWatchdog(
        rank, world_size, mismatch_s, stall_s, poll_s, label, store, on_hang, wrappers
    )
    watchdog.start()
    return watchdog


def _default_store(timeout_s):
    """A store client shared by all ranks: its own TCPStore connection when possible."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "start_watchdog: no process group; call it after init_process_group, or pass store="
        )
    # Private API (torch 2.x): the store the default group was created with.
    store = dist.distributed_c10d._get_default_store()
    base = store
    while hasattr(base, "underlying_store"):  # PrefixStore layers
        base = base.underlying_store
    if isinstance(base, dist.TCPStore):
        return dist.TCPStore(
            base.host,
            base.port,
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
    return store


def _key_prefix():
    """Keys unique to this run and restart, so no stale heartbeat of an earlier attempt is read."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"sbtemplate/watchdog/{run_id}/{restart}/"


class _Paths:
    """Short, stable names for source files: relative to site-packages or the repository."""

    def __init__(self, wrappers):
        roots = {_REPO_ROOT, Path.cwd()}
        for path in [*site.getsitepackages(), site.getusersitepackages()]:
            roots.add(Path(path))
        for name in ("purelib", "platlib"):
            roots.add(Path(sysconfig.get_paths()[name]))
        for package in ("torch", "speechbrain"):  # also when installed in editable mode
            module = sys.modules.get(package)
            if module is not None and getattr(module, "__file__", None):
                roots.add(Path(module.__file__).resolve().parents[1])
        self.roots = sorted({str(r.resolve()) + os.sep for r in roots}, key=len, reverse=True)
        self.stdlib = str(Path(sysconfig.get_paths()["stdlib"]).resolve()) + os.sep
        self.wrappers = tuple(wrappers)
        self.cache = {}

    def kind(self, filename):
        """``(short name, kind)``; kind is ``torch``, ``stdlib``, ``wrapper`` or ``own``."""
        found = self.cache.get(filename)
        if found is None:
            found = self.cache[filename] = self._classify(filename)
        return found

    def _classify(self, filename):
        if filename.startswith("<"):
            return filename, "stdlib"
        path = os.path.realpath(filename)
        roots = [*self.roots, self.stdlib]
        short = next((path[len(r) :] for r in roots if path.startswith(r)), path)
        short = short.replace(os.sep, "/")
        if short.startswith("torch/"):
            return short, "torch"
        if short.endswith(self.wrappers):
            return short, "wrapper"
        if path.startswith(self.stdlib) and "site-packages" not in path:
            return short, "stdlib"
        return short, "own"


def _describe(frame, paths):
    """Stack signature, collective and call site of a thread's innermost ``frame``."""
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    signature = hash(tuple((f.f_code, f.f_lineno, f.f_lasti) for f in stack))
    collective = where = via = inner = None
    torch_run = []  # the torch frames nearest the top (stdlib frames above them skipped)
    for f in stack:
        short, kind = paths.kind(f.f_code.co_filename)
        name = f"{short}:{f.f_lineno} ({f.f_code.co_name})"
        if inner is None:
            inner = name
        if kind == "torch" and via is None:
            torch_run.append((short, f.f_code.co_name))
        elif kind == "wrapper" and where is None:
            via = via or name
        elif kind == "own":
            where = name
            break
    else:
        where = inner
    backward = any(func in _BACKWARD for _, func in torch_run)
    for short, func in reversed(torch_run):  # outermost first: the public collective
        if short.startswith("torch/distributed/") and func not in _GENERIC_TORCH:
            collective = func
            break
        if short == "torch/nn/parallel/distributed.py":
            collective = f"DDP {func}"
            break
    return {
        "signature": signature,
        "coll": collective,
        "where": where,
        "via": via,
        "inner": None if inner == where else inner,
        "backward": backward,
    }


def _descendants_cpu_s():
    """CPU seconds of this process's live child processes, recursively (Linux; else 0).

    Counts as progress a rank that waits for its DataLoader workers or a
    subprocess doing the work. A child that ends meanwhile is skipped: CPU is a hint.
    """
    me, total, todo, seen = os.getpid(), 0.0, [os.getpid()], set()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    while todo and len(seen) < 256:
        pid = todo.pop()
        seen.add(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(c for c in map(int, f.read().split()) if c not in seen)
            if pid != me:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - best effort before exiting
            pass


def _exit_with(line):
    """Default hang action: the line on stderr in one write, then exit 1 at once."""
    flusher = threading.Thread(target=_flush_std, daemon=True)
    flusher.start()
    flusher.join(2.0)  # the main thread might hold a stream's lock: do not wait on it
    try:
        os.write(2, (line.rstrip("\n") + "\n").encode())
    finally:
        os._exit(1)


class HangWatchdog:
    """One rank's watchdog: a sampling thread and a heartbeat-exchange thread (daemons).

    The sampler never touches the store: it decides from the last heartbeats
    the exchange thread received, timed by this process's monotonic clock, so
    a store that stops answering counts as ranks that stopped sending.
    """

    active = True

    def __init__(
        self,
        rank,
        world_size,
        mismatch_s=DEFAULT_MISMATCH_S,
        stall_s=DEFAULT_STALL_S,
        poll_s=DEFAULT_POLL_S,
        label=None,
        store=None,
        on_hang=None,
        wrappers=DEFAULT_WRAPPERS,
    ):
        self.rank, self.world_size = int(rank), int(world_size)
        self.mismatch_s, self.stall_s, self.poll_s = (
            float(mismatch_s),
            float(stall_s),
            float(poll_s),
        )
        self.label = label
        self.store = store
        self.on_hang = on_hang or _exit_with
        self.paths = _Paths(wrappers)
        self.prefix = _key_prefix()
        self.mine = None  # this rank's latest heartbeat (replaced whole, never mutated)
        self.peers = {}  # rank -> (heartbeat, monotonic time its seq last changed here)
        self._stopping = threading.Event()
        self._threads = []
        self._main_ident = threading.main_thread().ident

    # -- life cycle

    def start(self):
        """Connect to the store (here, so a wiring error raises at the call) and start the threads."""
        if self.store is None:
            self.store = _default_store(timeout_s=max(30.0, 3 * self.poll_s))
        self._threads = [
            threading.Thread(target=self._guard, args=(self._sample_loop,), daemon=True),
            threading.Thread(target=self._guard, args=(self._exchange_loop,), daemon=True),
        ]
        for i, thread in enumerate(self._threads):
            thread.name = f"sbtemplate-watchdog-{('sample', 'exchange')[i]}-rank{self.rank}"
            thread.start()
        import atexit

        atexit.register(self.stop)  # joined before the interpreter tears threads down
        return self

    def stop(self):
        """Stop and join both threads; says so in a last heartbeat. Safe to call twice."""
        self._stopping.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(self.poll_s + 10.0)
        import atexit

        atexit.unregister(self.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _guard(self, loop):
        """Run ``loop``; a bug in the watchdog must never take the run down, nor a peer."""
        try:
            loop()
        except Exception as exc:  # noqa: BLE001 - reported once, watchdog off
            self.mine = {"rank": self.rank, "seq": -2, "stopped": True}  # peers ignore this rank
            os.write(2, f"rank {self.rank}: warning: hang watchdog stopped: {exc!r}\n".encode())

    # -- sampling and deciding (no store access here)

    def _label(self):
        try:
            value = self.label() if callable(self.label) else self.label
            return None if value is None else str(value)
        except Exception:  # noqa: BLE001 - a label is decoration
            return None

    def _sample_loop(self):
        seq, last_sig, last_site, coll_since = 0, None, None, None
        last_progress = last_t = time.monotonic()
        last_cpu = time.process_time() + _descendants_cpu_s()
        while not self._stopping.wait(self.poll_s):
            frame = sys._current_frames().get(self._main_ident)
            if frame is None:  # main thread finished
                return
            now, seq = time.monotonic(), seq + 1
            state = _describe(frame, self.paths)
            del frame
            cpu = time.process_time() + _descendants_cpu_s()
            busy = cpu - last_cpu >= BUSY_CPU_SHARE * (now - last_t)
            if state["signature"] != last_sig or busy:
                last_progress = now
            if (
                state.pop("backward")
                and not state["coll"]
                and now - last_progress >= 2 * self.poll_s
            ):
                state["coll"] = BACKWARD_WAIT
            site = (state["coll"], state["where"], state["via"]) if state["coll"] else None
            if site != last_site:
                coll_since = now
            last_sig, last_site, last_cpu, last_t = state.pop("signature"), site, cpu, now
            state.update(
                seq=seq,
                rank=self.rank,
                coll_s=round(now - coll_since, 1) if site else 0.0,
                idle_s=round(now - last_progress, 1),
                label=self._label(),
            )
            self.mine = state
            line = self._verdict(state, now)
            if line is not None and not self._stopping.is_set():
                self.on_hang(line)
                return

    def _verdict(self, mine, now):
        """The hang line, or None while the ranks may still make progress."""
        if not mine["coll"]:
            return None
        fresh, silent = {}, {}
        for q, (beat, changed) in list(self.peers.items()):
            if beat.get("stopped"):
                continue
            if now - changed >= self.stall_s:
                silent[q] = (beat, now - changed)
            else:
                fresh[q] = beat
        stalled = {q: b for q, b in fresh.items() if not b["coll"] and b["idle_s"] >= self.stall_s}
        if stalled or silent:
            parts = {q: self._doing(b, stalled=True) for q, b in stalled.items()}
            for q, (beat, age) in silent.items():
                parts[q] = (
                    f"sent no heartbeat for {age:.0f} s (process frozen or dead, or the store"
                    f" unreachable); it last {self._doing(beat)}"
                )
            culprit = ", ".join(sorted({_module(b["where"]) for b in stalled.values()}))
            beats = {**fresh, **{q: b for q, (b, _) in silent.items()}}
            return self._line(mine, beats, parts, culprit or "the silent rank's host or process")
        everyone = [mine, *fresh.values()]
        if len(fresh) < self.world_size - 1 or not all(b["coll"] for b in everyone):
            return None  # a rank computes, or has not been heard from yet
        callers = ", ".join(sorted({_module(b["where"]) for b in everyone}))
        culprit = f"the code calling these collectives: {callers}"
        if all(b["idle_s"] >= self.stall_s for b in everyone):
            note = f"no rank made progress for {self.stall_s:g} s; "
            return self._line(mine, fresh, {}, note + culprit)
        sites = {(b["coll"], b["where"], b["via"]) for b in everyone}
        if len(sites) > 1 and all(b["coll_s"] >= self.mismatch_s for b in everyone):
            return self._line(mine, fresh, {}, culprit)
        return None

    @staticmethod
    def _doing(beat, stalled=False):
        """What a heartbeat says its rank does, e.g. ``waits in barrier at f.py:3 (g) for 40 s``."""
        if beat.get("coll"):
            via = f" via {beat['via']}" if beat.get("via") else ""
            return f"waits in {beat['coll']} at {beat['where']}{via} for {beat['coll_s']:.0f} s"
        inner = f" in {beat['inner']}" if beat.get("inner") else ""
        if stalled:
            return f"stopped making progress at {beat['where']}{inner} for {beat['idle_s']:.0f} s"
        return f"runs at {beat['where']}{inner}"

    def _line(self, mine, others, parts, culprit):
        beats = {self.rank: mine, **others}
        for q, beat in beats.items():
            parts.setdefault(q, self._doing(beat))
        listed = "; ".join(f"rank {q}{_label_of(beats.get(q))} {parts[q]}" for q in sorted(parts))
        return (
            f"rank {self.rank}: ERROR: [{SEAM}] ranks hang: {listed} (at fault: {culprit};"
            f" hang watchdog: mismatch_s={self.mismatch_s:g}, stall_s={self.stall_s:g})"
        )

    # -- heartbeat exchange (the only code that touches the store)

    def _exchange_loop(self):
        last_sent, warned = None, False
        while not self._stopping.wait(self.poll_s / 2):
            try:
                last_sent = self._exchange(last_sent)
            except Exception as exc:  # noqa: BLE001 - retried; peers see this rank as silent
                if not warned:
                    warned = True
                    os.write(
                        2, f"rank {self.rank}: warning: hang watchdog store: {exc!r}\n".encode()
                    )
        final = dict(self.mine or {"rank": self.rank, "seq": -1}, stopped=True)
        try:
            self.store.set(f"{self.prefix}{self.rank}", json.dumps(final))
        except Exception:  # noqa: BLE001 - the store may be gone at the end of a run
            pass

    def _exchange(self, last_sent):
        """Publish this rank's latest heartbeat, read the others' (never waiting for a key)."""
        mine = self.mine
        if mine is not None and mine is not last_sent:
            self.store.set(f"{self.prefix}{self.rank}", json.dumps(mine))
        for q in range(self.world_size):
            key = f"{self.prefix}{q}"
            if q == self.rank or not self.store.check([key]):
                continue
            beat = json.loads(self.store.get(key))
            known = self.peers.get(q)
            if known is None or known[0]["seq"] != beat["seq"]:
                self.peers[q] = (beat, time.monotonic())
        return mine


def _label_of(beat):
    return f" [{beat['label']}]" if beat and beat.get("label") else ""


def _module(where):
    """``speechbrain/core.py:12 (f)`` -> ``speechbrain.core``."""
    path = (where or "?").split(":", 1)[0].lstrip("/")
    return path[:-3].replace("/", ".") if path.endswith(".py") else path
