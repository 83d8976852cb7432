"""The embedded backend of `kubetune api --local`: files and jobs on this machine.

Everything lives under one directory (default `./kubetune-api/`), so a restarted server carries on:
`state.sqlite3` holds files, jobs and events; `files/<namespace>/<id>.jsonl` the uploads (with
size and sha256); `jobs/<id>/` a job's manifest, the trainer's event stream, its summary and its
output (adapter and checkpoints).

Jobs run in the same trainer as `kubetune run` and the pods — `python -m kubetune.trainer --spec`
in a worker process (this server never imports torch), `max_workers` at a time (1 by default), in
creation order. A supervisor thread moves each job along: `validating_files` (the trainer's data
checks, `kubetune.trainer.data.check`, without torch) → `queued` → `running` (the worker's
`--events` stream becomes events, progress and checkpoints) → `succeeded` / `failed` (the
summary's reason, message and param) / `cancelled`. Pause sends SIGTERM, on which the trainer
writes a checkpoint and exits; resume queues the job again and the trainer continues from its
newest committed checkpoint. A server that stops while a worker runs stops that worker the same
way at the next start and queues the job again, so it resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Optional

from kubetune.gateway import translate
from kubetune.gateway.backend import Invalid, NotFound, Tenant, Unavailable, paginate
from kubetune.gateway.objects import (
    Checkpoint,
    Event,
    FileDeleted,
    FileObject,
    FineTuningJob,
    JobCreate,
    ListPage,
    Model,
)

log = logging.getLogger("kubetune.gateway.local")

BUILTIN_MODELS = ("tiny-llama", "small-llama")
"""The built-in bases (kubetune.trainer.builtin.BUILTIN_MODELS; a test keeps them equal)."""
PREEMPTED_CODES = (143, -signal.SIGTERM)
PERMANENT_EXIT_CODE = 3
MAX_RETRIES = 3
CPU_BATCH_SIZE = 8
"""What `batch_size: auto` is on CPU (kubetune.trainer.hparams.CPU_BATCH_SIZE): for checkpoints per epoch."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  id TEXT PRIMARY KEY, namespace TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
  bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, namespace TEXT NOT NULL, organization_id TEXT NOT NULL, created_at INTEGER NOT NULL,
  seq INTEGER NOT NULL, request TEXT NOT NULL, status TEXT NOT NULL, suspend INTEGER NOT NULL DEFAULT 0,
  cancel INTEGER NOT NULL DEFAULT 0, pid INTEGER, events_offset INTEGER NOT NULL DEFAULT 0,
  trained_tokens INTEGER, retries INTEGER NOT NULL DEFAULT 0, files TEXT NOT NULL, names TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
  level TEXT NOT NULL, message TEXT NOT NULL, data TEXT, type TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
