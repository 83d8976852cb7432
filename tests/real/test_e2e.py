"""End to end on the real apiserver tier (GitHub issue 6): kubectl → operator → Job → trainer → S3.

Every party is real except the Job controller and the kubelet: the machine's ``kubectl``,
kube-apiserver v1.20.2 + etcd, the operator as a subprocess started by its own CLI
(``kubetune operator -n NS --standalone``), the trainer's real command (``python -m
kubetune.trainer --spec /etc/kubetune/spec.json``) run by the stand-in kubelet as a local process
(tests/standin_kubelet.py: it projects the spec annotation into a local file, as the downwardAPI
volume does, and writes Pod/Job status), and moto's S3 server. See tests/real/e2e.py for the
pieces, which other tests reuse (e.g. to run the same flow as the Helm chart's ServiceAccount).

Why a stand-in here, now that tests/cluster runs the same flow in real pods: the stand-in writes
the Job conditions of a *current* Job controller (``SuccessCriteriaMet`` then ``Complete``,
``FailureTarget`` then ``Failed``, Kubernetes ≥ 1.31), which the 1.20 controller of the cluster
tier never writes; the operator must read both. It is also ten times faster (no images, no
containers), which the latency measurement below needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubetune.api import GROUP, PLURAL, VERSION

from tests.k8s_harness import ApiServer, kubectl
from tests.real.e2e import (
    DEFAULT_CREDENTIALS_SECRET,
    OperatorProcess,
    QuickstartTrace,
    diagnostics,
    free_ports,
    get_json,
    quickstart_manifest,
    run_quickstart,
    s3_client,
    verify_output,
)


def _owned(obj: dict[str, Any], uid: str) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == uid and r.get("controller") and r.get("blockOwnerDeletion") for r in refs)


def test_quickstart_end_to_end(apiserver: ApiServer, namespace: str, s3_server: str, tmp_path: Path) -> None:
    """``kubectl apply`` of examples/quickstart.yaml ends Succeeded with a verified adapter.

    The applied file is a patched copy of the quickstart, same shape, two changes:
    ``spec.output.credentialsSecret: kubetune-demo-s3`` (the example relies on ambient
    credentials; here the trainer inherits no ``AWS_*`` variable from the test, so moto's
    credentials and endpoint reach it only through the ``secretKeyRef`` entries the operator
    renders) and ``hyperparameters.epochs: 1`` instead of 2 (38 steps instead of 76: about 5 s
    of CPU training instead of 10, for CI time). Model, data, method, LoRA settings, batch size,
    checkpointing (every 20 steps) and output URI are the example's. The operator scrapes the
    trainer's /metrics every 0.5 s at the pod IP the stand-in reports (127.0.0.1), on a free
    port given to both through ``KUBETUNE_METRICS_PORT``.
    """
    trace = QuickstartTrace()
    status = run_quickstart(
        apiserver, namespace, s3=s3_server, work_dir=tmp_path, trace=trace, overrides={"spec.hyperparameters.epochs": 1}
    )
    admin = apiserver.kubeconfig
    ftj = get_json(admin, "ftj", "quickstart", "-n", namespace)
    uid = ftj["metadata"]["uid"]
    where = lambda: diagnostics(admin, namespace, f"trace: {trace}")

    # The path the README promises: data validated first, then training, then done.
    # (Pending may show between the two: the trainer Job exists, the stand-in has not started it.)
    assert [p for p in trace.phases if p != "Pending"] == ["Validating", "Running", "Succeeded"], where()
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["DataValidated"]["status"] == "True", conditions
    assert conditions["Succeeded"]["status"] == "True" and conditions["Succeeded"]["reason"] == "TrainingSucceeded", (
        conditions
    )
    assert status["observedGeneration"] == ftj["metadata"]["generation"]

    # Exactly the two Jobs, both the operator's, both run to completion by the stand-in.
    jobs = {j["metadata"]["name"]: j for j in get_json(admin, "jobs", "-n", namespace)["items"]}
    assert set(jobs) == {"quickstart-validate", "quickstart-train"}, where()
    assert all(_owned(j, uid) for j in jobs.values()), [j["metadata"].get("ownerReferences") for j in jobs.values()]
    assert {n: r.succeeded for n, r in trace.jobs.items()} == {"quickstart-validate": True, "quickstart-train": True}
    assert [len(r.pods) for r in trace.jobs.values()] == [1, 1]
    assert status["jobName"] == "quickstart-train"

    # Credentials reached the pod only as secretKeyRef (the trainer had no other source).
    env = jobs["quickstart-train"]["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(refs)
    assert {r["name"] for r in refs.values()} == {DEFAULT_CREDENTIALS_SECRET}
    assert s3_server not in json.dumps(jobs)

    # Running with progress, in the JSON and in the printed table.
    running = trace.running_status
    assert running is not None and 0 < running["progress"]["percent"] < 100
    assert 0 < running["progress"]["step"] < running["progress"]["totalSteps"]
    (row,) = [r for r in trace.table if r["NAME"] == "quickstart"]
    assert row["PHASE"] == "Running" and 0 < float(row["PROGRESS"]) < 100, trace.table
    assert row["METHOD"] == "lora" and row["MODEL"] == "builtin://tiny-llama"

    # Done: 100 %, base and tuned eval loss, and the tuned model is better on held-out data.
    assert status["progress"]["percent"] == 100 and status["progress"]["step"] == running["progress"]["totalSteps"]
    metrics = status["metrics"]
    base, tuned = metrics["baseEvalLoss"], metrics["evalLoss"]
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in (base, tuned)), metrics
    assert tuned < base, metrics

    # The adapter: under the output URI, committed by a manifest that verifies.
    adapter = status["adapter"]
    output = "s3://kubetune-demo/quickstart"
    assert adapter["uri"] == f"{output}/adapter" and adapter["manifestUri"] == f"{output}/manifest.json", adapter
    verified = verify_output(output, s3_server)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    manifest = s3_client(s3_server).get_object(Bucket="kubetune-demo", Key="quickstart/manifest.json")["Body"].read()
    assert hashlib.sha256(manifest).hexdigest() == adapter["sha256"]
    files = json.loads(manifest)["files"]
    assert "adapter/adapter_model.safetensors" in files
    assert adapter["bytes"] == sum(f["bytes"] for k, f in files.items() if k.startswith("adapter/"))

    # The operator went away cleanly (SIGTERM), and nothing of it is left.
    assert trace.operator_exit is not None


def wait_for_status(
    admin: Any, namespace: str, name: str, operator: OperatorProcess, done: Any, timeout: float = 60
) -> dict[str, Any]:
    """Poll the FineTuneJob's status until `done(status)`; a dead operator or the timeout fails
    with the cluster's diagnostics."""
    deadline = time.monotonic() + timeout
    while True:
        operator.check()
        status = get_json(admin, "ftj", name, "-n", namespace).get("status") or {}
        if done(status):
            return status
        assert time.monotonic() < deadline, diagnostics(admin, namespace, operator.tail())
        time.sleep(0.5)


