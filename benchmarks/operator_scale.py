"""How the operator copes with a burst of FineTuneJobs: latency, throughput, memory, API load.

The operator runs as its own process, started exactly as the operator image starts it
(`kubetune.operator.__main__.run(namespaces=[NS], peering=False)`: the handlers on kopf's default
registry, the settings from `KUBETUNE_*`), except that kopf's liveness endpoint (KUBETUNE_HEALTH_PORT)
and the operator's metrics port are off so the benchmark cannot collide with anything on the
machine. It talks to one of two API tiers:

- `kmock`: the in-process emulator of tests/kmock_harness.py (no etcd, no schema validation);
- `real`:  kube-apiserver v1.20.2 + etcd from tests/k8s_harness.py (binaries from
           KUBEBUILDER_ASSETS or ~/.cache/kubetune/k8s-v1.20.2/bin), the generated CRD installed,
           and an audit log (level Metadata) to count and time requests on the server side.

For each tier and each N: start the operator, wait until a warm-up FineTuneJob has its Job
(the operator is then connected, its lazy imports done: that first latency is reported as
"cold"), measure the operator's RSS at rest, then create N FineTuneJobs (examples/lora.yaml,
`spec.dataset.prevalidate: false`, unique names) in a burst (32 requests in flight) and wait
until every one has its trainer Job and `status.jobName`.

What the numbers are:
- CR→Job latency: for each FineTuneJob, the time its create request returned (it exists) to
  the time a watch on Jobs, opened before the burst, received the ADDED event of its Job; both on
  the benchmark's monotonic clock. (Job.metadata.creationTimestamp has 1-second resolution, so
  it cannot resolve a 100 ms target.) On the real tier the same latency is also taken from the
  apiserver's audit log (stageTimestamp of the two create requests, µs resolution) as a check on
  client-side effects.
- CRs/s: N / (last Job seen − first FineTuneJob created).
- RSS: the operator process's resident set at rest, and (after − rest) / N per FineTuneJob,
  taken once every Job exists and the API has been quiet for a second.
- API requests per CR: requests the operator sent (user agents `kopf/…` and
  `kubetune-operator/…`) from the start of the burst until the end, / N; from the kmock request
  log or the audit log. The breakdown by verb and resource is printed.

Idle (after the bursts, on the real tier; `--idle` alone, `--no-idle` without): what N = 300
running FineTuneJobs with nothing new to report cost. Each Job gets a Running pod as the Job
controller and kubelet would make it (tests/standin_kubelet.py; podIP 127.0.0.1), every pod's
/metrics is the benchmark's own server (KUBETUNE_METRICS_PORT) answering a constant trainer page;
once all are Running and one scrape interval (KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS, 30 s) has
passed, the operator's requests are counted over 120 s (req/s, by verb and resource) and its
VmRSS sampled every 0.5 s (rest = the median). Then every pod answers a 200 MiB page, with
Content-Length and then chunked, for two intervals each: the peak VmRSS must stay under 1.5 × rest.

    python benchmarks/operator_scale.py                    # kmock + real, N = 100 and 1000; idle on real
    python benchmarks/operator_scale.py --idle --tiers real kmock   # only the idle measurement
    python benchmarks/operator_scale.py --smoke            # N = 5 on kmock (idle: 5 jobs); RESULTS.md untouched
    python benchmarks/operator_scale.py --profile /tmp/p   # py-spy profile of the operator per run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.manifest import load_yaml as load_manifest_yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.kmock_harness and tests.k8s_harness are the API tiers
from report import RESULTS, publish

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
USER_AGENT = "kubetune-operator-scale-bench"
OPERATOR_AGENTS = ("kopf/", "kubetune-operator/")
NAMESPACE = "bench"
CONCURRENCY = 32
TARGETS = {"p50_ms": 100.0, "p99_ms": 1000.0, "crs_per_s": 50.0, "rss_mb": 150.0, "kb_per_cr": 20.0}
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
"""


@dataclass
class Run:
    tier: str
    n: int
    latencies_ms: list[float] = field(default_factory=list)
    status_ms: list[float] = field(default_factory=list)
    server_latencies_ms: list[float] = field(default_factory=list)
    cold_ms: float = 0.0
    crs_per_s: float = 0.0
    create_s: float = 0.0
    rss_rest_mb: float = 0.0
    rss_after_mb: float = 0.0
    rss_peak_mb: float = 0.0
    requests: collections.Counter = field(default_factory=collections.Counter)
    idle_ms: list[float] = field(default_factory=list)
    memory_growth: list[str] = field(default_factory=list)
    load: float = 0.0  # the 1-minute load average when the burst ended
    cpu_ms_per_cr: float = 0.0  # the operator process's user + system CPU during the burst, / N
    api_cpu_ms_per_cr: float = 0.0  # the API tier's (kmock + this client, or apiserver + etcd)
    profile: str | None = None

    @property
    def kb_per_cr(self) -> float:
        return max(0.0, self.rss_after_mb - self.rss_rest_mb) * 1024 / self.n

    def pct(self, q: float, values: list[float] | None = None) -> float:
        v = sorted(self.latencies_ms if values is None else values)
        if not v:
            return float("nan")
        return v[min(len(v) - 1, max(0, round(q * len(v) + 0.5) - 1))]

    @property
    def requests_per_cr(self) -> float:
        return sum(self.requests.values()) / self.n


def manifest(name: str) -> dict[str, Any]:
    obj = load_manifest_yaml((ROOT / "examples" / "lora.yaml").read_text())
    obj["metadata"] = {"name": name, "namespace": NAMESPACE}
    obj["spec"]["dataset"]["prevalidate"] = False
    return obj


def ftj_collection() -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"


def job_collection() -> str:
    return f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"


