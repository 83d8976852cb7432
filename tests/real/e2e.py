"""End-to-end building blocks for the real apiserver tier: the operator as a subprocess, a
stand-in Job controller/kubelet serving a namespace, and :func:`run_quickstart`.

The pieces, each usable alone:

* :class:`OperatorProcess` runs ``kubetune operator -n NS --standalone`` (the real CLI, the same
  entrypoint as the operator image) as a subprocess in its own process group, with
  ``KUBECONFIG`` pointing at the identity under test and ``KUBETUNE_*`` settings; its log goes
  to a file (:meth:`OperatorProcess.tail` for failure messages); :meth:`OperatorProcess.stop`
  (also on ``__exit__``) SIGTERMs the group, SIGKILLs it after a grace period and reaps it.
* :class:`JobRunner` is a thread that runs every Job created in a namespace once, oldest first,
  through :class:`~tests.standin_kubelet.StandinKubelet` (which runs the pod's real command as a
  local process and writes Pod/Job status as kubelet and Job controller would).
* :func:`run_quickstart` does the whole README flow: ``kubectl apply`` of
  ``examples/quickstart.yaml`` → the operator creates the validation Job, then the trainer Job →
  the stand-in runs both (the trainer trains builtin://tiny-llama on CPU and writes to moto S3)
  → ``kubectl get ftj`` shows Running with progress (scraped by the operator from the trainer's
  metrics endpoint at the pod IP 127.0.0.1) → Succeeded. It returns the final ``.status``.

Identity: ``run_quickstart(..., kubeconfig=...)`` is the kubeconfig *the operator* uses (default:
the admin's). The user's ``kubectl apply``, the Secret and the stand-in kubelet always use the
admin kubeconfig, since they play other parties. To run the operator as the Helm chart's
ServiceAccount, bind the chart's Role to ``kubetune-system/kubetune-operator`` and pass
``apiserver.service_account_kubeconfig("kubetune-system", "kubetune-operator")``.

Credentials: the quickstart names no ``output.credentialsSecret`` (in a cluster its trainer
would use ambient credentials such as IRSA). With ``credentials_secret=NAME`` (the default)
the applied manifest gets ``spec.output.credentialsSecret: NAME``, a Secret of that name holding
moto's credentials and endpoint (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``: keys the builders map with ``secretKeyRef``) is
created in the namespace, and the trainer inherits *no* ``AWS_*`` variable from the test
process: the run only works if the credentials reach the pod through ``secretKeyRef``. With
``credentials_secret=None`` the file is applied unchanged and the trainer inherits the test
process's ``AWS_*`` (moto's), like ambient credentials.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubetune.api.manifest import load_yaml as load_manifest_yaml

from tests.k8s_harness import ApiServer, free_ports, kubectl
from tests.standin_kubelet import JobRun, StandinKubelet

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
DEMO_BUCKET = "kubetune-demo"
DEFAULT_CREDENTIALS_SECRET = "kubetune-demo-s3"
MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TERMINAL = ("Succeeded", "Failed", "Cancelled")


def kubetune_binary() -> str:
    """The ``kubetune`` console script of the interpreter running the tests (the venv's)."""
    beside = Path(sys.executable).parent / "kubetune"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubetune")
    if not found:
        raise FileNotFoundError("no kubetune console script next to sys.executable nor on PATH: pip install -e .")
    return found


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


# ------------------------------------------------------------------------------ the operator


class OperatorDied(AssertionError):
    """The operator subprocess exited while a test still needed it."""


# `kubetune` is the console script `kubetune.cli:main`. That CLI configures no logging, so kopf's
# INFO records (handler started/succeeded/retried) would be lost; this runs the same entry point
# after logging.basicConfig, so the log file shows what the operator did. It also asks Linux to
# SIGTERM the operator when the test process dies (PR_SET_PDEATHSIG), so a pytest killed by a
# signal (no teardown) does not leave an operator behind.
_BOOT = """
import ctypes, logging, os, signal, sys
parent, level = int(sys.argv.pop(1)), sys.argv.pop(1)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:  # the test process died before prctl
    sys.exit(1)
logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from kubetune.cli import main
sys.argv[0] = "kubetune"
sys.exit(main())
"""


class OperatorProcess:
    """``kubetune operator -n NS... --standalone`` as a subprocess (a context manager).

    ``settings`` are ``KUBETUNE_*`` variables (e.g. ``{"KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS":
    "0.5"}``); the rest of the environment is this process's, minus ``KUBETUNE_API_URL`` (which
    would override the kubeconfig) and ``drop_env_prefixes``. urllib3's InsecureRequestWarning
    (the test apiserver's self-signed certificate; one per request) is silenced.

    ``log_level`` (default INFO): the CLI's entry point ``kubetune.cli:main`` is run with
    ``python -c`` after ``logging.basicConfig(level=log_level)``, because the CLI configures no
    logging itself, and with ``PR_SET_PDEATHSIG`` so it dies with the test process even when
    that is killed without teardown (Linux; the *thread* calling :meth:`start` counts as the
    parent, so start it from the main thread); ``log_level=None`` runs the ``kubetune`` console
    script exactly as installed.

    Liveness port: kopf's liveness endpoint listens on ``KUBETUNE_HEALTH_PORT`` (default 8080);
    unless ``settings`` names one, :meth:`start` picks a free port, so operators of concurrent
    tests (and pytest sessions) never collide.
    """

    def __init__(
        self,
        kubeconfig: Path | str,
        namespaces: Iterable[str],
        log_path: Path,
        *,
        settings: Mapping[str, str] | None = None,
        drop_env_prefixes: tuple[str, ...] = ("AWS_",),
        grace: float = 10.0,
        log_level: str | None = "INFO",
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.namespaces = list(namespaces)
        self.log_path = Path(log_path)
        self.settings = dict(settings or {})
        self.drop_env_prefixes = drop_env_prefixes
        self.grace = grace
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []

    def __enter__(self) -> OperatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("already started")
        args = ["operator", *(a for ns in self.namespaces for a in ("-n", ns)), "--standalone"]
        if self.log_level is None:
            self.argv = [kubetune_binary(), *args]
        else:
            self.argv = [sys.executable, "-c", _BOOT, str(os.getpid()), self.log_level.upper(), *args]
        drop = self.drop_env_prefixes
        env = {k: v for k, v in os.environ.items() if not (drop and k.startswith(drop))}
        env.pop("KUBETUNE_API_URL", None)
        env["KUBETUNE_HEALTH_PORT"] = str(free_ports(1)[0])
        env.update(self.settings)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), "ignore:Unverified HTTPS request"]))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 60) -> str:
        return f"--- operator log {self.log_path} (last {lines} lines) ---\n{tail(self.log_path, lines)}"

    def check(self) -> None:
        """Raise :class:`OperatorDied` (with the log's tail) if the process has exited."""
        if self.proc is None or self.proc.poll() is None:
            return
        hint = ""
        if re.search(r"address already in use|Errno 98", tail(self.log_path, 200), re.IGNORECASE):
            hint = " (a port it binds is taken: see KUBETUNE_HEALTH_PORT and KUBETUNE_OPERATOR_METRICS_PORT)"
        raise OperatorDied(f"the operator exited with status {self.proc.returncode}{hint}\n{self.tail()}")

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace`` s, reap; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self.grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # stragglers in its group
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode


