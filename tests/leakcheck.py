"""Session-end leak check: fail the run if a test left a server of ours running.

The real Kubernetes tier starts etcd + kube-apiserver; the cluster tier also the CRD server,
controller-manager, scheduler, kubelet, dockerd and its containerd (whose shims hold the
containers); storage tests may start a moto S3 server in a subprocess. Each of them runs in its own session (``start_new_session=True``), so a
missing ``stop()`` leaves a process that outlives pytest, holds ports and memory, and is easy to
miss. This plugin, registered from ``tests/conftest.py``, looks for such processes when the
session ends and turns a leak into a failed run (exit status 1) with the offending PIDs.

Only processes *this* pytest run started are blamed, so a developer's own etcd, or another
engineer's concurrent test run on the same machine, never fails this run. A process counts as
ours when it did not exist at session start and either

* descends from this pytest process (parent chain in ``/proc/PID/stat``), or
* carries this session's marker in its environment: at session start the plugin sets
  ``KUBETUNE_PYTEST_SESSION=<random token>`` in ``os.environ``, which every child inherits and
  keeps even after it is re-parented to init because its parent died.

Watched processes: an executable basename in ``WATCHED_BASENAMES`` (of ``argv[0]`` or of
``/proc/PID/exe``), or a command line that mentions ``moto_server`` or ``ThreadedMotoServer``.
(A ``ThreadedMotoServer`` running as a *thread* inside pytest is not a process and ends with
pytest; it is not checked here.)
Linux only (reads ``/proc``); elsewhere the check is a no-op.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MARKER_ENV = "KUBETUNE_PYTEST_SESSION"
WATCHED_BASENAMES = frozenset(
    {
        "etcd",
        "kube-apiserver",
        # the cluster tier (tests/cluster_harness.py)
        "apiextensions-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "dockerd",
        "containerd",
        "containerd-shim",
        "containerd-shim-runc-v2",
    }
)
WATCHED_SUBSTRINGS = ("moto_server", "ThreadedMotoServer")
# A process being stopped right now gets this long to go away (env override for self-tests).
GRACE_SECONDS = float(os.environ.get("KUBETUNE_LEAKCHECK_GRACE", "3"))


@dataclass
class _State:
    token: str
    pid: int
    baseline: set[int] = field(default_factory=set)


_STATE_KEY = pytest.StashKey[_State]()


def _cmdline(pid: int) -> list[str] | None:
    """argv of ``pid``; None when it is gone (or a kernel thread).

    A process caught in the middle of execve() (its parent already returned from fork/exec:
    Python's subprocess returns once close-on-exec fired, before the kernel sets up the new
    argument pages) reads as an empty cmdline for a moment: retry briefly.
    """
    for _ in range(20):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if raw:
            return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        fields = _stat_fields(pid)
        if fields is None or fields[0] == "Z" or _is_kthread(fields):
            return None
        time.sleep(0.005)
    return None


def _is_kthread(fields: list[str]) -> bool:
    # /proc/PID/stat field 9 (flags); index 6 after the state. PF_KTHREAD = 0x00200000.
    try:
        return bool(int(fields[6]) & 0x00200000)
    except (IndexError, ValueError):
        return False


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ``(comm)`` part: [state, ppid, ...]."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _exe_basename(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def is_watched(argv: list[str]) -> bool:
    """Whether a command line is one of the processes this check looks for."""
    if not argv:
        return False
    if os.path.basename(argv[0]) in WATCHED_BASENAMES:
        return True
    return any(s in arg for arg in argv for s in WATCHED_SUBSTRINGS)


def watched_processes() -> dict[int, list[str]]:
    """PID → argv of every live (non-zombie) watched process on the machine."""
    out: dict[int, list[str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    me = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        argv = _cmdline(pid)
        if not argv or not (is_watched(argv) or _exe_basename(pid) in WATCHED_BASENAMES):
            continue
        fields = _stat_fields(pid)
        if fields is None or fields[0] == "Z":
            continue
        out[pid] = argv
    return out


def _descends_from(pid: int, ancestor: int) -> bool:
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        fields = _stat_fields(pid)
        if fields is None:
            return False
        pid = int(fields[1])
        if pid == ancestor:
            return True
    return False


def _has_marker(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_ENV}={token}".encode() in environ.split(b"\0")


def leaked(state: _State) -> dict[int, list[str]]:
    """Watched processes started by this session that are still alive."""
    return {
        pid: argv
        for pid, argv in watched_processes().items()
        if pid not in state.baseline and (_has_marker(pid, state.token) or _descends_from(pid, state.pid))
    }


def pytest_sessionstart(session: pytest.Session) -> None:
    # A new token per session, also in a nested pytest: its children are then its own.
    token = secrets.token_hex(8)
    os.environ[MARKER_ENV] = token
    session.config.stash[_STATE_KEY] = _State(token=token, pid=os.getpid(), baseline=set(watched_processes()))


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Session-scoped fixtures (e.g. the shared apiserver) are torn down before this hook.
    state = session.config.stash.get(_STATE_KEY, None)
    if state is None:
        return
    deadline = time.monotonic() + GRACE_SECONDS
    survivors = leaked(state)
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = leaked(state)
    if not survivors:
        return
    lines = [
        f"LEAK: {len(survivors)} process(es) started by this test session are still running "
        "(a test or fixture did not stop its server, control-plane component, dockerd or containerd):",
    ]
    for pid, argv in sorted(survivors.items()):
        cmd = " ".join(argv)
        lines.append(f"  pid {pid}: {cmd[:300]}{' ...' if len(cmd) > 300 else ''}")
    lines.append(f"  stop them with: kill {' '.join(str(p) for p in sorted(survivors))}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("!", "process leak check failed", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:  # pragma: no cover - terminal reporter disabled
        import sys

        print("\n".join(lines), file=sys.stderr)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