# ------------------------------------------------------------------------------ the operator process


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc (VmRSS, VmHWM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


class Operator:
    """`run(namespaces=[NS], peering=False, liveness=False)` of kubetune.operator in a subprocess."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        api_url: str | None,
        tracemalloc_dir: Path | None = None,
        executor_threads: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "AWS_"))}
        env.update(KUBECONFIG=str(kubeconfig), KUBETUNE_OPERATOR_METRICS_PORT="0", PYTHONUNBUFFERED="1")
        env.update(extra_env or {})
        if api_url:
            env["KUBETUNE_API_URL"] = api_url  # the operator's Job client; kopf logs in via KUBECONFIG
        code = f"from kubetune.operator.__main__ import run; run(namespaces=[{NAMESPACE!r}], peering=False, liveness=False)"
        self.snapshots: list[Path] = []
        if executor_threads:  # investigation: a larger default executor for the Job client's to_thread calls
            code = (
                "import asyncio, concurrent.futures, kopf\n"
                "@kopf.on.startup()\n"
                "async def _executor(**_):\n"
                f"    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor({executor_threads}))\n"
                + code
            )
        if tracemalloc_dir is not None:  # investigation only: tracemalloc slows the operator several-fold
            self.tracemalloc_dir = tracemalloc_dir
            code = (  # each snapshot is dumped to a temporary name and renamed: the reader never sees half a file
                "import itertools, os, signal, tracemalloc\n"
                "tracemalloc.start(12)\n"
                "n = itertools.count()\n"
                "def _dump(*_):\n"
                f"    path = {str(tracemalloc_dir)!r} + f'/snap-{{next(n)}}'\n"
                "    tracemalloc.take_snapshot().dump(path + '.part')\n"
                "    os.replace(path + '.part', path)\n"
                "signal.signal(signal.SIGUSR1, _dump)\n" + code
            )
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.profiler: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited ({self.proc.returncode}):\n" + self.log.read_text()[-3000:])

    def start_profile(self, path: Path) -> None:
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        self.profiler = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(self.proc.pid),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(path),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop_profile(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.profiler.wait(timeout=30)
            self.profiler = None

    def snapshot(self) -> None:
        """Ask a --tracemalloc operator to dump a tracemalloc snapshot; wait for the file."""
        if not hasattr(self, "tracemalloc_dir"):
            return
        path = self.tracemalloc_dir / f"snap-{len(self.snapshots)}"
        os.kill(self.proc.pid, signal.SIGUSR1)
        path.unlink(missing_ok=True)
        deadline = time.monotonic() + 300
        while not path.exists():  # renamed into place once complete
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no tracemalloc snapshot {path} after 300 s")
            time.sleep(0.5)
        self.snapshots.append(path)

    def stop(self) -> None:
        self.stop_profile()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)


def kubeconfig_for(path: Path, server: str, token: str | None, ca: Path | None = None) -> Path:
    """A kubeconfig; with TLS the serving certificate is trusted (no per-request insecure warning)."""
    user: dict[str, Any] = {"token": token} if token else {}
    cluster: dict[str, Any] = {"server": server}
    if ca is not None:
        cluster["certificate-authority"] = str(ca)
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "bench",
                "clusters": [{"name": "bench", "cluster": cluster}],
                "users": [{"name": "bench", "user": user}],
                "contexts": [
                    {"name": "bench", "context": {"cluster": "bench", "user": "bench", "namespace": NAMESPACE}}
                ],
            }
        )
    )
    return path


# ------------------------------------------------------------------------------ the client side


class Watcher:
    """A watch stream; records the monotonic receive time of the first event matching a test."""

    def __init__(self, http: Any, path: str, key: Any) -> None:
        self.http, self.path, self.key = http, path, key
        self.seen: dict[str, float] = {}
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async with self.http.get(self.path) as resp:
            resp.raise_for_status()
            rv = (await resp.json())["metadata"]["resourceVersion"]
        self.task = asyncio.create_task(self._run(rv))

    async def _run(self, rv: str) -> None:
        """Watch from `rv`; when the server ends the stream (a loaded kube-apiserver closes a
        watcher that falls behind), watch again from the last event's resourceVersion, and
        after a 410 Gone list again (every listed object then counts as seen now)."""
        import aiohttp

        while True:
            params = {"watch": "true", "resourceVersion": rv}
            expired = False
            try:
                async with self.http.get(
                    self.path, params=params, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)
                ) as resp:
                    resp.raise_for_status()
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        now = time.monotonic()
                        buf += chunk
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            obj = event.get("object") or {}
                            if event.get("type") == "ERROR":
                                expired = obj.get("code") == 410
                                break
                            rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                            self._see(event, now)
                        if expired:
                            break
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.5)
            if expired:
                async with self.http.get(self.path) as resp:
                    resp.raise_for_status()
                    listing = await resp.json()
                now = time.monotonic()
                for item in listing.get("items") or []:
                    self._see({"type": "ADDED", "object": item}, now)
                rv = listing["metadata"]["resourceVersion"]

    def _see(self, event: dict[str, Any], now: float) -> None:
        name = self.key(event)
        if name and name not in self.seen:
            self.seen[name] = now
            self.changed.set()

    async def wait_for(self, names: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not names <= self.seen.keys():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(names - self.seen.keys())
                raise TimeoutError(
                    f"{len(missing)} of {len(names)} not seen on {self.path} after {timeout:g} s, e.g. {missing[:3]}"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 1.0))

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


def _job_owner(event: dict[str, Any]) -> str | None:
    if event.get("type") != "ADDED":
        return None
    name = event["object"]["metadata"]["name"]
    return name[: -len("-train")] if name.endswith("-train") else None


def _ftj_with_job(event: dict[str, Any]) -> str | None:
    obj = event.get("object") or {}
    return obj.get("metadata", {}).get("name") if (obj.get("status") or {}).get("jobName") else None


async def create_all(http: Any, names: list[str]) -> dict[str, float]:
    """POST every FineTuneJob with CONCURRENCY in flight; the monotonic time each one returned."""
    created: dict[str, float] = {}
    queue = list(reversed(names))

    async def worker() -> None:
        while queue:
            name = queue.pop()
            async with http.post(ftj_collection(), json=manifest(name)) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"creating {name}: HTTP {resp.status} {(await resp.text())[:300]}")
                created[name] = time.monotonic()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return created


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes (all their threads), from /proc/PID/stat."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


async def measure(
    tier: str,
    n: int,
    http: Any,
    kubeconfig: Path,
    api_url: str | None,
    workdir: Path,
    profile_dir: Path | None,
    on_burst: Any = lambda: None,
    api_pids: list[int] | None = None,
    options: argparse.Namespace | None = None,
) -> tuple[Run, float, float]:
    """One operator process, a warm-up CR, then the burst; returns the run and its wall window."""
    run = Run(tier, n)
    jobs = Watcher(http, job_collection(), _job_owner)
    ftjs = Watcher(http, ftj_collection(), _ftj_with_job)
    await jobs.start()
    await ftjs.start()
    trace = options.tracemalloc if options is not None else None
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
    op = Operator(
        kubeconfig,
        workdir / f"operator-{tier}-{n}.log",
        api_url,
        trace,
        options.executor_threads if options is not None else None,
    )
    try:
        # Warm up: the first FineTuneJob also waits for kopf to connect and for lazy imports.
        warm = await create_all(http, ["warmup"])
        await jobs.wait_for({"warmup"}, 90)
        run.cold_ms = 1000 * (jobs.seen["warmup"] - warm["warmup"])
        op.check()
        # One at a time: the reaction time of an idle operator, without any queue.
        for i in range(options.sequential if options is not None else 0):
            one = await create_all(http, [f"single-{i:03d}"])
            await jobs.wait_for({f"single-{i:03d}"}, 30)
            run.idle_ms.append(1000 * (jobs.seen[f"single-{i:03d}"] - one[f"single-{i:03d}"]))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(op.snapshot)
        run.rss_rest_mb = rss_mb(op.proc.pid)[0]
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            run.profile = str(profile_dir / f"operator-{tier}-{n}.txt")
            op.start_profile(Path(run.profile))
        names = [f"bench-{i:05d}" for i in range(n)]
        on_burst()
        api_pids = api_pids or [os.getpid()]
        cpu0, api_cpu0 = cpu_seconds([op.proc.pid]), cpu_seconds(api_pids)
        wall_start = time.time()
        t_start = time.monotonic()
        created = await create_all(http, names)
        run.create_s = max(created.values()) - t_start
        await jobs.wait_for(set(names), 120 + n * 0.5)
        await ftjs.wait_for(set(names), 60 + n * 0.1)
        last_job = max(jobs.seen[x] for x in names)
        run.load = os.getloadavg()[0]
        run.cpu_ms_per_cr = 1000 * (cpu_seconds([op.proc.pid]) - cpu0) / n
        run.api_cpu_ms_per_cr = 1000 * (cpu_seconds(api_pids) - api_cpu0) / n
        run.crs_per_s = n / (last_job - min(created.values()))
        # Quiet for a second: trailing event posts and status patches are done.
        await asyncio.sleep(1.0)
        wall_end = time.time()
        op.stop_profile()
        op.check()
        run.rss_after_mb, run.rss_peak_mb = rss_mb(op.proc.pid)
        await asyncio.to_thread(op.snapshot)
        if len(op.snapshots) == 2:
            run.memory_growth = memory_growth(*op.snapshots, n)
        run.latencies_ms = [max(0.0, 1000 * (jobs.seen[x] - created[x])) for x in names]
        run.status_ms = [max(0.0, 1000 * (ftjs.seen[x] - created[x])) for x in names]
        return run, wall_start, wall_end
    finally:
        op.stop()
        await jobs.stop()
        await ftjs.stop()


# ------------------------------------------------------------------------------ idle: many running jobs

PEAK_RATIO_TARGET = 1.5  # the operator's RSS while every pod serves a huge page ÷ its RSS at rest
BIG_MODES = {"length": "Content-Length", "chunked": "chunked"}  # the huge page, announced or not


def trainer_page() -> bytes:
    """The /metrics page of a trainer in the middle of its run, from the trainer's own registry
    (kubetune.trainer.metrics.TrainerMetrics) with plausible values that never change."""
    from kubetune.trainer.metrics import TrainerMetrics
    from prometheus_client import generate_latest

    m = TrainerMetrics()
    for gauge, value in (
        (m.step, 1200),
        (m.total_steps, 5000),
        (m.epoch, 0.72),
        (m.train_loss, 1.2345),
        (m.eval_loss, 1.3012),
        (m.base_eval_loss, 1.9021),
        (m.token_accuracy, 0.61),
        (m.learning_rate, 1.6e-4),
        (m.tokens_per_second, 5400),
        (m.samples_per_second, 10.5),
        (m.progress, 0.24),
        (m.eta, 5400),
        (m.last_checkpoint_step, 1000),
        (m.last_checkpoint_time, 1.7e9),
        (m.checkpoint_stall, 0.8),
        (m.checkpoint_upload, 12.0),
        (m.gpu_memory, 21e9),
        (m.gpu_power, 450),
        (m.start_time, 1.7e9 - 3600),
    ):
        gauge.set(value)
    m.tokens.inc(6.5e6)
    m.gpu_energy.inc(2.4e6)
    m.objective.labels("kdLoss").set(0.42)
    with contextlib.suppress(Exception):  # the resolved hyperparameters' schema is not this benchmark's concern
        m.set_effective(
            {
                "epochs": 3,
                "learning_rate": 2e-4,
                "batch_size": 8,
                "gradient_accumulation": 4,
                "precision": "bf16",
                "max_seq_length": 2048,
                "checkpoint_every_steps": 500,
            }
        )
    return generate_latest(m.registry)


class TrainerPages:
    """Every running trainer pod's /metrics endpoint (the fake pods all have podIP 127.0.0.1),
    served from a thread of its own. `mode`: `idle` answers `trainer_page()`; `length` a huge
    page with its Content-Length; `chunked` the same huge page, chunked, without Content-Length.
    Each answer closes its connection (the operator opens one per scrape)."""

    def __init__(self, page: bytes, big_bytes: int) -> None:
        self.page, self.big_bytes = page, big_bytes
        self.mode = "idle"
        self.served: collections.Counter = collections.Counter()  # mode → requests answered
        self.sent: collections.Counter = collections.Counter()  # mode → body bytes the socket took
        self.inflight = 0
        self.most_inflight: collections.Counter = collections.Counter()  # mode → most requests answered at once
        line = b'kubetune_trainer_bench_filler_series_of_a_hostile_page{pad="' + b"x" * 40 + b'"} 1\n'
        self.filler = memoryview(line * ((1 << 20) // len(line)))  # ≈ 1 MiB of lines, reused for every chunk
        self.port = 0
        self._thread: Any = None
        self._stop: Any = None
        self._loop: Any = None

    def __enter__(self) -> TrainerPages:
        import threading

        ready = threading.Event()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(ready),), name="trainer-pages", daemon=True
        )
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the trainer page server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _main(self, ready: Any) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=4096)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        self.inflight += 1
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            self.served[mode] += 1
            self.most_inflight[mode] = max(self.most_inflight[mode], self.inflight)
            head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nConnection: close\r\n"
            if mode == "idle":
                writer.write(f"{head}Content-Length: {len(self.page)}\r\n\r\n".encode() + self.page)
                await writer.drain()
                self.sent[mode] += len(self.page)
                return
            chunked = mode == "chunked"
            writer.write(
                (
                    head
                    + ("Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {self.big_bytes}\r\n\r\n")
                ).encode()
            )
            left = self.big_bytes
            while left > 0:
                piece = self.filler[: min(left, len(self.filler))]
                if chunked:
                    writer.write(b"%x\r\n" % len(piece))
                writer.write(piece)
                if chunked:
                    writer.write(b"\r\n")
                await writer.drain()
                left -= len(piece)
                self.sent[mode] += len(piece)
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # the operator hung up: what it should do with a huge page
        finally:
            self.inflight -= 1
            writer.close()


class RssSampler:
    """VmRSS of a process every `period` seconds, labelled with the phase running at the time."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid, self.period = pid, period
        self.phase = "setup"
        self.samples: dict[str, list[float]] = collections.defaultdict(list)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, KeyError):
                self.samples[self.phase].append(rss_mb(self.pid)[0])
            await asyncio.sleep(self.period)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class IdleRun:
    tier: str
    n: int
    interval_s: float
    window_s: float
    big_mib: int
    running: int = 0  # FineTuneJobs in phase Running when the idle window starts
    running_end: int = 0  # … and at the very end
    setup_s: float = 0.0  # first FineTuneJob created → every one Running
    windows: dict[str, tuple[float, float, float, float]] = field(
        default_factory=dict
    )  # phase → wall, wall, mono, mono
    requests: dict[str, collections.Counter] = field(default_factory=dict)  # phase → "verb resource" → count
    scrapes: dict[str, int] = field(default_factory=dict)  # phase → requests to the trainer pages
    most_inflight: dict[str, int] = field(default_factory=dict)  # phase → most scrapes answered at once
    sent: dict[str, int] = field(default_factory=dict)  # phase → body bytes the page server's sockets took
    scrape_failures: dict[str, float | None] = field(default_factory=dict)  # phase → operator's counter delta
    cpu_s: dict[str, float] = field(default_factory=dict)  # phase → operator CPU seconds
    api_cpu_s: dict[str, float] = field(default_factory=dict)  # phase → API side CPU seconds
    rss: dict[str, list[float]] = field(default_factory=dict)  # phase → VmRSS samples (MiB)
    hwm_before_big_mb: float = 0.0
    hwm_end_mb: float = 0.0
    status_changes: collections.Counter = field(
        default_factory=collections.Counter
    )  # path → FineTuneJobs changed in the idle window
    load: float = 0.0

    def seconds(self, phase: str) -> float:
        w = self.windows.get(phase)
        return (w[1] - w[0]) if w else float("nan")

    def per_s(self, phase: str) -> float:
        return sum(self.requests.get(phase, {}).values()) / self.seconds(phase)

    @property
    def requests_per_s(self) -> float:
        return self.per_s("idle")

    @property
    def per_job_tick(self) -> float:
        return self.requests_per_s * self.interval_s / self.n

    @property
    def rss_rest_mb(self) -> float:
        v = sorted(self.rss.get("idle") or [float("nan")])
        return v[len(v) // 2]

    def peak_mb(self, phase: str) -> float:
        return max(self.rss.get(phase) or [float("nan")])

    @property
    def rss_peak_mb(self) -> float:
        """The most the operator held while the huge pages were served: the highest sample, or
        VmHWM if it rose during those phases (a spike between two samples)."""
        peak = max(self.peak_mb(m) for m in BIG_MODES)
        return max(peak, self.hwm_end_mb) if self.hwm_end_mb > self.hwm_before_big_mb else peak

    @property
    def peak_ratio(self) -> float:
        return self.rss_peak_mb / self.rss_rest_mb

    @property
    def rss_after_mb(self) -> float:
        return (self.rss.get("after") or [float("nan")])[-1]

    def cpu_pct(self, phase: str = "idle") -> float:
        return 100 * self.cpu_s.get(phase, float("nan")) / self.seconds(phase)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def operator_scrape_failures(port: int) -> float | None:
    """kubetune_operator_scrape_failures_total from the operator's own /metrics; None if unreadable."""
    import aiohttp

    with contextlib.suppress(Exception):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
            s.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            for line in (await resp.text()).splitlines():
                if line.startswith("kubetune_operator_scrape_failures_total "):
                    return float(line.split()[1])
    return None


async def get_json(http: Any, path: str) -> dict[str, Any]:
    async with http.get(path) as resp:
        resp.raise_for_status()
        return await resp.json()


async def ftj_statuses(http: Any) -> dict[str, dict[str, Any]]:
    """name → {status, annotations} of every FineTuneJob."""
    items = (await get_json(http, ftj_collection())).get("items") or []
    return {
        o["metadata"]["name"]: {"status": o.get("status") or {}, "annotations": o["metadata"].get("annotations") or {}}
        for o in items
    }


def changed_paths(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Leaf paths whose values differ between two JSON values (lists of conditions by type)."""
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) and "type" in x for x in a + b):
        a, b = {x["type"]: x for x in a}, {x["type"]: x for x in b}
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            p
            for k in sorted(a.keys() | b.keys(), key=str)
            for p in changed_paths(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        ]
    return [] if a == b else [prefix]


def make_running(standin: Any, jobs: list[dict[str, Any]], threads: int = 8) -> None:
    """As the Job controller and the kubelet would: a Pod for each Job (tests/standin_kubelet.py:
    template labels + job-name labels, a controlling ownerReference, spec.nodeName), its status
    Running (podIP 127.0.0.1, the trainer container running and ready) through /status, and the
    Job's status active 1 with a startTime."""
    import concurrent.futures

    started = datetime.datetime.now(datetime.UTC)

    def one(job: dict[str, Any]) -> None:
        pod = standin.pod_for(job)
        standin.set_pod_phase(pod, "Running")
        standin.set_job_status(job, active=1, start_time=started)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, jobs))