# ---------------------------------------------------------------- the stand-in, as a service


class JobRunner(threading.Thread):
    """Runs every Job of ``namespace`` once, oldest first, with ``kubelet.run_job``.

    A Job with ``spec.suspend: true`` waits until it is unsuspended. ``runs`` maps Job name to
    its :class:`JobRun`; an exception while running a Job is recorded in ``errors`` and the
    thread goes on. :meth:`stop` ends the loop and kills a container that is still running.
    """

    def __init__(
        self,
        kubelet: StandinKubelet,
        namespace: str,
        *,
        cwd: Path | str | None = None,
        timeout: float = 600.0,
        poll: float = 0.2,
    ) -> None:
        super().__init__(name=f"standin-jobs-{namespace}", daemon=True)
        self.kubelet, self.namespace, self.cwd = kubelet, namespace, cwd
        self.timeout, self.poll = timeout, poll
        self.runs: dict[str, JobRun] = {}
        self.started: list[str] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                listing = json.loads(
                    self.kubelet.batch.list_namespaced_job(self.namespace, _preload_content=False).data
                )
            except Exception as exc:
                self.errors.append(f"listing Jobs: {type(exc).__name__}: {exc}")
                self._halt.wait(1.0)
                continue
            jobs = sorted(
                listing.get("items") or [],
                key=lambda j: (j["metadata"]["creationTimestamp"], j["metadata"]["name"]),
            )
            for job in jobs:
                name = job["metadata"]["name"]
                if name in self.started or job["spec"].get("suspend") is True or self._halt.is_set():
                    continue
                self.started.append(name)
                try:
                    self.runs[name] = self.kubelet.run_job(name, self.namespace, cwd=self.cwd, timeout=self.timeout)
                except Exception as exc:
                    if not self._halt.is_set():
                        self.errors.append(f"Job {name}: {type(exc).__name__}: {exc}")
            self._halt.wait(self.poll)

    def stop(self, timeout: float = 30.0) -> None:
        self._halt.set()
        self.kubelet.kill_running(shutdown=True)
        if self.is_alive():
            self.join(timeout)

    def pod_logs(self, lines: int = 40) -> str:
        parts = []
        for pod, path in self.kubelet.logs.items():
            parts.append(f"--- pod {pod} log {path} (last {lines} lines) ---\n{tail(path, lines)}")
        return "\n".join(parts) or "(no pod ran)"