"""


def _now() -> int:
    return int(time.time())


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class LocalBackend:
    """gateway.backend.Backend on one machine (see the module's docstring)."""

    def __init__(
        self,
        root: str | Path,
        *,
        max_workers: int = 1,
        python: str = sys.executable,
        poll_seconds: float = 0.5,
        worker_env: Optional[dict[str, str]] = None,
    ) -> None:
        self.root = Path(root).resolve()
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self.max_workers = max_workers
        self.python = python
        self.poll_seconds = poll_seconds
        self.worker_env = worker_env
        self._db = sqlite3.connect(self.root / "state.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._workers: dict[str, subprocess.Popen] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._serve: Optional[tuple[subprocess.Popen, str, tuple[str, ...]]] = None  # process, base URL, outputs
        self._serve_lock: Optional[asyncio.Lock] = None
        self._recover()

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervise, name="kubetune-api-supervisor", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        """Stop the supervisor; running workers are stopped with SIGTERM (they checkpoint) and their
        jobs are queued again for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None
        with self._lock:
            workers = dict(self._workers)
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for job_id, proc in workers.items():
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                proc.kill()
            self._drain_events(job_id)
            with self._lock:
                row = self._job_row(job_id)
                if row is not None and translate.phase_status(json.loads(row["status"]).get("phase")) == "running":
                    self._committed_checkpoints(job_id)
                    self._set_status(job_id, phase="Queued", pid=None)
                    self._event(
                        job_id,
                        "The server stopped; the job is queued and resumes from its newest checkpoint "
                        "when the server starts again",
                    )
        self._workers.clear()
        self._stop_serving()

    def _recover(self) -> None:
        """After a restart: a worker left running by the previous server is stopped (it checkpoints on
        SIGTERM), and its job queued again so that it resumes."""
        for row in self._db.execute("SELECT id, pid, status FROM jobs").fetchall():
            status = json.loads(row["status"])
            if status.get("phase") != "Running":
                continue
            pid = row["pid"]
            if pid and self._is_our_worker(pid, row["id"]):
                try:
                    os.kill(pid, signal.SIGTERM)
                    for _ in range(600):
                        if not self._is_our_worker(pid, row["id"]):
                            break
                        time.sleep(0.1)
                except ProcessLookupError:
                    pass
            self._drain_events(row["id"])
            self._set_status(row["id"], phase="Queued", pid=None)
            self._event(
                row["id"], "The server restarted; the job is queued again and resumes from its newest checkpoint"
            )

    def _is_our_worker(self, pid: int, job_id: str) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            return True  # no /proc: trust the pid
        return job_id.encode() in cmdline and b"kubetune.trainer" in cmdline

    # ----------------------------------------------------------------------------- files

    def _file_path(self, namespace: str, file_id: str) -> Path:
        return self.root / "files" / namespace / f"{file_id}.jsonl"

    async def create_file(
        self, tenant: Tenant, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> FileObject:
        file_id = translate.new_id("file")
        path = self._file_path(tenant.namespace, file_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        digest, size = hashlib.sha256(), 0
        try:
            with open(partial, "wb") as f:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        created = _now()
        with self._lock:
            self._db.execute(
                "INSERT INTO files VALUES (?,?,?,?,?,?,?,(SELECT COALESCE(MAX(seq),0)+1 FROM files))",
                (file_id, tenant.namespace, filename, purpose, size, digest.hexdigest(), created),
            )
        return FileObject(id=file_id, bytes=size, created_at=created, filename=filename, purpose=purpose)

    def _file_row(self, tenant: Tenant, file_id: str) -> sqlite3.Row:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM files WHERE id=? AND namespace=?", (file_id, tenant.namespace)
            ).fetchone()
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return row

    @staticmethod
    def _file(row: sqlite3.Row) -> FileObject:
        return FileObject(
            id=row["id"],
            bytes=row["bytes"],
            created_at=row["created_at"],
            filename=row["filename"],
            purpose=row["purpose"],
        )

    async def list_files(
        self, tenant: Tenant, *, purpose: Optional[str], after: Optional[str], limit: int, order: str = "desc"
    ) -> ListPage:
        query = "SELECT * FROM files WHERE namespace=?" + (" AND purpose=?" if purpose else "")
        query += " ORDER BY seq " + ("ASC" if order == "asc" else "DESC")
        with self._lock:
            rows = self._db.execute(query, (tenant.namespace, purpose) if purpose else (tenant.namespace,)).fetchall()
        return paginate([self._file(r) for r in rows], after, limit)

    async def get_file(self, tenant: Tenant, file_id: str) -> FileObject:
        return self._file(self._file_row(tenant, file_id))

    async def file_content(self, tenant: Tenant, file_id: str) -> AsyncIterator[bytes]:
        path = self._file_path(tenant.namespace, self._file_row(tenant, file_id)["id"])
        f = open(path, "rb")  # noqa: SIM115 -- closed by the generator that streams it

        async def chunks() -> AsyncIterator[bytes]:
            with f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return chunks()

    async def delete_file(self, tenant: Tenant, file_id: str) -> FileDeleted:
        row = self._file_row(tenant, file_id)
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id=?", (row["id"],))
        self._file_path(tenant.namespace, row["id"]).unlink(missing_ok=True)
        return FileDeleted(id=row["id"])

    # ----------------------------------------------------------------------------- jobs

    def _job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    async def create_job(self, tenant: Tenant, request: JobCreate) -> FineTuningJob:
        translate.check_request(request)
        files: dict[str, str] = {}
        names: dict[str, str] = {}
        for param in ("training_file", "validation_file"):
            file_id = getattr(request, param)
            if file_id is None:
                continue
            try:
                row = self._file_row(tenant, file_id)
            except NotFound:
                raise Invalid(f"{param} {file_id!r}: no such file", param=param, code="invalid_file") from None
            path = str(self._file_path(tenant.namespace, row["id"]))
            files[path] = param
            names[path] = f"{file_id} ({row['filename']})"
        job_id = translate.new_id("ftjob")
        train = next(p for p, f in files.items() if f == "training_file")
        validation = next((p for p, f in files.items() if f == "validation_file"), None)
        # Checked now, so a request the FineTuneJob API refuses is a 400 naming the field.
        manifest = translate.to_manifest(
            request,
            name=job_id,
            job_id=job_id,
            train_uri=train,
            validation_uri=validation,
            output_uri=(self._job_dir(job_id) / "output").as_uri(),
        )
        translate.validate_manifest(manifest)
        created = _now()
        self._job_dir(job_id).mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, namespace, organization_id, created_at, seq, request, status, files, names) "
                "VALUES (?,?,?,?,(SELECT COALESCE(MAX(seq),0)+1 FROM jobs),?,?,?,?)",
                (
                    job_id,
                    tenant.namespace,
                    tenant.organization_id,
                    created,
                    request.model_dump_json(exclude_unset=True),
                    json.dumps({"phase": "Validating"}),
                    json.dumps(files),
                    json.dumps(names),
                ),
            )
            self._event(job_id, f"Created fine-tuning job: {job_id}")
            self._event(
                job_id,
                f"Validating training file: {request.training_file}"
                + (f" and validation file: {request.validation_file}" if request.validation_file else ""),
            )
            created_job = self._job(
                self._stored_row(job_id)
            )  # as created (validating_files): the lock keeps the supervisor out
        self._wake.set()
        return created_job

    def _job_row(self, job_id: str, tenant: Optional[Tenant] = None) -> Optional[sqlite3.Row]:
        with self._lock:
            if tenant is None:
                return self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return self._db.execute(
                "SELECT * FROM jobs WHERE id=? AND namespace=?", (job_id, tenant.namespace)
            ).fetchone()

    def _stored_row(self, job_id: str) -> sqlite3.Row:
        """The row of a job this backend created: jobs are never deleted from the store."""
        row = self._job_row(job_id)
        if row is None:
            raise LookupError(f"fine-tuning job {job_id} is missing from {self.root / 'state.sqlite3'}")
        return row

    def _owned(self, tenant: Tenant, job_id: str) -> sqlite3.Row:
        row = self._job_row(job_id, tenant)
        if row is None:
            raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return row

    def _job(self, row: sqlite3.Row) -> FineTuningJob:
        request = JobCreate.model_validate_json(row["request"])
        status = json.loads(row["status"])
        return translate.openai_job(
            job_id=row["id"],
            created_at=row["created_at"],
            request=request,
            organization_id=row["organization_id"],
            status=status,
            suspend=bool(row["suspend"]),
            cancel=bool(row["cancel"]),
            files=json.loads(row["files"]),
            names=json.loads(row["names"]),
            trained_tokens=row["trained_tokens"],
        )

    async def get_job(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        return self._job(self._owned(tenant, job_id))

    async def list_jobs(
        self, tenant: Tenant, *, after: Optional[str], limit: int, metadata: dict[str, str]
    ) -> ListPage:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE namespace=? ORDER BY seq DESC", (tenant.namespace,)
            ).fetchall()
        jobs = [self._job(r) for r in rows]
        if metadata:
            jobs = [j for j in jobs if all((j.metadata or {}).get(k) == v for k, v in metadata.items())]
        return paginate(jobs, after, limit)

    async def cancel_job(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        with self._lock:  # one decision at a time with the supervisor (no launch after a cancel)
            row = self._owned(tenant, job_id)
            state = self._job(row).status
            if state in translate.TERMINAL:
                # 400, not 409: the client retries a 409, and no retry un-finishes a job.
                raise Invalid(f"job {job_id} is already {state} and cannot be cancelled", code="job_not_cancellable")
            self._db.execute("UPDATE jobs SET cancel=1 WHERE id=?", (job_id,))
            proc = self._workers.get(job_id)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # it writes a checkpoint; the supervisor records Cancelled
                self._event(job_id, "Cancelling the job: the worker writes a checkpoint and stops")
            else:
                self._finish(job_id, "Cancelled", "The job was cancelled")
        return await self.get_job(tenant, job_id)

    async def pause_job(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        with self._lock:
            row = self._owned(tenant, job_id)
            phase = json.loads(row["status"]).get("phase")
            if row["cancel"] or phase in ("Succeeded", "Failed", "Cancelled"):
                raise Invalid(f"job {job_id} is {self._job(row).status} and cannot be paused", code="job_not_pausable")
            if row["suspend"]:
                raise Invalid(f"job {job_id} is already paused; resume it with jobs.resume", code="job_not_pausable")
            self._db.execute("UPDATE jobs SET suspend=1 WHERE id=?", (job_id,))
            proc = self._workers.get(job_id)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                self._event(job_id, "Pausing the job: the worker writes a checkpoint and stops")
            elif phase == "Queued":
                self._set_status(job_id, phase="Suspended")
                self._event(job_id, "The job was paused; resume it with jobs.resume")
            else:  # still validating its files: it stays paused once they pass
                self._event(job_id, "The job will stay paused once its files are validated; resume it with jobs.resume")
        return await self.get_job(tenant, job_id)

    async def resume_job(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        with self._lock:
            row = self._owned(tenant, job_id)
            if not row["suspend"] or row["cancel"]:
                raise Invalid(
                    f"job {job_id} is not paused ({self._job(row).status}); only a paused job can be resumed",
                    code="job_not_paused",
                )
            self._db.execute("UPDATE jobs SET suspend=0 WHERE id=?", (job_id,))
            if json.loads(row["status"]).get("phase") == "Suspended":
                self._set_status(job_id, phase="Queued")
            self._event(job_id, "The job was resumed; it continues from its newest checkpoint")
        self._wake.set()
        return await self.get_job(tenant, job_id)

    async def list_events(self, tenant: Tenant, job_id: str, *, after: Optional[str], limit: int) -> ListPage:
        self._owned(tenant, job_id)
        with self._lock:
            rows = self._db.execute("SELECT * FROM events WHERE job_id=? ORDER BY seq DESC", (job_id,)).fetchall()
        events = [
            Event(
                id=r["id"],
                created_at=r["created_at"],
                level=r["level"],
                message=r["message"],
                data=json.loads(r["data"]) if r["data"] else None,
                type=r["type"],
            )
            for r in rows
        ]
        return paginate(events, after, limit)

    async def list_checkpoints(self, tenant: Tenant, job_id: str, *, after: Optional[str], limit: int) -> ListPage:
        return paginate(self._checkpoints(self._owned(tenant, job_id)), after, limit)

    def _checkpoints(self, row: sqlite3.Row) -> list[Checkpoint]:
        status = json.loads(row["status"])
        request = JobCreate.model_validate_json(row["request"])
        tuned = translate.fine_tuned_model(request.model, row["organization_id"], request.suffix, row["id"])
        return translate.openai_checkpoints(row["id"], tuned, status.get("checkpoints") or [], status.get("metrics"))

    # ----------------------------------------------------------------------------- models

    async def list_models(self, tenant: Tenant) -> list[Model]:
        started = int(self.root.stat().st_ctime)
        models = [Model(id=f"builtin://{name}", created=started, owned_by="kubetune") for name in BUILTIN_MODELS]
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE namespace=? ORDER BY seq DESC", (tenant.namespace,)
            ).fetchall()
        for row in rows:
            job = self._job(row)
            if job.status == "succeeded" and job.fine_tuned_model:
                models.append(
                    Model(
                        id=job.fine_tuned_model,
                        created=job.finished_at or job.created_at,
                        owned_by=row["organization_id"],
                    )
                )
        return models

    async def get_model(self, tenant: Tenant, model_id: str) -> Model:
        for model in await self.list_models(tenant):
            if model.id == model_id:
                return model
        raise NotFound(
            f"The model {model_id!r} does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )

    # ----------------------------------------------------------------------------- chat completions

    async def chat_completions(
        self, tenant: Tenant, body: dict[str, Any]
    ) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        """`POST /v1/chat/completions` for the tenant's `ft:` models, answered by `kubetune serve` (the
        trainer's OpenAI-compatible server, its own process) over every succeeded job's output; this
        server only checks ownership, swaps the model id and streams the answer through."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise Invalid("model: name a fine-tuned model of yours (models.list shows them)", param="model")
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE namespace=?", (tenant.namespace,)).fetchall()
        job = next((j for j in map(self._job, rows) if j.status == "succeeded" and j.fine_tuned_model == model), None)
        if job is None:
            raise NotFound(
                f"The model {model!r} does not exist or you do not have access to it; this server answers "
                "for the fine-tuned models of your succeeded jobs",
                param="model",
                code="model_not_found",
            )
        url, served = await self._serving(job.id)
        import aiohttp

        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=900))
        try:
            resp = await session.post(f"{url}/v1/chat/completions", json={**body, "model": served})
        except aiohttp.ClientError as err:
            await session.close()
            raise Unavailable(
                f"the model server did not answer ({type(err).__name__}); try again", retry_after=5
            ) from None

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for line in resp.content:  # whole lines, so the id is never split
                    yield line.replace(served.encode(), model.encode())
            finally:
                resp.release()
                await session.close()

        return resp.status, {"content-type": resp.headers.get("content-type", "application/json")}, lines()

    async def _serving(self, job_id: str) -> tuple[str, str]:
        """The base URL of a `kubetune serve` process serving every succeeded output, and the id it
        gives `job_id`'s output; (re)started when a job succeeded since or it stopped."""
        if self._serve_lock is None:
            self._serve_lock = asyncio.Lock()
        async with self._serve_lock:
            with self._lock:
                rows = self._db.execute("SELECT id, status FROM jobs ORDER BY seq").fetchall()
            outputs = tuple(
                str(self._job_dir(r["id"]) / "output")
                for r in rows
                if json.loads(r["status"]).get("phase") == "Succeeded"
            )
            if self._serve is None or self._serve[0].poll() is not None or self._serve[2] != outputs:
                self._stop_serving()
                await asyncio.to_thread(self._start_serving, outputs)
            assert self._serve is not None
            url = self._serve[1]
            models = await asyncio.to_thread(_get_json, f"{url}/v1/models")
            for card in models.get("data", []):
                if card.get("parent") and f"/{job_id}/output" in str(card.get("root", "")):
                    return url, str(card["id"])
            raise Unavailable(f"the model server does not list the output of {job_id}; try again", retry_after=5)

    def _start_serving(self, outputs: tuple[str, ...]) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log_path = self.root / "serve.log"
        env = dict(os.environ if self.worker_env is None else self.worker_env)
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                [
                    self.python,
                    "-c",
                    "from kubetune.cli import main; main()",
                    "serve",
                    *outputs,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise Unavailable(f"the model server stopped (exit code {proc.returncode}): {tail}", retry_after=5)
            try:
                _get_json(f"{url}/v1/models")
                self._serve = (proc, url, outputs)
                return
            except OSError:
                time.sleep(0.3)
        proc.kill()
        raise Unavailable("the model server did not start within 10 minutes; see serve.log", retry_after=30)

    def _stop_serving(self) -> None:
        if self._serve is not None:
            proc = self._serve[0]
            self._serve = None
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # ----------------------------------------------------------------------------- bookkeeping

    def _event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        data: Optional[dict] = None,
        kind: str = "message",
        key: Any = None,
        created: Optional[float] = None,
    ) -> None:
        """Record an event; `key` makes it idempotent (the trainer's stream replayed after a restart)."""
        event_id = translate.stable_id("ftevent", job_id, key) if key is not None else translate.new_id("ftevent")
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO events (id, job_id, created_at, level, message, data, type) "
                "VALUES (?,?,?,?,?,?,?)",
                (
                    event_id,
                    job_id,
                    int(created or time.time()),
                    level,
                    message,
                    json.dumps(data) if data is not None else None,
                    kind,
                ),
            )

    def _set_status(self, job_id: str, pid: Any = ..., **changes: Any) -> dict:
        with self._lock:
            row = self._stored_row(job_id)
            status = json.loads(row["status"])
            status.update(changes)
            if pid is ...:
                self._db.execute("UPDATE jobs SET status=? WHERE id=?", (json.dumps(status), job_id))
            else:
                self._db.execute("UPDATE jobs SET status=?, pid=? WHERE id=?", (json.dumps(status), pid, job_id))
        return status

    def _finish(self, job_id: str, phase: str, message: str, *, level: str = "info", **changes: Any) -> None:
        self._set_status(job_id, phase=phase, completionTime=_rfc3339(time.time()), pid=None, **changes)
        self._event(job_id, message, level=level)

    # ----------------------------------------------------------------------------- supervisor

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # the supervisor must outlive one bad job; the log has it
                log.exception("supervisor step failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _tick(self) -> None:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq ASC").fetchall()
        for row in rows:
            if self._stop.is_set():
                return
            phase = json.loads(row["status"]).get("phase")
            if phase == "Validating":
                self._validate(row)
            elif phase == "Running" and row["id"] in self._workers:
                self._watch(row["id"])
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq ASC").fetchall()
        running = sum(1 for p in self._workers.values() if p.poll() is None)
        for row in rows:
            if running >= self.max_workers:
                break
            with self._lock:  # decided and launched while pause and cancel wait
                row = self._stored_row(row["id"])
                if json.loads(row["status"]).get("phase") == "Queued" and not row["suspend"] and not row["cancel"]:
                    self._launch(row)
                    running += 1

    def _validate(self, row: sqlite3.Row) -> None:
        job_id = row["id"]
        if row["cancel"]:
            self._finish(job_id, "Cancelled", "The job was cancelled")
            return
        files, names = json.loads(row["files"]), json.loads(row["names"])
        train = next(p for p, f in files.items() if f == "training_file")
        validation = next((p for p, f in files.items() if f == "validation_file"), None)
        method_type = JobCreate.model_validate_json(row["request"]).method_type()
        error, report = translate.check_data(train, validation, files=files, names=names, method_type=method_type)
        with self._lock:
            row = self._stored_row(job_id)
            if row["cancel"] or json.loads(row["status"]).get("phase") != "Validating":
                return  # cancelled meanwhile
            self._validated(row, error, report, train, validation)

    def _validated(self, row: sqlite3.Row, error: Any, report: dict, train: str, validation: Optional[str]) -> None:
        job_id = row["id"]
        if error is not None:
            self._finish(
                job_id,
                "Failed",
                f"Job failed: {error.message}",
                level="error",
                error={"code": error.code, "message": error.message, "param": error.param},
            )
            return
        for warning in report.get("warnings", []):
            self._event(job_id, f"Data warning: {warning}", level="warn")
        self._event(
            job_id,
            f"Files validated: {report['examples']} training examples, "
            f"{report['validationExamples']} validation examples; moving job to queued state",
            data={"examples": report["examples"], "validation_examples": report["validationExamples"]},
        )
        request = JobCreate.model_validate_json(row["request"])
        hp = request.effective_hyperparameters()
        batch = hp.batch_size if hp.batch_size != "auto" else CPU_BATCH_SIZE
        every = max(1, math.ceil(report["examples"] / batch))  # a checkpoint per epoch, as OpenAI keeps them
        manifest = translate.to_manifest(
            request,
            name=job_id,
            job_id=job_id,
            train_uri=train,
            validation_uri=validation,
            output_uri=(self._job_dir(job_id) / "output").as_uri(),
            checkpoint_every_steps=every,
        )
        manifest["spec"]["checkpointing"]["keep"] = 100  # every epoch's checkpoint stays listed
        (self._job_dir(job_id) / "job.json").write_text(json.dumps(manifest, indent=2))
        self._set_status(job_id, phase="Suspended" if row["suspend"] else "Queued", examples=report["examples"])

    def _launch(self, row: sqlite3.Row) -> None:
        job_id = row["id"]
        d = self._job_dir(job_id)
        (d / "summary.json").unlink(missing_ok=True)
        cmd = [
            self.python,
            "-m",
            "kubetune.trainer",
            "--spec",
            str(d / "job.json"),
            "--metrics-port",
            "-1",
            "--termination-path",
            str(d / "summary.json"),
            "--events",
            str(d / "events.jsonl"),
        ]
        env = dict(os.environ if self.worker_env is None else self.worker_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(d / "worker.log", "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(d),
                start_new_session=True,
            )
        with self._lock:
            self._workers[job_id] = proc
        first = not json.loads(row["status"]).get("startTime")
        self._set_status(
            job_id,
            phase="Running",
            pid=proc.pid,
            tokensBefore=row["trained_tokens"] or 0,
            **({"startTime": _rfc3339(time.time())} if first else {}),
        )
        self._event(
            job_id, "Fine-tuning job started" if first else "Fine-tuning job restarted from its newest checkpoint"
        )

    def _drain_events(self, job_id: str) -> None:
        """The worker's new event lines → events, progress, checkpoints and trained tokens."""
        path = self._job_dir(job_id) / "events.jsonl"
        row = self._job_row(job_id)
        if row is None or not path.exists():
            return
        offset = row["events_offset"]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        if end == 0:
            return
        status = json.loads(row["status"])
        checkpoints = {int(c["step"]): c for c in status.get("checkpoints") or []}
        tokens = row["trained_tokens"]
        position = offset
        for line in data[:end].splitlines(keepends=True):
            key, position = position, position + len(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            when = record.get("time") or time.time()
            if record.get("type") == "status":
                self._event(job_id, str(record.get("message", ""))[:2000], key=key, created=when)
                continue
            if record.get("type") != "progress":
                continue
            step, total = int(record.get("step") or 0), record.get("total")
            metrics = {
                "step": step,
                "total_steps": total,
                "train_loss": record.get("loss"),
                "tokens_per_second": record.get("tokens_per_s"),
                "epoch": record.get("epoch"),
            }
            loss = record.get("loss")
            self._event(
                job_id,
                f"Step {step}/{total}: training loss={loss:.4f}"
                if isinstance(loss, (int, float))
                else f"Step {step}/{total}",
                data={k: v for k, v in metrics.items() if v is not None},
                kind="metrics",
                key=key,
                created=when,
            )
            if record.get("tokens") is not None:  # this worker's count, after those of earlier runs (resumes)
                tokens = int(status.get("tokensBefore") or 0) + int(record["tokens"])
            progress = {"step": step, "totalSteps": total}
            if record.get("eta") is not None:
                progress["etaSeconds"] = max(0, int(record["eta"]))
            status["progress"] = progress
            status.setdefault("metrics", {})["trainLoss"] = loss
            ckpt = record.get("checkpoint_step")
            if ckpt and int(ckpt) not in checkpoints:
                uri = (self._job_dir(job_id) / "output" / "checkpoints" / f"step-{int(ckpt)}").as_uri()
                checkpoints[int(ckpt)] = {"step": int(ckpt), "uri": uri, "loss": loss, "time": _rfc3339(when)}
                self._event(job_id, f"Checkpoint created at step {int(ckpt)}", key=(key, "ckpt"), created=when)
        status["checkpoints"] = [checkpoints[s] for s in sorted(checkpoints)]
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, events_offset=?, trained_tokens=? WHERE id=?",
                (json.dumps(status), offset + end, tokens, job_id),
            )

    def _watch(self, job_id: str) -> None:
        proc = self._workers[job_id]
        self._drain_events(job_id)
        code = proc.poll()
        if code is None:
            return
        with self._lock:
            self._workers.pop(job_id, None)
        self._drain_events(job_id)
        self._committed_checkpoints(job_id)
        row = self._stored_row(job_id)
        summary = self._summary(job_id)
        if code == 0 and summary.get("status") == "succeeded":
            status = json.loads(row["status"])
            ckpts = {int(c["step"]): c for c in status.get("checkpoints") or []}
            for ref in summary.get("checkpoints") or []:  # the committed ones, with their real URIs
                ckpts[int(ref["step"])] = {**ckpts.get(int(ref["step"]), {}), **ref}
            steps = summary.get("steps")
            self._finish(
                job_id,
                "Succeeded",
                "The job has successfully completed",
                effective=summary.get("effective"),
                metrics=summary.get("metrics"),
                adapter=summary.get("adapter"),
                checkpoints=[ckpts[s] for s in sorted(ckpts)],
                progress={"step": steps, "totalSteps": steps},
            )
            return
        if code in PREEMPTED_CODES or summary.get("status") == "preempted":
            if row["cancel"]:
                self._finish(job_id, "Cancelled", "The job was cancelled")
            elif row["suspend"]:
                self._set_status(job_id, phase="Suspended", pid=None)
                self._event(job_id, "The job was paused after writing a checkpoint; resume it with jobs.resume")
            else:
                self._set_status(job_id, phase="Queued", pid=None)
                self._event(job_id, "The worker was stopped; the job is queued again", level="warn")
            return
        if row["cancel"]:
            self._finish(job_id, "Cancelled", "The job was cancelled")
            return
        if code == PERMANENT_EXIT_CODE:
            error = {
                "code": summary.get("reason") or "PermanentError",
                "message": summary.get("message") or f"the trainer failed; see {self._job_dir(job_id) / 'worker.log'}",
                "param": summary.get("param"),
            }
            shown = translate.job_error(error, json.loads(row["files"]), json.loads(row["names"]))
            self._finish(
                job_id,
                "Failed",
                f"Job failed: {shown.message if shown else error['message']}",
                level="error",
                error=error,
            )
            return
        if row["retries"] < MAX_RETRIES:
            with self._lock:
                self._db.execute("UPDATE jobs SET retries=retries+1 WHERE id=?", (job_id,))
            self._set_status(job_id, phase="Queued", pid=None)
            self._event(
                job_id,
                f"The worker exited with code {code}; retrying from the newest checkpoint "
                f"({row['retries'] + 1} of {MAX_RETRIES})",
                level="warn",
            )
            return
        error = {
            "code": summary.get("reason") or "BackoffLimitExceeded",
            "message": (summary.get("message") or f"the worker exited with code {code}")
            + f" ({MAX_RETRIES} retries); see {self._job_dir(job_id) / 'worker.log'}",
            "param": summary.get("param"),
        }
        self._finish(job_id, "Failed", f"Job failed: {error['message']}", level="error", error=error)

    def _committed_checkpoints(self, job_id: str) -> None:
        """Checkpoints the trainer committed (manifest.json written last) that the event stream did not
        report, e.g. the one written on SIGTERM for a pause or cancel."""
        root = self._job_dir(job_id) / "output" / "checkpoints"
        if not root.is_dir():
            return
        with self._lock:
            status = json.loads(self._stored_row(job_id)["status"])
            known = {int(c["step"]): c for c in status.get("checkpoints") or []}
            for d in root.iterdir():
                name = d.name
                if name.startswith("step-") and name[5:].isdigit() and (d / "manifest.json").is_file():
                    step = int(name[5:])
                    if step not in known:
                        known[step] = {
                            "step": step,
                            "uri": d.as_uri(),
                            "time": _rfc3339((d / "manifest.json").stat().st_mtime),
                        }
                        self._event(job_id, f"Checkpoint created at step {step}", key=("ckpt", step))
            status["checkpoints"] = [known[s] for s in sorted(known)]
            self._db.execute("UPDATE jobs SET status=? WHERE id=?", (json.dumps(status), job_id))

    def _summary(self, job_id: str) -> dict:
        try:
            return json.loads((self._job_dir(job_id) / "summary.json").read_text())
        except (OSError, ValueError):
            return {}


def _get_json(url: str) -> dict:
    """GET a JSON object from the local model server (OSError when it does not answer)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())