async def wait_running(http: Any, names: list[str], timeout: float) -> int:
    """Wait until every FineTuneJob of `names` is in phase Running; how many are."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = await ftj_statuses(http)
        running = sum(1 for x in names if statuses.get(x, {}).get("status", {}).get("phase") == "Running")
        if running == len(names) or time.monotonic() > deadline:
            return running
        await asyncio.sleep(1.0)


async def measure_idle(
    tier: str,
    http: Any,
    kubeconfig: Path,
    api_url: str | None,
    workdir: Path,
    options: argparse.Namespace,
    api_pids: list[int] | None = None,
) -> IdleRun:
    """N running FineTuneJobs whose trainers serve a constant page: the operator's API requests
    and RSS at rest, then its RSS while every trainer serves a huge page."""
    from tests.standin_kubelet import StandinKubelet

    n, interval, window = options.idle_jobs, options.idle_interval, options.idle_seconds
    run = IdleRun(tier, n, interval, window, options.big_page_mib)
    api_pids = api_pids or [os.getpid()]
    jobs = Watcher(http, job_collection(), _job_owner)
    ftjs = Watcher(http, ftj_collection(), _ftj_with_job)
    await jobs.start()
    await ftjs.start()
    op_port = free_port()
    with (
        TrainerPages(trainer_page(), options.big_page_mib << 20) as pages,
        StandinKubelet(kubeconfig, log_dir=workdir / "standin") as standin,
    ):
        op = Operator(
            kubeconfig,
            workdir / f"operator-{tier}-idle-{n}.log",
            api_url,
            extra_env={
                "KUBETUNE_METRICS_PORT": str(pages.port),  # every trainer pod's metrics port (podIP 127.0.0.1)
                "KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS": f"{interval:g}",
                "KUBETUNE_OPERATOR_METRICS_PORT": str(op_port),  # for its scrape failure counter
                "KUBETUNE_BIND_ADDRESS": "127.0.0.1",
            },
        )
        sampler = RssSampler(op.proc.pid)
        try:
            names = [f"idle-{i:05d}" for i in range(n)]
            t0 = time.monotonic()
            await create_all(http, names)
            await jobs.wait_for(set(names), 120 + n * 0.5)
            await ftjs.wait_for(set(names), 60 + n * 0.1)
            op.check()
            wanted = set(names)
            owned = [
                j
                for j in (await get_json(http, job_collection()))["items"]
                if _job_owner({"type": "ADDED", "object": j}) in wanted
            ]
            await asyncio.to_thread(make_running, standin, owned)
            await wait_running(http, names, 2 * interval + 60 + n * 0.2)
            run.setup_s = time.monotonic() - t0
            await asyncio.sleep(interval)  # settle: every timer has ticked on its running pod
            op.check()
            sampler.start()

            async def phase(name: str, mode: str, seconds: float) -> None:
                pages.mode, sampler.phase = mode, name
                failures0 = await operator_scrape_failures(op_port)
                served0, sent0 = pages.served[mode], pages.sent[mode]
                pages.most_inflight[mode] = 0
                cpu0, api_cpu0 = cpu_seconds([op.proc.pid]), cpu_seconds(api_pids)
                wall0, mono0 = time.time(), time.monotonic()
                await asyncio.sleep(seconds)
                run.windows[name] = (wall0, time.time(), mono0, time.monotonic())
                run.cpu_s[name] = cpu_seconds([op.proc.pid]) - cpu0
                run.api_cpu_s[name] = cpu_seconds(api_pids) - api_cpu0
                run.scrapes[name] = pages.served[mode] - served0
                run.most_inflight[name] = pages.most_inflight[mode]
                run.sent[name] = pages.sent[mode] - sent0
                failures1 = await operator_scrape_failures(op_port)
                run.scrape_failures[name] = None if failures0 is None or failures1 is None else failures1 - failures0
                op.check()

            before = await ftj_statuses(http)
            run.running = sum(1 for x in names if before.get(x, {}).get("status", {}).get("phase") == "Running")
            await phase("idle", "idle", window)
            run.load = os.getloadavg()[0]
            after = await ftj_statuses(http)
            for x in names:
                for path in changed_paths(before.get(x), after.get(x)):
                    run.status_changes[path] += 1
            run.hwm_before_big_mb = rss_mb(op.proc.pid)[1]
            for mode in BIG_MODES:
                await phase(mode, mode, options.big_intervals * interval)
            await phase("after", "idle", interval)  # the small page again: is the memory given back?
            run.hwm_end_mb = rss_mb(op.proc.pid)[1]
            final = await ftj_statuses(http)
            run.running_end = sum(1 for x in names if final.get(x, {}).get("status", {}).get("phase") == "Running")
            run.rss = dict(sampler.samples)
            return run
        finally:
            await sampler.stop()
            op.stop()
            await jobs.stop()
            await ftjs.stop()


# ------------------------------------------------------------------------------ the two tiers


@contextlib.asynccontextmanager
async def serve_kmock() -> Any:
    """tests/kmock_harness.py's emulator, without kmock's quadratic request matching.

    kmock keeps every request it ever served and, for each new one, finds its reaction by
    testing `request in payload._source` — a scan over that whole history through the DSL
    filters, so request k costs O(k): thousands of requests take minutes and the emulator, not
    the operator, becomes the bottleneck. Here each request leaves kmock's history as soon as
    it is answered (the harness's own `requests` log, used for counting, keeps every one). The
    emulator's semantics are unchanged; no reaction DSL is used by this benchmark.
    """
    import threading

    import kmock

    from tests.kmock_harness import KubeEmulator

    class BenchEmulator(KubeEmulator):
        async def _handle(self, request: Any) -> Any:
            try:
                return await super()._handle(request)
            finally:
                with contextlib.suppress(ValueError):
                    self._requests.remove(request)

    ready: Any = asyncio.get_running_loop().create_future()
    outer = asyncio.get_running_loop()

    async def main() -> None:
        stop = asyncio.Event()
        async with BenchEmulator() as kube, kmock.Server(kube, host="127.0.0.1"):
            kube._loop = asyncio.get_running_loop()
            outer.call_soon_threadsafe(ready.set_result, (kube, kube._loop, stop))
            await stop.wait()
            kube._drop_watches()
            await asyncio.sleep(0)

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="kmock-emulator", daemon=True)
    thread.start()
    kube, loop, stop = await asyncio.wait_for(ready, 30)
    try:
        yield kube
    finally:
        loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join, 30)


async def kmock_tier(n: int, workdir: Path, args: argparse.Namespace) -> Run:
    import aiohttp

    from tests.kmock_harness import verb_resource

    async with serve_kmock() as kube:
        kubeconfig = kubeconfig_for(workdir / "kubeconfig-kmock", kube.base_url, None)
        async with aiohttp.ClientSession(base_url=kube.base_url, headers={"User-Agent": USER_AGENT}) as http:
            start = [0]
            run, _, _ = await measure(
                "kmock",
                n,
                http,
                kubeconfig,
                kube.base_url,
                workdir,
                args.profile,
                on_burst=lambda: start.__setitem__(0, len(kube.requests)),
                options=args,
            )
            # The request log: everything the operator sent from the start of the burst.
            records = list(kube.requests)
        for r in records[start[0] :]:
            if r.user_agent.startswith(OPERATOR_AGENTS):
                run.requests[" ".join(verb_resource(r))] += 1
    return run


@contextlib.asynccontextmanager
async def real_api(workdir: Path, audit: Path) -> Any:
    """kube-apiserver + etcd with the CRD, namespace NAMESPACE and an audit log at `audit`:
    (api, an aiohttp session as the benchmark, a kubeconfig for the operator)."""
    import aiohttp

    from tests.k8s_harness import ApiServer, install_crd

    policy = workdir / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    flags = [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={audit}",
        "--audit-log-format=json",
        "--audit-log-maxsize=0",
    ]
    with ApiServer(extra_apiserver_args=flags) as api:
        install_crd(api.kubeconfig, "\n---\n".join(p.read_text() for p in sorted((ROOT / "crds").glob("*.yaml"))))
        headers = {"User-Agent": USER_AGENT, "Authorization": f"Bearer {api.token}"}
        connector = aiohttp.TCPConnector(ssl=False, limit=CONCURRENCY + 8)
        async with aiohttp.ClientSession(base_url=api.url, headers=headers, connector=connector) as http:
            async with http.post(
                "/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
            ) as resp:
                assert resp.status == 201, await resp.text()
            assert api.tmpdir is not None
            kubeconfig = kubeconfig_for(
                workdir / f"kubeconfig-real-{audit.stem}", api.url, api.token, api.tmpdir / "certs" / "apiserver.crt"
            )
            yield api, http, kubeconfig


def audit_events(audit: Path) -> list[dict[str, Any]]:
    """The audit log's events, once the asynchronous audit backend has written them."""
    return [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]


def operator_request(ev: dict[str, Any]) -> str | None:
    """`verb group/version/resource[/subresource]` of an audit event of a request the operator
    sent, counted once (a watch when its response starts, anything else when it completes)."""
    if not (ev.get("userAgent") or "").startswith(OPERATOR_AGENTS):
        return None
    if ev.get("stage") != ("ResponseStarted" if ev.get("verb") == "watch" else "ResponseComplete"):
        return None
    ref = ev.get("objectRef") or {}
    resource = "/".join(
        x for x in (ref.get("apiGroup"), ref.get("apiVersion"), ref.get("resource"), ref.get("subresource")) if x
    )
    return f"{ev['verb']} {resource or ev.get('requestURI', '?')}"


async def real_tier(n: int, workdir: Path, args: argparse.Namespace) -> Run:
    audit = workdir / f"audit-{n}.log"
    async with real_api(workdir, audit) as (api, http, kubeconfig):
        run, wall_start, wall_end = await measure(
            "real", n, http, kubeconfig, None, workdir, args.profile, api_pids=api.pids(), options=args
        )
    await asyncio.sleep(0.5)  # the audit backend writes asynchronously
    created: dict[str, float] = {}
    job_created: dict[str, float] = {}
    for ev in audit_events(audit):
        if ev.get("stage") not in ("ResponseComplete", "ResponseStarted"):
            continue
        ts = _ts(ev["stageTimestamp"])
        agent = ev.get("userAgent") or ""
        ref = ev.get("objectRef") or {}
        if (
            agent.startswith(USER_AGENT)
            and ev["verb"] == "create"
            and ref.get("resource") == PLURAL
            and ev["responseStatus"]["code"] == 201
        ):
            created[ref.get("name") or ""] = ts
        if agent.startswith(OPERATOR_AGENTS):
            if ev["verb"] == "create" and ref.get("resource") == "jobs" and ev["responseStatus"]["code"] == 201:
                job_created[(ref.get("name") or "").removesuffix("-train")] = ts
            if wall_start <= ts <= wall_end and (key := operator_request(ev)):
                run.requests[key] += 1
    names = [f"bench-{i:05d}" for i in range(n)]
    if all(x in created and x in job_created for x in names):
        run.server_latencies_ms = [1000 * (job_created[x] - created[x]) for x in names]
    return run


async def kmock_idle(workdir: Path, args: argparse.Namespace) -> IdleRun:
    import aiohttp

    from tests.kmock_harness import verb_resource

    async with serve_kmock() as kube:
        kubeconfig = kubeconfig_for(workdir / "kubeconfig-kmock-idle", kube.base_url, None)
        async with aiohttp.ClientSession(base_url=kube.base_url, headers={"User-Agent": USER_AGENT}) as http:
            run = await measure_idle("kmock", http, kubeconfig, kube.base_url, workdir, args)
        records = list(kube.requests)
    for phase, (_, _, mono0, mono1) in run.windows.items():
        run.requests[phase] = collections.Counter(
            " ".join(verb_resource(r))
            for r in records
            if mono0 <= r.timestamp < mono1 and r.user_agent.startswith(OPERATOR_AGENTS)
        )
    return run


async def real_idle(workdir: Path, args: argparse.Namespace) -> IdleRun:
    audit = workdir / "audit-idle.log"
    async with real_api(workdir, audit) as (api, http, kubeconfig):
        run = await measure_idle("real", http, kubeconfig, None, workdir, args, api_pids=api.pids())
        await asyncio.sleep(1.0)  # the audit backend writes asynchronously
        events = audit_events(audit)
    for phase, (wall0, wall1, _, _) in run.windows.items():
        counts: collections.Counter = collections.Counter()
        for ev in events:
            key = operator_request(ev)
            if key and wall0 <= _ts(ev.get("requestReceivedTimestamp") or ev["stageTimestamp"]) < wall1:
                counts[key] += 1
        run.requests[phase] = counts
    return run


def _ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------------------ profile summary


def memory_growth(before: Path, after: Path, n: int, limit: int = 8) -> list[str]:
    """The allocation sites whose live memory grew most between two tracemalloc snapshots."""
    import tracemalloc

    a, b = tracemalloc.Snapshot.load(str(before)), tracemalloc.Snapshot.load(str(after))
    total = sum(s.size_diff for s in b.compare_to(a, "filename"))
    rows = [f"total {total / n / 1024:.1f} KB/CR traced"]
    for stat in b.compare_to(a, "traceback")[:limit]:
        frames = [f for f in stat.traceback if "tracemalloc" not in f.filename][::-1]  # allocation site first
        where = " ← ".join(f"{_short(f.filename)}:{f.lineno}" for f in frames[:4])
        rows.append(f"{stat.size_diff / n / 1024:.1f} KB/CR {where}")
    return rows


def _short(path: str) -> str:
    for root in ("site-packages/", "/work/main/"):
        path = path.split(root)[-1]
    return path.split("lib/python3.11/")[-1]


# Leaf frames that are waiting, not computing (py-spy's idle detection misses some of them).
_WAITING = (
    "SSLSocket.read (ssl.py",
    "do_poll",
    "Condition.wait",
    "EpollSelector.select",
    "SocketIO.readinto",
    "_worker (concurrent/futures/thread.py:81)",
    "Event.wait",
    "Lock.acquire",
)
# (substring of a frame, category): walking from the leaf up, the first frame that matches decides.
_CATEGORIES = [
    ("operator/builders.py", "kubetune builders"),
    ("api/resource.py", "kubetune parse_manifest"),
    ("operator/metrics.py", "kubetune metrics"),
    ("count_phases", "kubetune count_phases"),
    ("Kube._call", "kubernetes client (Kube._call, worker thread)"),
    ("kopf/_core/engines/posting.py", "kopf event posting"),
    ("kopf/_cogs/clients/events.py", "kopf event posting"),
    ("kopf/_cogs/clients/", "kopf API client"),
    ("kopf/_cogs/structs/credentials.py", "kopf API client"),
    ("kopf/_core/reactor/queueing.py", "kopf watch + queueing"),
    ("kopf/", "kopf handler machinery"),
    ("operator/handlers.py", "kubetune handlers"),
    ("operator/actions.py", "kubetune handlers"),
    ("operator/client.py", "kubernetes client (Kube._call, worker thread)"),
    ("aiohttp", "aiohttp"),
    ("concurrent/futures", "thread-pool hand-offs"),
    ("call_soon_threadsafe", "thread-pool hand-offs"),
    ("_write_to_self", "thread-pool hand-offs"),
    ("_read_from_self", "thread-pool hand-offs"),
]


def profile_breakdown(path: str, limit: int = 10) -> list[tuple[str, float]]:
    """Share of the operator's busy py-spy samples (collapsed stacks) per category."""
    shares: collections.Counter = collections.Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        if any(w in frames[-1] for w in _WAITING):
            continue
        category = next((name for f in reversed(frames) for key, name in _CATEGORIES if key in f), "asyncio, other")
        shares[category] += int(count)
    total = sum(shares.values()) or 1
    return [(name, 100 * c / total) for name, c in shares.most_common(limit)]


# ------------------------------------------------------------------------------ main


def verdicts(run: Run) -> dict[str, bool]:
    return {
        "p50_ms": run.pct(0.5) <= TARGETS["p50_ms"],
        "p99_ms": run.pct(0.99) <= TARGETS["p99_ms"],
        "crs_per_s": run.crs_per_s >= TARGETS["crs_per_s"],
        "rss_mb": run.rss_rest_mb <= TARGETS["rss_mb"],
        "kb_per_cr": run.kb_per_cr <= TARGETS["kb_per_cr"],
    }


def environment() -> str:
    import kopf

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, kopf {kopf.__version__ if hasattr(kopf, '__version__') else _dist('kopf')}"


def _dist(name: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "?"


def keep_logs(workdir: Path, args: argparse.Namespace) -> None:
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        for f in [*workdir.glob("operator-*.log"), *workdir.glob("audit-*.log")]:
            shutil.copy(f, args.keep_logs / f.name)


async def bursts(workdir: Path, args: argparse.Namespace, date: str) -> None:
    runs: list[Run] = []
    for tier in args.tiers:
        for n in args.n:
            started = time.monotonic()
            try:
                run = await (kmock_tier if tier == "kmock" else real_tier)(n, workdir, args)
            finally:
                keep_logs(workdir, args)
            runs.append(run)
            v = verdicts(run)
            print(
                f"  {tier:5s} N={n:5d}: p50 {run.pct(0.5):7.1f} ms p99 {run.pct(0.99):7.1f} ms {run.crs_per_s:6.1f} CRs/s "
                f"rss {run.rss_rest_mb:.0f} MB +{run.kb_per_cr:.1f} KB/CR {run.requests_per_cr:.1f} req/CR "
                f"cpu {run.cpu_ms_per_cr:.1f} ms/CR (api {run.api_cpu_ms_per_cr:.1f}) load {run.load:.1f} "
                f"({time.monotonic() - started:.0f} s) {'' if all(v.values()) else 'missed: ' + ','.join(k for k, ok in v.items() if not ok)}",
                file=sys.stderr,
            )

    def mark(ok: bool) -> str:
        return "" if ok else " ✗"

    lines = [
        f"### operator_scale — {date}",
        "",
        (
            f"{environment()}; kubetune.operator as a subprocess (`run(namespaces=[{NAMESPACE}], peering=False)`), one namespace; "
            f"N FineTuneJobs from examples/lora.yaml (prevalidate false) created with {CONCURRENCY} requests in flight after a warm-up CR; "
            "latency = CR create returned → Job ADDED received on a watch (client monotonic clock); idle = the same for CRs created one "
            "at a time before the burst (no queue); server = the burst latency from the "
            "apiserver audit log's stageTimestamps. ✗ = target missed (p50 ≤ 100 ms, p99 ≤ 1 s, ≥ 50 CRs/s, RSS ≤ 150 MB + 20 KB/CR)."
        ),
        "",
        "| tier | N | idle p50 ms | p50 ms | p99 ms | server p50 / p99 ms | →status p50 ms | cold ms | CRs/s | burst create s | RSS rest MB | KB/CR | peak RSS MB | API req/CR | operator CPU ms/CR | API-side CPU ms/CR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        v = verdicts(r)
        server = (
            f"{r.pct(0.5, r.server_latencies_ms):.0f} / {r.pct(0.99, r.server_latencies_ms):.0f}"
            if r.server_latencies_ms
            else "—"
        )
        lines.append(
            f"| {r.tier} | {r.n} | {r.pct(0.5, r.idle_ms):.1f} | {r.pct(0.5):.1f}{mark(v['p50_ms'])} | {r.pct(0.99):.1f}{mark(v['p99_ms'])} | {server} | "
            f"{r.pct(0.5, r.status_ms):.1f} | {r.cold_ms:.0f} | {r.crs_per_s:.1f}{mark(v['crs_per_s'])} | {r.create_s:.2f} | "
            f"{r.rss_rest_mb:.1f}{mark(v['rss_mb'])} | {r.kb_per_cr:.1f}{mark(v['kb_per_cr'])} | {r.rss_peak_mb:.1f} | {r.requests_per_cr:.2f} | "
            f"{r.cpu_ms_per_cr:.1f} | {r.api_cpu_ms_per_cr:.1f} |"
        )
    lines.append("")
    for r in runs:
        breakdown = ", ".join(f"{k} {c / r.n:.2f}" for k, c in r.requests.most_common())
        lines.append(f"- {r.tier} N={r.n} requests per CR: {breakdown}; 1-minute load average at the end {r.load:.1f}")
        if r.profile and Path(r.profile).exists():
            shares = profile_breakdown(r.profile)
            lines.append(
                "  - py-spy, the operator's busy samples: " + "; ".join(f"{name} {pct:.0f} %" for name, pct in shares)
            )
        if r.memory_growth:
            lines.append("  - tracemalloc, live memory added by the burst: " + "; ".join(r.memory_growth))
    lines.append("")
    headline = max((r for r in runs), key=lambda r: (r.tier == "real", r.n))
    result = (
        f"RESULT operator_scale p50_ms={headline.pct(0.5):.1f} p99_ms={headline.pct(0.99):.1f} crs_per_s={headline.crs_per_s:.1f} "
        f"rss_mb={headline.rss_rest_mb:.1f} kb_per_cr={headline.kb_per_cr:.1f} requests_per_cr={headline.requests_per_cr:.2f} "
        f"n={headline.n} tier={headline.tier} jobs={len(headline.latencies_ms)} date={date}"
    )
    publish(lines, result, args.results or (None if args.smoke or args.no_append else RESULTS))


def idle_verdict(r: IdleRun) -> bool:
    return r.peak_ratio < PEAK_RATIO_TARGET


async def idles(workdir: Path, args: argparse.Namespace, date: str) -> None:
    runs: list[IdleRun] = []
    for tier in args.idle_tiers:
        started = time.monotonic()
        try:
            run = await (kmock_idle if tier == "kmock" else real_idle)(workdir, args)
        finally:
            keep_logs(workdir, args)
        runs.append(run)
        print(
            f"  {tier:5s} idle N={run.n}: {run.running}/{run.n} Running, {run.requests_per_s:.2f} req/s "
            f"({run.per_job_tick:.2f} per job per tick), {run.scrapes['idle'] / run.seconds('idle'):.1f} scrapes/s, "
            f"cpu {run.cpu_pct():.1f} %, rss rest {run.rss_rest_mb:.1f} MB, peak {run.rss_peak_mb:.1f} MB "
            f"(×{run.peak_ratio:.2f}) after {run.rss_after_mb:.1f} MB, load {run.load:.1f} "
            f"(setup {run.setup_s:.0f} s, {time.monotonic() - started:.0f} s)",
            file=sys.stderr,
        )

    def fails(r: IdleRun, phase: str) -> str:
        v = r.scrape_failures.get(phase)
        return "?" if v is None else f"{v:.0f}"

    lines = [
        f"### operator_scale idle — {date}",
        "",
        (
            f"{environment()}; kubetune.operator as a subprocess (as for the bursts, with its own /metrics on for the scrape "
            "failure counter); N FineTuneJobs from examples/lora.yaml, each Job given a Running pod as the Job controller and kubelet "
            "would (tests/standin_kubelet.py: podIP 127.0.0.1, the trainer container running) and its Job `active: 1`; every pod's "
            "/metrics answers a constant trainer page (kubetune.trainer.metrics.TrainerMetrics) served by the benchmark. Once every "
            "FineTuneJob is Running and one more scrape interval has passed: the operator's API requests (user agents `kopf/…`, "
            "`kubetune-operator/…`; kmock's request log or the audit log) over the window; RSS rest = median VmRSS over it (sampled "
            f"every 0.5 s). Then every pod answers a {args.big_page_mib} MiB page, first with Content-Length, then chunked without "
            f"it, {args.big_intervals} intervals each: peak = the highest VmRSS sample (or VmHWM if it rose); target peak < "
            f"{PEAK_RATIO_TARGET} × rest (✗ = missed). After = VmRSS one interval after the small page is back."
        ),
        "",
        (
            "| tier | jobs Running | interval s | window s | API req/s | req per job per tick | status PATCH/s | scrapes/s | operator CPU % "
            "| API-side CPU % | RSS rest MB | peak MB, Content-Length page | peak MB, chunked page | peak ÷ rest | RSS after MB "
            "| scrape failures Content-Length / chunked | API req/s with the huge pages |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        patches = sum(
            c for k, c in r.requests["idle"].items() if k.startswith("patch ") and k.endswith("finetunejobs/status")
        )
        big = sum(sum(r.requests[m].values()) for m in BIG_MODES) / sum(r.seconds(m) for m in BIG_MODES)
        lines.append(
            f"| {r.tier} | {r.running}/{r.n} | {r.interval_s:g} | {r.window_s:g} | {r.requests_per_s:.2f} | {r.per_job_tick:.2f} | "
            f"{patches / r.seconds('idle'):.2f} | {r.scrapes['idle'] / r.seconds('idle'):.2f} | {r.cpu_pct():.1f} | "
            f"{100 * r.api_cpu_s['idle'] / r.seconds('idle'):.1f} | {r.rss_rest_mb:.1f} | {r.peak_mb('length'):.1f} | "
            f"{r.peak_mb('chunked'):.1f} | {r.peak_ratio:.2f}{'' if idle_verdict(r) else ' ✗'} | {r.rss_after_mb:.1f} | "
            f"{fails(r, 'length')} / {fails(r, 'chunked')} | {big:.2f} |"
        )
    lines.append("")
    for r in runs:
        secs = r.seconds("idle")
        breakdown = ", ".join(f"{k} {c / secs:.2f}" for k, c in r.requests["idle"].most_common()) or "none"
        lines.append(
            f"- {r.tier} N={r.n} idle requests/s: {breakdown}; idle scrape failures {fails(r, 'idle')}, "
            f"at most {r.most_inflight.get('idle', 0)} scrapes at once; "
            f"setup (created → all Running) {r.setup_s:.0f} s; 1-minute load average {r.load:.1f}"
        )
        changed = ", ".join(f"{path} ({c} jobs)" for path, c in r.status_changes.most_common(8)) or "nothing"
        lines.append(f"  - changed during the idle window: {changed}")
        for m, label in BIG_MODES.items():
            per = ", ".join(f"{k} {c / r.seconds(m):.2f}" for k, c in r.requests[m].most_common()) or "none"
            lines.append(
                f"  - {args.big_page_mib} MiB page ({label}): {r.scrapes[m]} scrapes, at most {r.most_inflight.get(m, 0)} "
                f"at once, {r.sent[m] / 2**20:.0f} MiB sent (loopback socket buffers included); requests/s: {per}"
            )
        lines.append(
            f"  - VmHWM before the huge pages {r.hwm_before_big_mb:.1f} MB, at the end {r.hwm_end_mb:.1f} MB; "
            f"{r.running_end}/{r.n} still Running at the end"
        )
    lines.append("")
    h = max(runs, key=lambda r: (r.tier == "real", r.n))
    result = (
        f"RESULT operator_idle requests_per_s={h.requests_per_s:.2f} requests_per_job_tick={h.per_job_tick:.3f} "
        f"scrapes_per_s={h.scrapes['idle'] / h.seconds('idle'):.2f} rss_rest_mb={h.rss_rest_mb:.1f} rss_peak_mb={h.rss_peak_mb:.1f} "
        f"peak_ratio={h.peak_ratio:.2f} running={h.running} n={h.n} tier={h.tier} interval_s={h.interval_s:g} "
        f"window_s={h.window_s:g} page_mib={h.big_mib} date={date}"
    )
    publish(lines, result, args.results or (None if args.smoke or args.no_append else RESULTS))


async def main_async(args: argparse.Namespace) -> int:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        workdir = Path(tmp)
        if not args.idle:
            await bursts(workdir, args, date)
        if args.idle_tiers:
            await idles(workdir, args, date)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="burst sizes")
    p.add_argument("--tiers", nargs="+", choices=["kmock", "real"], default=["kmock", "real"])
    p.add_argument("--smoke", action="store_true", help="N = 5 on kmock only; RESULTS.md untouched unless --results")
    p.add_argument("--results", type=Path, help="append here (default: benchmarks/RESULTS.md, not in --smoke)")
    p.add_argument("--no-append", action="store_true", help="print only: append to no file (unless --results)")
    p.add_argument(
        "--profile", type=Path, help="record a py-spy profile of the operator during each burst into this folder"
    )
    p.add_argument("--keep-logs", type=Path, help="copy the operator logs (and audit logs) here")
    p.add_argument(
        "--sequential", type=int, default=10, help="FineTuneJobs created one at a time before the burst (idle latency)"
    )
    p.add_argument(
        "--executor-threads",
        type=int,
        help="investigation: give the operator's event loop a default executor of this many threads",
    )
    p.add_argument(
        "--tracemalloc", type=Path, help="investigation: trace the operator's allocations, report growth per CR (slow)"
    )
    p.add_argument(
        "--idle", action="store_true", help="only the idle measurement (no bursts), on --idle-tiers or else --tiers"
    )
    p.add_argument("--no-idle", action="store_true", help="only the bursts")
    p.add_argument(
        "--idle-tiers",
        nargs="+",
        choices=["kmock", "real"],
        help="tiers of the idle measurement (default: real if in --tiers, else --tiers; with --idle: --tiers)",
    )
    p.add_argument("--idle-jobs", type=int, default=300, help="running FineTuneJobs of the idle measurement")
    p.add_argument(
        "--idle-interval",
        type=float,
        default=30.0,
        help="KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS of the idle operator",
    )
    p.add_argument(
        "--idle-seconds", type=float, default=120.0, help="the idle window the operator's requests are counted over"
    )
    p.add_argument("--big-page-mib", type=int, default=200, help="size of the huge /metrics page")
    p.add_argument(
        "--big-intervals",
        type=int,
        default=2,
        help="scrape intervals each huge page (Content-Length, chunked) is served",
    )
    args = p.parse_args()
    if args.smoke:
        args.n, args.tiers, args.sequential = [5], ["kmock"], 3
        args.idle_tiers, args.idle_jobs, args.idle_interval, args.idle_seconds, args.big_intervals = (
            ["kmock"],
            5,
            2.0,
            6.0,
            1,
        )
    if args.no_idle:
        args.idle_tiers = []
    elif args.idle_tiers is None:
        args.idle_tiers = list(args.tiers) if args.idle else (["real"] if "real" in args.tiers else list(args.tiers))
    import logging

    logging.getLogger("kmock").setLevel(logging.ERROR)
    # SIGTERM unwinds like Ctrl-C, so the operator and apiserver processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
