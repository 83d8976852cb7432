"""RELIABILITY O12: two operator replicas in one kopf peering with distinct priorities. While
both live, only the leader acts; when the leader is killed (SIGKILL: no goodbye), the standby
takes over once the leader's peering record expires — and every FineTuneJob still gets one Job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from kubetune.operator.__main__ import PEERING_NAME

from tests.fast.ftj import JOBS, NS, create, ftj_path, manifest
from tests.kmock_harness import KubeEmulator, wait_until

pytestmark = [pytest.mark.kmock]

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def replica(url: str, priority: int, identity: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fast.peer_operator", url, str(priority), identity],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def peers(kube: KubeEmulator) -> dict[str, object]:
    obj = kube.read_object("kopf.dev/v1/clusterkopfpeerings", None, PEERING_NAME) or {}
    return dict(obj.get("status") or {})


def named(name: str) -> dict:
    body = manifest()
    body["metadata"]["name"] = name
    return body


def job_posts(kube: KubeEmulator) -> list[int]:
    return [r.status for r in kube.requests if r.method == "POST" and r.path.endswith("/jobs")]


async def test_o12_standby_takes_over_when_the_leader_is_killed(
    kube: KubeEmulator, api: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await create(
        api,
        "/apis/kopf.dev/v1/clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING_NAME}},
    )
    url = kube.base_url
    try:
        with (
            replica(url, 100, "leader", tmp_path / "leader.log") as leader,
            replica(url, 10, "standby", tmp_path / "standby.log"),
        ):
            await wait_until(
                lambda: {"leader", "standby"} <= set(peers(kube)), timeout=30, message="both replicas in the peering"
            )
            await create(api, ftj_path(), named("before"))
            await wait_until(
                lambda: kube.read_object(JOBS, NS, "before-train") is not None, timeout=20, message="the leader's Job"
            )
            await asyncio.sleep(1.5)  # the standby sees the FineTuneJob too, and must stay paused
            killed_at = len(kube.requests)
            os.killpg(leader.pid, signal.SIGKILL)
            assert leader.wait(10) == -signal.SIGKILL  # no goodbye: its peering record must expire
            await create(api, ftj_path(), named("after"))
            await wait_until(
                lambda: kube.read_object(JOBS, NS, "after-train") is not None,
                timeout=30,
                message="the standby's Job after the leader died",
            )
            assert set(peers(kube)) == {"standby"}  # the standby swept the expired record
            # `after` and the resumed `before` are handled in either order after the takeover; on a
            # loaded machine the Job for `after` can exist before the standby re-posts `before`'s
            await wait_until(
                lambda: len(job_posts(kube)) >= 3, timeout=30, message="the standby resuming `before` after taking over"
            )
    except Exception:
        for name in ("leader", "standby"):
            print(f"--- {name}.log ---\n" + (tmp_path / f"{name}.log").read_text()[-4000:])
        raise
    posts = job_posts(kube)
    before_kill = [r.status for r in kube.requests[:killed_at] if r.method == "POST" and r.path.endswith("/jobs")]
    assert before_kill == [201]  # only the leader acted while it lived
    # one Job each; the standby, on taking over, resumed `before` and adopted its Job (409, O1)
    assert sorted(posts) == [201, 201, 409]
