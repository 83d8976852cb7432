"""The multi-node command the builders render, run for real: two `torchrun` agents (two "pods"
of the Indexed Job) on loopback with the c10d rendezvous. One pod is killed mid-training and
replaced, as the Job controller would; the survivor must not hang on the dead peer but restart
its worker and finish together with the replacement (the gap a static rendezvous had).

A stand-in for the Job controller (processes, not pods) because the cluster tier cannot run it:
Indexed Jobs do not exist at 1.20, and two pods with the host network would need a pod network
for `<job>-0.<service>` to resolve."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubetune.api.manifest import load_yaml as load_manifest_yaml
from kubetune.api.resource import parse_manifest
from kubetune.operator.builders import trainer_job
from kubetune.operator.settings import OperatorSettings

from tests.standin_kubelet import expand

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pod_command(tmp: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The rendered command with the kubelet's $(VAR) expansion and the trainer swapped for the
    stand-in worker (everything before `-m kubetune.trainer` is what the pod runs), and the
    rendered torch settings of the pod's env."""

    data = load_manifest_yaml((ROOT / "examples" / "multi-node-volcano.yaml").read_text())
    ftj, problems = parse_manifest(data)
    assert ftj is not None, problems
    container = trainer_job(ftj, "uid-1", OperatorSettings())["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = [expand(part, env) for part in container["command"]]
    cut = command.index("-m")
    assert command[cut + 1] == "kubetune.trainer"
    launcher = [sys.executable, "-m", "torch.distributed.run", *command[1:cut]]
    launcher[launcher.index("--nproc-per-node") + 1] = "1"  # one CPU worker per "pod"
    torch_env = {k: v for k, v in env.items() if k.startswith(("TORCH_", "NCCL_"))}
    return [*launcher, str(Path(__file__).with_name("elastic_worker.py")), str(tmp), str(STEPS)], torch_env


def start(command: list[str], pod_env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **pod_env}
    with log.open("ab") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_pod(pod: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent and every process under it, as a dying pod's container loses them all
    (torchrun starts its workers in sessions of their own, so a process group is not enough)."""
    import psutil

    try:
        procs = [psutil.Process(pod.pid), *psutil.Process(pod.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    pod.wait(10)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_survivor_restarts_and_finishes_with_the_replacement(tmp_path: Path) -> None:
    port = free_port()
    command, pod_env = pod_command(tmp_path, port)
    assert "--rdzv-backend" in command and command[command.index("--rdzv-backend") + 1] == "c10d"
    pods = [start(command, pod_env, tmp_path / "pod-0.log")]
    try:
        # On a cluster only index 0 answers to MASTER_ADDR, so it hosts the rendezvous store; on
        # loopback every agent could, so pod 1 starts once pod 0 has bound the port.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not listening(port):
            time.sleep(0.1)
        pods.append(start(command, pod_env, tmp_path / "pod-1.log"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(len(lines(tmp_path / f"rank-{r}.log")) >= 3 for r in (0, 1)):
            time.sleep(0.2)
        assert all(lines(tmp_path / f"rank-{r}.log") for r in (0, 1)), (tmp_path / "pod-0.log").read_text()[-3000:]
        kill_pod(pods[1])  # a node dies (not the rendezvous host)
        pods.append(start(command, pod_env, tmp_path / "pod-1b.log"))  # the Job controller's replacement
        codes = [pods[0].wait(120), pods[2].wait(120)]
    finally:
        for pod in pods:
            kill_pod(pod)
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("pod-*.log")}
    assert codes == [0, 0], logs
    finished = [line for r in (0, 1) for line in lines(tmp_path / f"rank-{r}.log") if f"step={STEPS - 1} " in line]
    # the survivor's worker was restarted once by its agent; the replacement's is a first start
    assert sorted(line.split()[0] for line in finished) == ["restart=0", "restart=1"], finished
    assert all("world=2 sum=2" in line for line in finished), finished