def test_invalid_spec_fails_without_a_job(apiserver: ApiServer, namespace: str, tmp_path: Path) -> None:
    """A manifest the 1.20 apiserver stores but kubetune's models refuse ends Failed/InvalidSpec,
    and no Job is ever created.

    ``batchSize: 0`` (out of range) and both ``dataset.validation`` and ``validationSplit`` (a
    cross-field rule): both are CEL rules in the CRD, so a server without CEL (1.20, or a newer one
    with the rules stripped) stores them, and kubectl needs ``--validate=false``. (On a current
    server the CEL rules refuse both at apply time: tests/cluster/test_cel.py.)
    """
    admin = apiserver.kubeconfig
    doc = quickstart_manifest(
        None, {"metadata.name": "invalid", "spec.dataset.validationSplit": 0.1, "spec.hyperparameters.batchSize": 0}
    )
    manifest = tmp_path / "invalid.yaml"
    manifest.write_text(json.dumps(doc))
    kubectl(admin, "apply", "--validate=false", "-n", namespace, "-f", str(manifest))
    stored = get_json(admin, "ftj", "invalid", "-n", namespace)["spec"]
    assert (stored["dataset"]["validationSplit"], stored["hyperparameters"]["batchSize"]) == (
        0.1,
        0,
    )  # the server kept both

    ports = free_ports(2)
    settings = {
        "KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS": "0.5",
        "KUBETUNE_METRICS_PORT": str(ports[0]),
        "KUBETUNE_OPERATOR_METRICS_PORT": str(ports[1]),
    }
    with OperatorProcess(admin, [namespace], tmp_path / "operator.log", settings=settings) as operator:
        wait_for_status(admin, namespace, "invalid", operator, lambda status: status.get("phase") == "Failed")
        time.sleep(2)  # the timer keeps running: give it the chance to do something wrong
        operator.check()
        final = get_json(admin, "ftj", "invalid", "-n", namespace)["status"]
        jobs = get_json(admin, "jobs", "-n", namespace)["items"]
        events = get_json(admin, "events", "-n", namespace)["items"]

    assert jobs == [], [j["metadata"]["name"] for j in jobs]
    (failed,) = [c for c in final["conditions"] if c["type"] == "Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec"), final
    assert "spec.dataset" in failed["message"] and "batchSize" in failed["message"], failed["message"]
    assert final["phase"] == "Failed" and final["observedGeneration"] == 1 and "jobName" not in final
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in events), events