# ------------------------------------------------------------------------------ kubectl bits


def get_json(kubeconfig: Path | str, *args: str) -> dict[str, Any]:
    return json.loads(kubectl(kubeconfig, "get", "-o", "json", *args).stdout)


def parse_table(text: str) -> list[dict[str, str]]:
    """kubectl's table output → one dict per row, cut at the header's column offsets."""
    header, *rows = text.rstrip("\n").split("\n")
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    return [dict(zip(names, (row[a:b].strip() for a, b in zip(starts, starts[1:] + [None])))) for row in rows]


def diagnostics(kubeconfig: Path | str, namespace: str, *parts: str) -> str:
    """What a failed end-to-end test should show: objects, events, and the given log tails."""
    out = []
    for what in ("finetunejobs", "jobs", "pods"):
        got = kubectl(kubeconfig, "get", what, "-n", namespace, "-o", "json", check=False)
        if what == "finetunejobs" and got.returncode == 0:
            items = [
                {"name": i["metadata"]["name"], "status": i.get("status")} for i in json.loads(got.stdout)["items"]
            ]
            out.append(f"--- {what} ---\n{json.dumps(items, indent=1)[-6000:]}")
        elif got.returncode == 0:
            names = [
                (
                    i["metadata"]["name"],
                    (i.get("status") or {}).get("phase") or (i.get("status") or {}).get("conditions"),
                )
                for i in json.loads(got.stdout)["items"]
            ]
            out.append(f"--- {what} --- {names}")
    events = kubectl(kubeconfig, "get", "events", "-n", namespace, check=False)
    out.append(f"--- events ---\n{events.stdout[-3000:]}")
    out.extend(parts)
    return "\n".join(out)


def verify_output(uri: str, s3_endpoint: str) -> subprocess.CompletedProcess[str]:
    """``kubetune verify URI`` (the real CLI) with moto's credentials and endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(MOTO_CREDENTIALS, AWS_ENDPOINT_URL=s3_endpoint)
    return subprocess.run([kubetune_binary(), "verify", uri], env=env, capture_output=True, text=True, timeout=120)


def s3_client(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=MOTO_CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def prepare_output(s3_endpoint: str, uri: str) -> None:
    """Create the output's bucket if missing and empty its prefix, so a run starts at step 0
    (the trainer resumes from checkpoints it finds there)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3_client(s3_endpoint)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=bucket)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


def apply_secret(kubeconfig: Path | str, namespace: str, name: str, data: Mapping[str, str]) -> None:
    doc = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "stringData": dict(data)}
    kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", input=json.dumps(doc))


