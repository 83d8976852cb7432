"""The cluster tier's own machinery: a private dockerd that leaves the host alone and nothing behind.

Uses a second, throw-away daemon (its own data root under tmp_path), so it never disturbs the
session's cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.cluster_harness import Dockerd, _kill_matching, base_image_tarball
from tests.k8s_harness import alive


def test_dockerd_runs_containers_and_stop_leaves_nothing(tmp_path: Path) -> None:
    daemon = Dockerd(data_root=tmp_path / "docker")
    daemon.start()
    run_dir = daemon.run_dir
    try:
        daemon.import_rootfs(base_image_tarball(), "kubetune.local/test-base:1")
        # What the kubelet asks of every pod sandbox (oom_score_adj -998) and raised rlimits: runc
        # alone fails on both in this sandbox; the runtime shim clamps and drops them.
        out = daemon.docker(
            "run",
            "--rm",
            "--network=host",
            "--oom-score-adj=-998",
            "--ulimit",
            "nofile=4096:4096",
            "kubetune.local/test-base:1",
            "cat",
            "/proc/self/oom_score_adj",
        ).stdout
        assert out.strip() == "0"
        daemon.docker("run", "-d", "--name", "sleeper", "kubetune.local/test-base:1", "sleep", "600")
        info = daemon.docker("info", "--format", "{{.DefaultRuntime}} {{.DockerRootDir}}").stdout.split()
        assert info == ["kubetune-shim", str(tmp_path / "docker")]
        # No bridge, so no docker0 and no iptables rules on the host.
        assert "docker0" not in os.listdir("/sys/class/net")
    finally:
        pids = daemon.pids()
        daemon.stop()
    assert alive(pids) == []
    assert run_dir is not None and not run_dir.exists()
    assert _processes_mentioning(str(run_dir)) == []
    assert str(run_dir) not in Path("/proc/self/mounts").read_text()  # dockerd's netns bind mount too


def _processes_mentioning(needle: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                found.append(cmd)
    return found


def test_kill_matching_is_exact(tmp_path: Path) -> None:
    """Stop's last resort kills only processes that name our private directory."""
    assert _processes_mentioning(str(tmp_path / "nothing-runs-here")) == []
    _kill_matching("")  # an empty needle must not match (and so kill) everything
    assert os.getppid() > 1
