"""Nothing the real tier starts outlives it: the harness's stop() and the session leak check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.k8s_harness import ApiServer, alive
from tests.leakcheck import MARKER_ENV

REPO = Path(__file__).resolve().parents[2]


def test_apiserver_stop_leaves_no_process(k8s_binaries: tuple[Path, Path]) -> None:
    api = ApiServer(binaries=k8s_binaries)
    with api:
        pids = api.pids()
        tmpdir = api.tmpdir
        assert len(pids) == 2 and alive(pids) == pids  # etcd, kube-apiserver
    assert alive(pids) == []
    assert tmpdir is not None and not tmpdir.exists()


def test_leak_check_fails_the_session(tmp_path: Path) -> None:
    """A nested pytest whose test leaves an "etcd" running exits 1 and names the process."""
    pidfile = tmp_path / "leaked.pid"
    (tmp_path / "test_leaky.py").write_text(
        textwrap.dedent(
            f"""
            import subprocess
            from pathlib import Path

            def test_leaks():
                # argv[0] is "etcd": what the leak check looks for (the program is sleep).
                proc = subprocess.Popen(["etcd", "120"], executable="/bin/sleep",
                                        start_new_session=True)
                Path({str(pidfile)!r}).write_text(str(proc.pid))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "KUBETUNE_LEAKCHECK_GRACE": "0.2"}
    env.pop(MARKER_ENV, None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.leakcheck",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            str(tmp_path / "test_leaky.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    leaked_pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert leaked_pid is not None, run.stdout + run.stderr
        assert run.returncode == 1, run.stdout + run.stderr
        assert "1 passed" in run.stdout
        assert "LEAK: 1 process(es)" in run.stdout and f"pid {leaked_pid}: etcd 120" in run.stdout
    finally:
        if leaked_pid is not None and alive([leaked_pid]):
            os.kill(leaked_pid, signal.SIGKILL)