def _set(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[leaf] = value


# ------------------------------------------------------------------------------- quickstart


@dataclass
class QuickstartTrace:
    """What :func:`run_quickstart` saw on the way (pass one in to inspect it afterwards)."""

    manifest: Path | None = None
    """The file given to ``kubectl apply -f`` (examples/quickstart.yaml itself when unmodified)."""
    operator_log: Path | None = None
    phases: list[str] = field(default_factory=list)
    """Every distinct phase seen by polling ``kubectl get ftj -o json``, in order."""
    running_status: dict[str, Any] | None = None
    """The first status seen while Running with 0 < progress.percent < 100."""
    table: list[dict[str, str]] = field(default_factory=list)
    """``kubectl get ftj`` rows (printer columns) captured at that moment."""
    jobs: dict[str, JobRun] = field(default_factory=dict)
    """Jobs the stand-in ran, by name."""
    seconds_to_running: float | None = None
    seconds_to_terminal: float | None = None
    operator_exit: int | None = None


def quickstart_manifest(
    credentials_secret: str | None = DEFAULT_CREDENTIALS_SECRET,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """examples/quickstart.yaml as a dict, with ``spec.output.credentialsSecret`` and any dotted
    ``overrides`` (e.g. ``{"spec.hyperparameters.epochs": 1}``) applied."""
    doc = copy.deepcopy(load_manifest_yaml(QUICKSTART.read_text()))
    if credentials_secret:
        _set(doc, "spec.output.credentialsSecret", credentials_secret)
    for dotted, value in (overrides or {}).items():
        _set(doc, dotted, value)
    return doc


def run_quickstart(
    apiserver: ApiServer,
    namespace: str,
    kubeconfig: Path | str | None = None,
    s3: str | None = None,
    *,
    credentials_secret: str | None = DEFAULT_CREDENTIALS_SECRET,
    overrides: Mapping[str, Any] | None = None,
    operator_settings: Mapping[str, str] | None = None,
    operator_log_level: str | None = "INFO",
    scrape_interval: float = 0.5,
    poll_interval: float = 1.0,
    require_progress: bool = True,
    timeout: float = 300.0,
    work_dir: Path | str | None = None,
    trace: QuickstartTrace | None = None,
    on_running: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the quickstart end to end in ``namespace`` and return the FineTuneJob's final
    ``.status`` (phase Succeeded), or raise AssertionError with objects, events and the logs of
    the operator and every pod.

    ``kubeconfig``: the operator's identity (default: admin). ``s3``: moto's endpoint (the
    ``s3_server`` fixture; default ``$AWS_ENDPOINT_URL``). The output prefix of the manifest
    (``s3://kubetune-demo/quickstart``) is emptied first, its bucket created if missing.
    ``overrides``: dotted spec changes, e.g. fewer steps (see :func:`quickstart_manifest`).
    ``operator_settings``: extra ``KUBETUNE_*`` variables for the operator; set here: the scrape
    interval, and free ports for the trainer's metrics (``KUBETUNE_METRICS_PORT``) and the
    operator's own (``KUBETUNE_OPERATOR_METRICS_PORT``), so runs never collide on fixed ports.
    ``operator_log_level``: see :class:`OperatorProcess` (``"DEBUG"`` logs every patch body).
    ``.status`` is polled with ``kubectl get ftj -o json`` every ``poll_interval`` seconds. With
    ``require_progress`` the run must show, while Running, a progress between 0 and 100 % both
    in ``.status.progress.percent`` and in the PROGRESS column of ``kubectl get ftj``.
    ``on_running(status)`` is called once at that moment (e.g. to check RBAC mid-run).
    The operator, the stand-in and any container are stopped before this returns or raises.
    """
    s3 = s3 or os.environ.get("AWS_ENDPOINT_URL")
    if not s3:
        raise ValueError("need moto's endpoint: pass s3= (the s3_server fixture) or set AWS_ENDPOINT_URL")
    admin = apiserver.kubeconfig
    operator_kubeconfig = Path(kubeconfig) if kubeconfig else admin
    trace = trace if trace is not None else QuickstartTrace()
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="kubetune-e2e-"))
    work.mkdir(parents=True, exist_ok=True)

    doc = quickstart_manifest(credentials_secret, overrides)
    name = doc["metadata"]["name"]
    if credentials_secret is None and not overrides:
        trace.manifest = QUICKSTART  # the file, byte for byte
    else:
        trace.manifest = work / "quickstart.yaml"
        trace.manifest.write_text(
            f"# {QUICKSTART.name}, changed by tests/real/e2e.py\n" + yaml.safe_dump(doc, sort_keys=False)
        )
    output_uri = doc["spec"]["output"]["uri"]
    prepare_output(s3, output_uri)
    if credentials_secret:
        apply_secret(admin, namespace, credentials_secret, {**MOTO_CREDENTIALS, "AWS_ENDPOINT_URL": s3})

    trainer_port, operator_port = free_ports(2, "0.0.0.0")  # the trainer serves metrics on every interface
    settings = {
        "KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS": str(scrape_interval),
        "KUBETUNE_METRICS_PORT": str(trainer_port),  # the trainer's, rendered into the pod's env
        "KUBETUNE_OPERATOR_METRICS_PORT": str(operator_port),  # the operator's own (default 8000)
        **(operator_settings or {}),
    }
    trace.operator_log = work / "operator.log"
    operator = OperatorProcess(
        operator_kubeconfig, [namespace], trace.operator_log, settings=settings, log_level=operator_log_level
    )
    kubelet = StandinKubelet(
        admin,
        log_dir=work / "pods",
        drop_env_prefixes=("AWS_",) if credentials_secret else (),
    )
    runner = JobRunner(kubelet, namespace, cwd=REPO, timeout=timeout)

    def fail(message: str) -> AssertionError:
        return AssertionError(
            f"{message}\n" + diagnostics(admin, namespace, *runner.errors, operator.tail(), runner.pod_logs())
        )

    try:
        operator.start()
        runner.start()
        kubectl(admin, "apply", "-n", namespace, "-f", str(trace.manifest))
        t0 = time.monotonic()
        deadline = t0 + timeout
        status: dict[str, Any] = {}
        while True:
            operator.check()
            if runner.errors:
                raise fail("the stand-in kubelet failed")
            status = get_json(admin, "ftj", name, "-n", namespace).get("status") or {}
            phase = status.get("phase")
            if phase and (not trace.phases or trace.phases[-1] != phase):
                trace.phases.append(phase)
            if phase == "Running" and trace.seconds_to_running is None:
                trace.seconds_to_running = time.monotonic() - t0
            percent = (status.get("progress") or {}).get("percent")
            if phase == "Running" and trace.running_status is None and percent is not None and 0 < percent < 100:
                trace.running_status = status
                trace.table = parse_table(kubectl(admin, "get", "ftj", "-n", namespace).stdout)
                if on_running is not None:
                    on_running(status)
            if phase in TERMINAL:
                trace.seconds_to_terminal = time.monotonic() - t0
                break
            if time.monotonic() > deadline:
                raise fail(f"FineTuneJob {name} not finished after {timeout:g} s (phases seen: {trace.phases})")
            time.sleep(poll_interval)
        if status.get("phase") != "Succeeded":
            raise fail(f"FineTuneJob {name} ended {status.get('phase')}, not Succeeded")
        if require_progress:
            if trace.running_status is None:
                raise fail(f"never saw {name} Running with 0 < progress.percent < 100 (phases: {trace.phases})")
            row = next((r for r in trace.table if r.get("NAME") == name), None)
            if (
                row is None
                or not re.fullmatch(r"\d+(\.\d+)?", row.get("PROGRESS", ""))
                or not 0 < float(row["PROGRESS"]) < 100
            ):
                raise fail(f"kubectl get ftj showed no progress while Running: {trace.table}")
        return status
    finally:
        # Each step on its own, so that a failing one cannot leave the operator or a trainer running.
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(kubelet.close)
            cleanup.callback(lambda: setattr(trace, "operator_exit", operator.stop()))
            cleanup.callback(lambda: setattr(trace, "jobs", dict(runner.runs)))
            cleanup.callback(runner.stop)
