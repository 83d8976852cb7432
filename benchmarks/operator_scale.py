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

    python benchmarks/operator_scale.py                    # kmock + real, N = 100 and 1000
    python benchmarks/operator_scale.py --smoke            # N = 5 on kmock; RESULTS.md untouched
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

import yaml
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
        return v[min(len(v) - 1, max(0, int(round(q * len(v) + 0.5)) - 1))]

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

    def __init__(self, kubeconfig: Path, log: Path, api_url: str | None, tracemalloc_dir: Path | None = None,
                 executor_threads: int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "AWS_"))}
        env.update(KUBECONFIG=str(kubeconfig), KUBETUNE_OPERATOR_METRICS_PORT="0", PYTHONUNBUFFERED="1")
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
                "signal.signal(signal.SIGUSR1, _dump)\n"
                + code
            )
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.profiler: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited ({self.proc.returncode}):\n" + self.log.read_text()[-3000:])

    def start_profile(self, path: Path) -> None:
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        self.profiler = subprocess.Popen([spy, "record", "--pid", str(self.proc.pid), "--rate", "200", "--format", "raw",
                                          "--output", str(path), "--nonblocking"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

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
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": cluster}],
        "users": [{"name": "bench", "user": user}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench", "namespace": NAMESPACE}}],
    }))
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
        import aiohttp

        params = {"watch": "true", "resourceVersion": rv}
        async with self.http.get(self.path, params=params, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
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
                raise TimeoutError(f"{len(missing)} of {len(names)} not seen on {self.path} after {timeout:g} s, e.g. {missing[:3]}")
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


async def measure(tier: str, n: int, http: Any, kubeconfig: Path, api_url: str | None, workdir: Path,
                  profile_dir: Path | None, on_burst: Any = lambda: None, api_pids: list[int] | None = None,
                  options: argparse.Namespace | None = None) -> tuple[Run, float, float]:
    """One operator process, a warm-up CR, then the burst; returns the run and its wall window."""
    run = Run(tier, n)
    jobs = Watcher(http, job_collection(), _job_owner)
    ftjs = Watcher(http, ftj_collection(), _ftj_with_job)
    await jobs.start()
    await ftjs.start()
    trace = options.tracemalloc if options is not None else None
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
    op = Operator(kubeconfig, workdir / f"operator-{tier}-{n}.log", api_url, trace,
                  options.executor_threads if options is not None else None)
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
            run, _, _ = await measure("kmock", n, http, kubeconfig, kube.base_url, workdir, args.profile,
                                      on_burst=lambda: start.__setitem__(0, len(kube.requests)), options=args)
            # The request log: everything the operator sent from the start of the burst.
            records = list(kube.requests)
        for r in records[start[0]:]:
            if r.user_agent.startswith(OPERATOR_AGENTS):
                run.requests[" ".join(verb_resource(r))] += 1
    return run


async def real_tier(n: int, workdir: Path, args: argparse.Namespace) -> Run:
    import aiohttp

    from tests.k8s_harness import ApiServer, install_crd

    audit = workdir / f"audit-{n}.log"
    policy = workdir / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    flags = [f"--audit-policy-file={policy}", f"--audit-log-path={audit}", "--audit-log-format=json", "--audit-log-maxsize=0"]
    with ApiServer(extra_apiserver_args=flags) as api:
        install_crd(api.kubeconfig, "\n---\n".join(p.read_text() for p in sorted((ROOT / "crds").glob("*.yaml"))))
        headers = {"User-Agent": USER_AGENT, "Authorization": f"Bearer {api.token}"}
        connector = aiohttp.TCPConnector(ssl=False, limit=CONCURRENCY + 8)
        async with aiohttp.ClientSession(base_url=api.url, headers=headers, connector=connector) as http:
            async with http.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}) as resp:
                assert resp.status == 201, await resp.text()
            assert api.tmpdir is not None
            kubeconfig = kubeconfig_for(workdir / "kubeconfig-real", api.url, api.token, api.tmpdir / "certs" / "apiserver.crt")
            run, wall_start, wall_end = await measure("real", n, http, kubeconfig, None, workdir, args.profile,
                                                      api_pids=api.pids(), options=args)
        await asyncio.sleep(0.5)  # the audit backend writes asynchronously
        created: dict[str, float] = {}
        job_created: dict[str, float] = {}
        for line in audit.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("stage") not in ("ResponseComplete", "ResponseStarted"):
                continue
            ts = _ts(ev["stageTimestamp"])
            agent = ev.get("userAgent") or ""
            ref = ev.get("objectRef") or {}
            if agent.startswith(USER_AGENT) and ev["verb"] == "create" and ref.get("resource") == PLURAL and ev["responseStatus"]["code"] == 201:
                created[ref.get("name") or ""] = ts
            if agent.startswith(OPERATOR_AGENTS):
                if ev["verb"] == "create" and ref.get("resource") == "jobs" and ev["responseStatus"]["code"] == 201:
                    job_created[(ref.get("name") or "").removesuffix("-train")] = ts
                if wall_start <= ts <= wall_end and ev["stage"] == ("ResponseStarted" if ev["verb"] == "watch" else "ResponseComplete"):
                    resource = "/".join(x for x in (ref.get("apiGroup"), ref.get("apiVersion"), ref.get("resource"), ref.get("subresource")) if x)
                    run.requests[f"{ev['verb']} {resource}"] += 1
        names = [f"bench-{i:05d}" for i in range(n)]
        if all(x in created and x in job_created for x in names):
            run.server_latencies_ms = [1000 * (job_created[x] - created[x]) for x in names]
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
_WAITING = ("SSLSocket.read (ssl.py", "do_poll", "Condition.wait", "EpollSelector.select", "SocketIO.readinto",
            "_worker (concurrent/futures/thread.py:81)", "Event.wait", "Lock.acquire")
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


