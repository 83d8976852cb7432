"""gateway.local without training: the trainer's event stream → events, progress, checkpoints;
and a server that died while its worker ran stops that worker and queues the job again."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from kubetune.gateway.backend import Tenant
from kubetune.gateway.local import LocalBackend
from kubetune.gateway.objects import JobCreate

TENANT = Tenant(namespace="default", organization_id="org-t", key_id="t")
DATA = ("\n".join(Path("examples/data/support-chat.jsonl").read_text().splitlines()[:20]) + "\n").encode()


async def _chunks():
    yield DATA


def queued_job(root: Path) -> tuple[LocalBackend, str]:
    backend = LocalBackend(root, max_workers=0)
    file = asyncio.run(backend.create_file(TENANT, "t.jsonl", "fine-tune", _chunks()))
    job = asyncio.run(backend.create_job(TENANT, JobCreate(model="builtin://tiny-llama", training_file=file.id)))
    backend._tick()  # validates the files
    assert asyncio.run(backend.get_job(TENANT, job.id)).status == "queued"
    return backend, job.id


def test_trainer_events_become_events_progress_and_checkpoints(tmp_path: Path) -> None:
    backend, job_id = queued_job(tmp_path)
    backend._set_status(job_id, phase="Running", tokensBefore=100)  # tokens of an earlier run (before a pause)
    now = time.time()
    lines = [
        {"time": now, "type": "status", "message": "loading the base model"},
        {
            "time": now + 1,
            "type": "progress",
            "step": 1,
            "total": 6,
            "loss": None,
            "tokens_per_s": 10.0,
            "eta": 50,
            "tokens": 400.0,
            "epoch": 0.3,
            "checkpoint_step": 0.0,
        },
        {
            "time": now + 2,
            "type": "progress",
            "step": 2,
            "total": 6,
            "loss": 2.5,
            "tokens_per_s": 11.0,
            "eta": 40,
            "tokens": 800.0,
            "epoch": 0.6,
            "checkpoint_step": 2.0,
        },
    ]
    path = tmp_path / "jobs" / job_id / "events.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"time": 1, "type": "progr')  # a line being written
    backend._drain_events(job_id)
    backend._drain_events(job_id)  # nothing new: nothing twice
    events = asyncio.run(backend.list_events(TENANT, job_id, after=None, limit=100)).data
    newest = [(e.type, e.message) for e in events[:4]]
    assert newest == [
        ("message", "Checkpoint created at step 2"),
        ("metrics", "Step 2/6: training loss=2.5000"),
        ("metrics", "Step 1/6"),
        ("message", "loading the base model"),
    ]
    assert events[1].data == {"step": 2, "total_steps": 6, "train_loss": 2.5, "tokens_per_second": 11.0, "epoch": 0.6}
    assert events[1].created_at == int(now + 2)
    job = asyncio.run(backend.get_job(TENANT, job_id))
    assert (
        job.status == "running" and job.estimated_finish is not None and job.estimated_finish >= int(time.time()) + 30
    )
    ckpts = asyncio.run(backend.list_checkpoints(TENANT, job_id, after=None, limit=10)).data
    assert [(c.step_number, c.metrics.train_loss) for c in ckpts] == [(2, 2.5)]
    assert backend._job_row(job_id)["trained_tokens"] == 100 + 800
    # the rest of the line arrives; a restarted server re-reading from the start adds nothing twice
    with open(path, "a") as f:
        f.write('ess", "step": 3, "total": 6, "loss": 2.0, "tokens_per_s": 1.0, "eta": 5, "tokens": 1200.0}\n')
    backend._drain_events(job_id)
    again = LocalBackend(tmp_path, max_workers=0)
    again._db.execute("UPDATE jobs SET events_offset=0 WHERE id=?", (job_id,))
    again._drain_events(job_id)
    events = asyncio.run(again.list_events(TENANT, job_id, after=None, limit=100)).data
    assert [e.data["step"] for e in events if e.type == "metrics"] == [3, 2, 1]


def test_a_restarted_server_stops_the_orphaned_worker_and_queues_the_job(tmp_path: Path) -> None:
    backend, job_id = queued_job(tmp_path)
    # what a killed server leaves behind: a Running job whose worker (its own session) still runs
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "-m", "kubetune.trainer", job_id], start_new_session=True
    )
    try:
        cmdline = Path(f"/proc/{orphan.pid}/cmdline")
        deadline = time.time() + 20
        while job_id.encode() not in cmdline.read_bytes() and time.time() < deadline:  # until exec is done
            time.sleep(0.02)
        backend._set_status(job_id, phase="Running", pid=orphan.pid)
        restarted = LocalBackend(tmp_path, max_workers=0)
        assert orphan.wait(30) == -signal.SIGTERM
        job = asyncio.run(restarted.get_job(TENANT, job_id))
        assert job.status == "queued"
        messages = [e.message for e in asyncio.run(restarted.list_events(TENANT, job_id, after=None, limit=50)).data]
        assert messages[0].startswith("The server restarted")
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_an_unrelated_process_with_a_stale_pid_is_left_alone(tmp_path: Path) -> None:
    backend, job_id = queued_job(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        backend._set_status(job_id, phase="Running", pid=other.pid)
        LocalBackend(tmp_path, max_workers=0)
        time.sleep(0.3)
        assert other.poll() is None  # not our worker: never signalled
    finally:
        other.kill()
        other.wait()


def test_one_job_at_a_time_in_creation_order(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, max_workers=1)
    file = asyncio.run(backend.create_file(TENANT, "t.jsonl", "fine-tune", _chunks()))
    jobs = [
        asyncio.run(backend.create_job(TENANT, JobCreate(model="builtin://tiny-llama", training_file=file.id))).id
        for _ in range(3)
    ]
    launched: list[str] = []
    sleepers: list[subprocess.Popen] = []

    def launch(row) -> None:  # a stand-in worker: the scheduling is under test, not the trainer
        flag = tmp_path / f"{row['id']}.stop"  # exits 3 (a permanent failure) once the flag exists
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)\nsys.exit(3)",
                str(flag),
            ]
        )
        sleepers.append(proc)
        backend._workers[row["id"]] = proc
        backend._set_status(row["id"], phase="Running", pid=proc.pid)
        launched.append(row["id"])

    backend._launch = launch  # type: ignore[method-assign]
    try:
        backend._tick()
        backend._tick()
        assert launched == [jobs[0]]
        statuses = [asyncio.run(backend.get_job(TENANT, j)).status for j in jobs]
        assert statuses == ["running", "queued", "queued"]
        asyncio.run(backend.pause_job(TENANT, jobs[1]))  # a paused job is skipped, the next one runs
        (tmp_path / f"{jobs[0]}.stop").touch()
        sleepers[0].wait(30)
        backend._tick()
        backend._tick()
        assert launched == [jobs[0], jobs[2]]
        assert asyncio.run(backend.get_job(TENANT, jobs[0])).status == "failed"
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()
