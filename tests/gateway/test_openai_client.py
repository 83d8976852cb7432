"""The acceptance flow: the official `openai` client against `kubetune api --local`, started as a
subprocess on a free port with a temporary directory, training builtin://tiny-llama for real.

files.create (the quickstart data, its first 40 examples so the test stays short on a shared CPU)
→ fine_tuning.jobs.create(model="builtin://tiny-llama", hyperparameters={"n_epochs": 1}) → poll
retrieve until succeeded → list_events, checkpoints.list, models.list shows the ft: model; a
second job is paused (SIGTERM: the trainer checkpoints), resumed (it continues from that
checkpoint) and cancelled; a malformed file fails its job with error.param naming the line. The
tuned model answers chat completions (kubetune serve behind the gateway), streamed and not.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow

QUICKSTART = Path("examples/data/support-chat.jsonl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, Path]]:
    root = tmp_path_factory.mktemp("kubetune-api")
    port = _free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from kubetune.cli import main; main()",
            "api",
            "--local",
            "--dir",
            str(root / "state"),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0, timeout=30)
    try:
        deadline = time.time() + 60
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError((root / "server.log").read_text()) from None
                time.sleep(0.2)
        yield client, root / "state"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def until(fn: Callable[[], object], timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := fn():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def quickstart(n: int) -> bytes:
    return ("\n".join(QUICKSTART.read_text().splitlines()[:n]) + "\n").encode()


def test_files_job_events_checkpoints_models(api) -> None:
    client, state = api
    uploaded = client.files.create(file=("support-chat.jsonl", quickstart(40)), purpose="fine-tune")
    assert uploaded.bytes == len(quickstart(40)) and uploaded.purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(
        model="builtin://tiny-llama",
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 1},
        suffix="support",
        metadata={"run": "a"},
    )
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 1
    seen: list[str] = []

    def done():
        j = client.fine_tuning.jobs.retrieve(job.id)
        if not seen or seen[-1] != j.status:
            seen.append(j.status)
        return j if j.status in ("succeeded", "failed", "cancelled") else None

    final = until(done, 240, "the job to finish")
    assert final.status == "succeeded", (final.error, (state / "jobs" / job.id / "worker.log").read_text()[-3000:])
    assert seen[-1] == "succeeded" and "running" in seen, seen
    assert final.fine_tuned_model == f"ft:tiny-llama:org-local:support:{job.id.removeprefix('ftjob-')}"
    assert final.trained_tokens and final.trained_tokens > 1000
    assert final.finished_at >= final.created_at and final.error is None
    assert (final.hyperparameters.n_epochs, final.hyperparameters.batch_size) == (1, 8)
    assert final.hyperparameters.learning_rate_multiplier == 1.0

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events[0].message == "The job has successfully completed"
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    metrics = [e for e in events if e.type == "metrics"]
    steps = sorted(e.data["step"] for e in metrics)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 5  # 36 training examples / 8
    losses = [e.data["train_loss"] for e in metrics if "train_loss" in e.data]  # on the trainer's logging steps
    assert losses and all(isinstance(x, float) and x > 0 for x in losses)
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    after = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert after.data[0].id == events[3].id

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and checkpoints[0].step_number == 5
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{final.fine_tuned_model}:ckpt-step-5"
    assert checkpoints[0].metrics.valid_loss is not None and checkpoints[0].metrics.train_loss is not None
    assert (state / "jobs" / job.id / "output" / "manifest.json").is_file()

    models = [m.id for m in client.models.list()]
    assert final.fine_tuned_model in models and "builtin://tiny-llama" in models
    assert client.models.retrieve(final.fine_tuned_model).owned_by == "org-local"
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "a"})] == [job.id]

    # and use it: chat completions answered by kubetune serve over the job's output, streamed or not
    ask = dict(
        model=final.fine_tuned_model,
        messages=[{"role": "user", "content": "Can I return my gloves?"}],
        max_tokens=6,
        temperature=0,
    )
    reply = client.with_options(timeout=300).chat.completions.create(**ask)
    assert reply.model == final.fine_tuned_model and reply.usage.completion_tokens >= 1
    text = reply.choices[0].message.content
    chunks = list(client.with_options(timeout=300).chat.completions.create(**ask, stream=True))
    assert {c.model for c in chunks} == {final.fine_tuned_model}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_pause_resume_cancel_a_running_job(api) -> None:
    client, state = api
    uploaded = client.files.create(file=("small.jsonl", quickstart(20)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="builtin://tiny-llama", training_file=uploaded.id, hyperparameters={"n_epochs": 3, "batch_size": 2}
    )
    step = lambda: max(
        (e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"),
        default=0,
    )
    until(lambda: step() >= 2, 180, "training steps")
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "queued"  # the client's enum has no paused (translate.PAUSED_STATUS)
    messages = lambda: [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    until(lambda: any("paused after writing a checkpoint" in m for m in messages()), 120, "the pause")
    at_pause = step()
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and checkpoints[0].step_number >= 2
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
    time.sleep(1.0)
    assert step() == at_pause  # nothing trains while paused

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running")
    until(lambda: any(m.startswith("resuming from checkpoint step") for m in messages()), 180, "the resume")
    resumed_from = next(m for m in messages() if m.startswith("resuming from checkpoint step"))
    assert resumed_from == f"resuming from checkpoint step {checkpoints[0].step_number}"

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    until(lambda: "The job was cancelled" in messages(), 120, "the worker to stop")
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert final.fine_tuned_model not in [m.id for m in client.models.list()]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)


def test_malformed_file_fails_with_the_line(api) -> None:
    client, _ = api
    lines = quickstart(20).decode().splitlines()
    lines[11] = json.dumps({"messages": [{"role": "user", "content": "Where is my order?"}]})  # no assistant turn
    uploaded = client.files.create(file=("broken.jsonl", ("\n".join(lines) + "\n").encode()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="builtin://tiny-llama", training_file=uploaded.id)
    final = until(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("failed", "succeeded") and j,
        60,
        "validation",
    )
    assert final.status == "failed"
    assert final.error.param == "training_file:12" and final.error.code == "InvalidData"
    assert f"{uploaded.id} (broken.jsonl):12" in final.error.message