LATENCY_CRS = 100


class JobWatch:
    """A client-side watch on the Jobs of a namespace, recording when each ADDED event arrives
    (``time.monotonic()``). One raw streaming request; :meth:`close` ends it at once."""

    def __init__(self, batch: Any, namespace: str) -> None:
        rv = batch.list_namespaced_job(namespace).metadata.resource_version
        self.resp = batch.list_namespaced_job(
            namespace,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=False,
            timeout_seconds=300,
            _preload_content=False,
        )
        self.added: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self._closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buf = b""
        try:
            for chunk in self.resp.stream(amt=None, decode_content=False):
                now = time.monotonic()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in filter(None, lines):
                    event = json.loads(line)
                    if event["type"] == "ADDED":
                        self.added.setdefault(event["object"]["metadata"]["name"], []).append(now)
                    elif event["type"] == "ERROR":
                        self.errors.append(str(event["object"]))
        except Exception as exc:
            if not self._closed.is_set():
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._closed.set()
        self.resp.shutdown()
        self.resp.release_conn()
        self.thread.join(10)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


@pytest.mark.slow
def test_job_creation_latency(
    apiserver: ApiServer, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Time from a FineTuneJob's create request returning to its trainer Job arriving on a
    client-side watch (creationTimestamp has 1 s resolution, hence client-side clocks), with
    prevalidate off so the trainer Job is the first child. Two rounds of 100 CRs each against
    one operator: ``paced`` (one every 100 ms: the latency of a CR alone) and ``burst`` (100
    created back to back: queueing in the operator). Prints p50/p99 of each; asserts only sanity
    (every Job created, exactly one per CR, owned by it; p99 finite), not timing. A latency can
    come out a few ms negative: the watch thread may see the Job before the creating thread gets
    the CPU back to take its timestamp (one process, two threads, two cores, loaded)."""
    admin = apiserver.kubeconfig
    api = kubernetes.config.new_client_from_config(config_file=str(admin))
    custom, batch = kubernetes.client.CustomObjectsApi(api), kubernetes.client.BatchV1Api(api)
    base = quickstart_manifest(None, {"spec.dataset.prevalidate": False})

    def create(name: str) -> float:
        body = json.loads(json.dumps(base))
        body["metadata"] = {"name": name}
        resp = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, _preload_content=False)
        returned = time.monotonic()  # before reading the body: the least client-side work in between
        resp.read()  # drain it: a pooled connection with an unread body breaks the next request
        resp.release_conn()
        return returned

    watch = JobWatch(batch, namespace)
    ports = free_ports(2)
    # A long scrape interval: the observe timer of 200 objects would only add noise here.
    settings = {
        "KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS": "600",
        "KUBETUNE_METRICS_PORT": str(ports[0]),
        "KUBETUNE_OPERATOR_METRICS_PORT": str(ports[1]),
    }
    rounds = {mode: [f"{mode}-{i:03d}" for i in range(LATENCY_CRS)] for mode in ("paced", "burst")}
    created: dict[str, float] = {}
    lines = []
    try:
        with OperatorProcess(admin, [namespace], tmp_path / "operator.log", settings=settings) as operator:

            def wait_for(jobs: list[str], timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while not all(j in watch.added for j in jobs):
                    operator.check()
                    missing = [j for j in jobs if j not in watch.added]
                    assert not watch.errors and time.monotonic() < deadline, (
                        f"no Job for {missing[:5]}... watch errors {watch.errors}\n{operator.tail()}"
                    )
                    time.sleep(0.05)

            # Warm-up (not measured): the operator is up and watching once this Job appears.
            t0 = time.monotonic()
            create("warmup")
            wait_for(["warmup-train"], 60)
            lines.append(f"operator start to first Job {time.monotonic() - t0:.1f} s")
            for mode, names in rounds.items():
                t0 = time.monotonic()
                for name in names:
                    created[name] = create(name)
                    if mode == "paced":
                        time.sleep(max(0.0, 0.1 - (time.monotonic() - created[name])))
                submit = time.monotonic() - t0
                wait_for([f"{n}-train" for n in names], 45)
                latencies = sorted(watch.added[f"{n}-train"][0] - created[n] for n in names)
                p50, p99 = statistics.median(latencies), _percentile(latencies, 0.99)
                assert math.isfinite(p99)
                lines.append(
                    f"{mode}: {LATENCY_CRS} CRs in {submit:.1f} s, min {latencies[0] * 1000:.0f} ms, "
                    f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
                )
            time.sleep(1)  # let a duplicate, if any, show up
            operator.check()
    finally:
        watch.close()
        api.close()

    with capsys.disabled():
        print("\n[latency] FineTuneJob create -> trainer Job on a watch: " + "; ".join(lines))

    assert watch.errors == []
    every = ["warmup", *rounds["paced"], *rounds["burst"]]
    assert {n: len(t) for n, t in watch.added.items()} == {f"{n}-train": 1 for n in every}
    jobs = get_json(admin, "jobs", "-n", namespace)["items"]
    ftjs = {f["metadata"]["name"]: f["metadata"]["uid"] for f in get_json(admin, "ftj", "-n", namespace)["items"]}
    owners = sorted((j["metadata"]["name"], j["metadata"]["ownerReferences"][0]["uid"]) for j in jobs)
    assert owners == sorted((f"{n}-train", uid) for n, uid in ftjs.items())
    assert len(jobs) == len(every)


def test_a_finetunejob_with_huge_annotations_still_gets_its_status(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    """Issue 14: ~250 KB of the user's own annotations (the limit is 256 KiB in all) left no room
    for kopf's bookkeeping annotations, so every patch was refused and the job never got a status.
    kopf's bookkeeping now lives in status.kopf; the object's annotations stay the user's."""
    admin = apiserver.kubeconfig
    doc = quickstart_manifest(None, {"metadata.name": "annotated", "spec.dataset.prevalidate": False})
    doc["metadata"]["annotations"] = {"example.com/notes": "x" * 250_000}
    manifest = tmp_path / "annotated.json"
    manifest.write_text(json.dumps(doc))
    kubectl(admin, "create", "-n", namespace, "-f", str(manifest))  # create: apply would add 250 KB more
    ports = free_ports(2)
    settings = {
        "KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS": "0.5",
        "KUBETUNE_METRICS_PORT": str(ports[0]),
        "KUBETUNE_OPERATOR_METRICS_PORT": str(ports[1]),
    }
    with OperatorProcess(admin, [namespace], tmp_path / "operator.log", settings=settings) as operator:
        status = wait_for_status(admin, namespace, "annotated", operator, lambda status: bool(status.get("jobName")))
        obj = get_json(admin, "ftj", "annotated", "-n", namespace)
    assert status["phase"] == "Pending" and status["reason"] == "JobPending", status
    assert "last-handled-configuration" in status["kopf"]  # kopf's bookkeeping, in status
    assert "xxxx" not in status["kopf"]["last-handled-configuration"]  # without the annotations
    assert set(obj["metadata"]["annotations"]) == {"example.com/notes"}, list(obj["metadata"]["annotations"])