async def main_async(args: argparse.Namespace) -> int:
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        workdir = Path(tmp)
        for tier in args.tiers:
            for n in args.n:
                started = time.monotonic()
                try:
                    run = await (kmock_tier if tier == "kmock" else real_tier)(n, workdir, args)
                finally:
                    if args.keep_logs:
                        args.keep_logs.mkdir(parents=True, exist_ok=True)
                        for f in [*workdir.glob("operator-*.log"), *workdir.glob("audit-*.log")]:
                            shutil.copy(f, args.keep_logs / f.name)
                runs.append(run)
                v = verdicts(run)
                print(f"  {tier:5s} N={n:5d}: p50 {run.pct(0.5):7.1f} ms p99 {run.pct(0.99):7.1f} ms {run.crs_per_s:6.1f} CRs/s "
                      f"rss {run.rss_rest_mb:.0f} MB +{run.kb_per_cr:.1f} KB/CR {run.requests_per_cr:.1f} req/CR "
                      f"cpu {run.cpu_ms_per_cr:.1f} ms/CR (api {run.api_cpu_ms_per_cr:.1f}) load {run.load:.1f} "
                      f"({time.monotonic() - started:.0f} s) {'' if all(v.values()) else 'missed: ' + ','.join(k for k, ok in v.items() if not ok)}",
                      file=sys.stderr)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")

    def mark(ok: bool) -> str:
        return "" if ok else " ✗"

    lines = [
        f"### operator_scale — {date}",
        "",
        f"{environment()}; kubetune.operator as a subprocess (`run(namespaces=[{NAMESPACE}], peering=False)`), one namespace; "
        f"N FineTuneJobs from examples/lora.yaml (prevalidate false) created with {CONCURRENCY} requests in flight after a warm-up CR; "
        "latency = CR create returned → Job ADDED received on a watch (client monotonic clock); idle = the same for CRs created one "
        "at a time before the burst (no queue); server = the burst latency from the "
        "apiserver audit log's stageTimestamps. ✗ = target missed (p50 ≤ 100 ms, p99 ≤ 1 s, ≥ 50 CRs/s, RSS ≤ 150 MB + 20 KB/CR).",
        "",
        "| tier | N | idle p50 ms | p50 ms | p99 ms | server p50 / p99 ms | →status p50 ms | cold ms | CRs/s | burst create s | RSS rest MB | KB/CR | peak RSS MB | API req/CR | operator CPU ms/CR | API-side CPU ms/CR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        v = verdicts(r)
        server = f"{r.pct(0.5, r.server_latencies_ms):.0f} / {r.pct(0.99, r.server_latencies_ms):.0f}" if r.server_latencies_ms else "—"
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
            lines.append("  - py-spy, the operator's busy samples: " + "; ".join(f"{name} {pct:.0f} %" for name, pct in shares))
        if r.memory_growth:
            lines.append("  - tracemalloc, live memory added by the burst: " + "; ".join(r.memory_growth))
    lines.append("")
    headline = max((r for r in runs), key=lambda r: (r.tier == "real", r.n))
    result = (
        f"RESULT operator_scale p50_ms={headline.pct(0.5):.1f} p99_ms={headline.pct(0.99):.1f} crs_per_s={headline.crs_per_s:.1f} "
        f"rss_mb={headline.rss_rest_mb:.1f} kb_per_cr={headline.kb_per_cr:.1f} requests_per_cr={headline.requests_per_cr:.2f} "
        f"n={headline.n} tier={headline.tier} jobs={len(headline.latencies_ms)} date={date}"
    )
    publish(lines, result, args.results or (None if args.smoke else RESULTS))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="burst sizes")
    p.add_argument("--tiers", nargs="+", choices=["kmock", "real"], default=["kmock", "real"])
    p.add_argument("--smoke", action="store_true", help="N = 5 on kmock only; RESULTS.md untouched unless --results")
    p.add_argument("--results", type=Path, help="append here (default: benchmarks/RESULTS.md, not in --smoke)")
    p.add_argument("--profile", type=Path, help="record a py-spy profile of the operator during each burst into this folder")
    p.add_argument("--keep-logs", type=Path, help="copy the operator logs (and audit logs) here")
    p.add_argument("--sequential", type=int, default=10, help="FineTuneJobs created one at a time before the burst (idle latency)")
    p.add_argument("--executor-threads", type=int, help="investigation: give the operator's event loop a default executor of this many threads")
    p.add_argument("--tracemalloc", type=Path, help="investigation: trace the operator's allocations, report growth per CR (slow)")
    args = p.parse_args()
    if args.smoke:
        args.n, args.tiers, args.sequential = [5], ["kmock"], 3
    import logging

    logging.getLogger("kmock").setLevel(logging.ERROR)
    # SIGTERM unwinds like Ctrl-C, so the operator and apiserver processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
