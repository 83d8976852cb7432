"""A stand-in for the Job controller and the kubelet, for the real apiserver tier.

The real tier runs kube-apiserver + etcd only: no kube-controller-manager (a Job creates no Pod),
no scheduler and no kubelet (a Pod never runs). Like Kubeflow's and Kueue's integration tests,
a test plays those parts itself, through the API, so that the operator under test sees the same
objects and status transitions it would see on a cluster:

* :meth:`StandinKubelet.pod_for` creates the Pod the Job controller would create from the Job's
  pod template (name ``<job>-<5 random chars>``, labels ``job-name``,
  ``batch.kubernetes.io/job-name``, ``controller-uid``, ``batch.kubernetes.io/controller-uid``,
  a controlling ownerReference to the Job, ``spec.nodeName`` set as if scheduled);
* :meth:`set_pod_phase`, :meth:`finish_pod` write Pod status as the kubelet would, through the
  Pod's ``/status`` subresource (``containerStatuses[0].state.terminated`` carries exitCode,
  reason ``Completed``/``Error`` and the termination message);
* :meth:`set_job_status` writes Job status as the Job controller would (``/status``);
* :meth:`run_container` runs the Pod's first container ``command`` + ``args`` as a *local
  subprocess* (see its docstring for what is and is not emulated);
* :meth:`run_job` does the whole lifecycle of one Job.

Volumes: a local process cannot see a pod's mounts, so the stand-in gives each mounted volume
of a supported type a local directory (``<log_dir>/<pod>.volumes/<volume>``) and rewrites the
container's paths to it: every ``command``/``args`` item and every value of the container's
``env`` that is a mount path or lies under one (also the ``--flag=PATH`` form) points into the
local directory instead (the longest mount path wins). Supported: ``emptyDir`` (an empty
directory), ``downwardAPI`` (``fieldRef`` items written as files, as the kubelet projects them),
``secret`` and ``configMap`` (keys read through the API, ``items`` honoured). Other volume types
(PVCs, hostPath, ...) are left alone: their paths stay as written. Paths a program computes
itself (not from argv or env) are not rewritten.

Termination message: a container writes its termination message to
``terminationMessagePath`` (default ``/dev/termination-log``), which the kubelet mounts from a
per-container file. A local process cannot be given that path generically (rewriting env or
arguments would need to know the program), so the stand-in sets the environment variable
``KUBETUNE_TERMINATION_PATH`` to a temp file and reads that file after the process exits;
kubetune's trainer writes its termination message to ``$KUBETUNE_TERMINATION_PATH`` when set,
else to ``/dev/termination-log``. As the kubelet does, at most 4096 bytes are kept, and with
``terminationMessagePolicy: FallbackToLogsOnError`` a failed container without a message gets
the tail of its log instead.

Job conditions are those of a current Job controller: success writes ``SuccessCriteriaMet`` then
``Complete`` (with ``completionTime``); failure writes ``FailureTarget`` then ``Failed`` (reason
``BackoffLimitExceeded``, no ``completionTime``, as the real controller). Kubernetes ≥ 1.31
refuses terminal conditions without those companions; 1.20 accepts any condition type, so the
same stand-in works against the 1.20 tier and envtest binaries of a current release.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

TERMINATION_ENV = "KUBETUNE_TERMINATION_PATH"
MAX_TERMINATION_MESSAGE = 4096  # bytes, as the kubelet
FALLBACK_LOG_LINES = 80  # FallbackToLogsOnError: the kubelet keeps the last 80 lines / 2048 bytes
FALLBACK_LOG_BYTES = 2048
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand
_MERGE = "application/merge-patch+json"

Obj = dict[str, Any]


class UnsupportedPodSpec(ValueError):
    """The pod spec uses something the stand-in cannot emulate locally."""


def now() -> str:
    """The current time as Kubernetes writes it (RFC 3339, seconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(value: str | dt.datetime | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is a literal ``$``,
    an undefined ``$(NAME)`` stays as written."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            if value[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if value[i + 1] == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2 : end]
                    out.append(env[name] if name in env else value[i : end + 1])
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


@dataclass
class PodRun:
    """One pod the stand-in ran: its name, exit code, termination message and log file."""

    pod_name: str
    exit_code: int
    termination_message: str
    log_path: Path


@dataclass
class JobRun:
    """The outcome of :meth:`StandinKubelet.run_job`: every pod run, oldest first."""

    job_name: str
    namespace: str
    succeeded: bool
    pods: list[PodRun] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.pods[-1].exit_code

    @property
    def termination_message(self) -> str:
        return self.pods[-1].termination_message


class StandinKubelet:
    """Plays the Job controller and the kubelet against a (real) apiserver.

    Build it from a kubeconfig path, from ``url`` + ``token`` (TLS verification off, as for the
    test apiserver's self-signed certificate), or from a ready ``kubernetes.client.ApiClient``.
    Objects go in and come out as plain wire-format dicts (camelCase, as ``kubectl -o json``).
    """

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str] | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        api_client: kubernetes.client.ApiClient | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        node_name: str = "standin-node",
        drop_env_prefixes: tuple[str, ...] = (),
    ) -> None:
        """``drop_env_prefixes``: variables of *this* process whose names start with one of these
        are not inherited by the containers it runs (e.g. ``("AWS_",)``, so that credentials can
        only come from the pod's own ``env``/``envFrom``, as in a real pod)."""
        if api_client is None:
            if kubeconfig is not None:
                api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
            elif url and token:
                cfg = kubernetes.client.Configuration()
                cfg.host = url
                # The full header value, no api_key_prefix: the key's name moved from
                # "authorization" to "BearerToken" in kubernetes 36 (prefixes follow the name).
                cfg.api_key = {"authorization": f"Bearer {token}"}
                cfg.verify_ssl = False
                api_client = kubernetes.client.ApiClient(cfg)
            else:
                raise ValueError("need a kubeconfig, url + token, or an api_client")
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="kubetune-standin-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.node_name = node_name
        self.drop_env_prefixes = tuple(drop_env_prefixes)
        self.logs: dict[str, Path] = {}  # pod name -> log file of its run
        self.volume_dirs: dict[str, dict[str, Path]] = {}  # pod name -> mount path -> local dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}  # pod name -> its container process
        self._run_lock = threading.Lock()
        self._shut_down = False

    def close(self) -> None:
        self.api_client.close()

    def kill_running(self, shutdown: bool = False) -> list[str]:
        """SIGKILL the process group of every container running now (e.g. from a test's
        teardown while another thread is inside :meth:`run_job`); returns their pod names.
        The thread running it then sees the kill as exit code 137. With ``shutdown``, no
        container starts any more afterwards (:meth:`run_container` raises RuntimeError), so a
        :meth:`run_job` retry loop in another thread cannot start a new one."""
        killed = []
        with self._run_lock:
            self._shut_down = self._shut_down or shutdown
            procs = list(self.running.items())
        for name, proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                killed.append(name)
        return killed

    def __enter__(self) -> StandinKubelet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    @staticmethod
    def _json(response: Any) -> Obj:
        return json.loads(response.data)

    def read_job(self, name: str, namespace: str) -> Obj:
        return self._json(self.batch.read_namespaced_job(name, namespace, _preload_content=False))

    def read_pod(self, name: str, namespace: str) -> Obj:
        return self._json(self.core.read_namespaced_pod(name, namespace, _preload_content=False))

    def _job(self, job: Obj | str, namespace: str | None = None) -> Obj:
        if isinstance(job, str):
            if namespace is None:
                raise ValueError("a job given by name needs its namespace")
            return self.read_job(job, namespace)
        return job

    def _pod(self, pod: Obj | str, namespace: str | None = None) -> Obj:
        if isinstance(pod, str):
            if namespace is None:
                raise ValueError("a pod given by name needs its namespace")
            return self.read_pod(pod, namespace)
        return pod

    def _patch_pod_status(self, pod: Obj, status: Obj) -> Obj:
        meta = pod["metadata"]
        return self._json(
            self.core.patch_namespaced_pod_status(
                meta["name"],
                meta["namespace"],
                {"status": status},
                _content_type=_MERGE,
                _preload_content=False,
            )
        )

    # -- the Job controller's part ---------------------------------------------------------

    def pod_for(self, job: Obj | str, namespace: str | None = None) -> Obj:
        """Create the Pod the Job controller would create for ``job``; return it as stored."""
        job = self._job(job, namespace)
        meta, template = job["metadata"], job["spec"]["template"]
        uid = meta["uid"]
        base = f"{meta['name']}-"[:58]  # the apiserver's generateName truncation
        name = base + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))
        tmeta = template.get("metadata") or {}
        labels = dict(tmeta.get("labels") or {})
        labels.update(
            {
                "controller-uid": uid,
                "job-name": meta["name"],
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": meta["name"],
            }
        )
        spec = json.loads(json.dumps(template["spec"]))
        spec.setdefault("nodeName", self.node_name)  # as if the scheduler had bound it
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }
        return self._json(self.core.create_namespaced_pod(meta["namespace"], pod, _preload_content=False))

    def set_job_status(
        self,
        job: Obj | str,
        namespace: str | None = None,
        *,
        active: int | None = None,
        succeeded: int | None = None,
        failed: int | None = None,
        conditions: list[Obj] | None = None,
        start_time: str | dt.datetime | None = None,
        completion_time: str | dt.datetime | None = None,
    ) -> Obj:
        """Merge-patch the Job's status subresource with the given fields (others untouched).

        ``conditions`` replaces the list; each condition needs ``type`` (``status`` defaults to
        ``"True"``) and gets ``lastProbeTime``/``lastTransitionTime`` = now unless given.
        """
        job = self._job(job, namespace)
        status: Obj = {}
        for key, value in (("active", active), ("succeeded", succeeded), ("failed", failed)):
            if value is not None:
                status[key] = value
        if start_time is not None:
            status["startTime"] = _time(start_time)
        if completion_time is not None:
            status["completionTime"] = _time(completion_time)
        if conditions is not None:
            stamp = now()
            status["conditions"] = [
                {"status": "True", "lastProbeTime": stamp, "lastTransitionTime": stamp, **c} for c in conditions
            ]
        meta = job["metadata"]
        return self._json(
            self.batch.patch_namespaced_job_status(
                meta["name"],
                meta["namespace"],
                {"status": status},
                _content_type=_MERGE,
                _preload_content=False,
            )
        )

    # -- the kubelet's part ----------------------------------------------------------------

    @staticmethod
    def _container_names(pod: Obj) -> list[str]:
        return [c["name"] for c in pod["spec"]["containers"]]

    def _container_statuses(self, pod: Obj, first: Obj, others: Obj, ready: bool) -> list[Obj]:
        statuses = []
        for i, container in enumerate(pod["spec"]["containers"]):
            status = {
                "name": container["name"],
                "image": container.get("image", ""),
                "imageID": "",
                "ready": ready,
                "restartCount": 0,
                "started": "running" in (first if i == 0 else others),
                "state": first if i == 0 else others,
            }
            if status["state"].get("terminated") or status["state"].get("running"):
                status["containerID"] = f"standin://{pod['metadata']['uid']}/{container['name']}"
            statuses.append(status)
        return statuses

    def set_pod_phase(self, pod: Obj | str, phase: str, namespace: str | None = None) -> Obj:
        """Write phase ``Pending`` (scheduled, containers creating) or ``Running``."""
        pod = self._pod(pod, namespace)
        stamp = now()
        if phase == "Pending":
            state = {"waiting": {"reason": "ContainerCreating"}}
            status = {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
                    {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": stamp},
                    {
                        "type": "ContainersReady",
                        "status": "False",
                        "reason": "ContainersNotReady",
                        "lastTransitionTime": stamp,
                    },
                ],
                "containerStatuses": self._container_statuses(pod, state, state, ready=False),
                "hostIP": "127.0.0.1",
                "startTime": pod.get("status", {}).get("startTime") or stamp,
            }
        elif phase == "Running":
            state = {"running": {"startedAt": stamp}}
            status = {
                "phase": "Running",
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
                    {"type": "Ready", "status": "True", "lastTransitionTime": stamp},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": stamp},
                ],
                "containerStatuses": self._container_statuses(pod, state, state, ready=True),
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "startTime": pod.get("status", {}).get("startTime") or stamp,
            }
        else:
            raise ValueError(f"set_pod_phase writes Pending or Running, not {phase!r}; use finish_pod")
        return self._patch_pod_status(pod, status)

    def finish_pod(
        self,
        pod: Obj | str,
        exit_code: int,
        termination_message: str = "",
        namespace: str | None = None,
    ) -> Obj:
        """Terminate the pod: the first container exits with ``exit_code`` (other containers,
        if any, with 0); phase ``Succeeded`` for 0, else ``Failed``."""
        pod = self._pod(pod, namespace)
        stamp = now()
        started = stamp
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            started = cs.get("state", {}).get("running", {}).get("startedAt", started)
            break

        def terminated(code: int, message: str) -> Obj:
            term: Obj = {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": started,
                "finishedAt": stamp,
            }
            if message:
                term["message"] = message
            return {"terminated": term}

        phase = "Succeeded" if exit_code == 0 else "Failed"
        reason = "PodCompleted" if exit_code == 0 else "PodFailed"
        status = {
            "phase": phase,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                {"type": "Initialized", "status": "True", "reason": "PodCompleted", "lastTransitionTime": stamp},
                {"type": "Ready", "status": "False", "reason": reason, "lastTransitionTime": stamp},
                {"type": "ContainersReady", "status": "False", "reason": reason, "lastTransitionTime": stamp},
            ],
            "containerStatuses": self._container_statuses(
                pod, terminated(exit_code, termination_message), terminated(0, ""), ready=False
            ),
            "startTime": pod.get("status", {}).get("startTime") or stamp,
        }
        return self._patch_pod_status(pod, status)

    def _container_env(self, pod: Obj, container: Obj) -> dict[str, str]:
        """The container's environment as the kubelet would build it (envFrom, then env)."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._secret_data(source["secretRef"], namespace)
            elif "configMapRef" in source:
                data = self._configmap_data(source["configMapRef"], namespace)
            else:
                raise UnsupportedPodSpec(f"envFrom entry {source} is not supported")
            env.update({prefix + k: v for k, v in data.items()})
        for entry in container.get("env") or []:
            name = entry["name"]
            if "valueFrom" not in entry:
                env[name] = expand(entry.get("value", ""), env)
                continue
            source = entry["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self._secret_data(ref, namespace)
                if ref["key"] in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise UnsupportedPodSpec(f"env {name}: secret {ref['name']} has no key {ref['key']}")
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = self._configmap_data(ref, namespace)
                if ref["key"] in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise UnsupportedPodSpec(f"env {name}: configmap {ref['name']} has no key {ref['key']}")
            elif "fieldRef" in source:
                env[name] = self._field(pod, source["fieldRef"]["fieldPath"])
            else:
                raise UnsupportedPodSpec(f"env {name}: valueFrom {source} is not supported")
        return env

    def _secret_data(self, ref: Obj, namespace: str) -> dict[str, str]:
        try:
            secret = self._json(self.core.read_namespaced_secret(ref["name"], namespace, _preload_content=False))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404 and ref.get("optional"):
                return {}
            raise
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        data.update(secret.get("stringData") or {})
        return data

    def _configmap_data(self, ref: Obj, namespace: str) -> dict[str, str]:
        try:
            cm = self._json(self.core.read_namespaced_config_map(ref["name"], namespace, _preload_content=False))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404 and ref.get("optional"):
                return {}
            raise
        return dict(cm.get("data") or {})

    @staticmethod
    def _field(pod: Obj, path: str) -> str:
        meta, spec = pod["metadata"], pod["spec"]
        simple = {
            "metadata.name": meta.get("name", ""),
            "metadata.namespace": meta.get("namespace", ""),
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1",
            "status.podIP": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        for prefix, key in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
            if path.startswith(prefix + "['") and path.endswith("']"):
                return (meta.get(key) or {}).get(path[len(prefix) + 2 : -2], "")
        raise UnsupportedPodSpec(f"fieldRef {path} is not supported by the stand-in")

    def _volume_data(self, source: Obj, kind: str, namespace: str) -> dict[str, str]:
        ref = {"name": source.get("secretName" if kind == "secret" else "name"), "optional": source.get("optional")}
        data = self._secret_data(ref, namespace) if kind == "secret" else self._configmap_data(ref, namespace)
        items = source.get("items")
        if not items:
            return data
        out = {}
        for item in items:
            if item["key"] in data:
                out[item["path"]] = data[item["key"]]
            elif not item.get("optional", source.get("optional")):
                raise UnsupportedPodSpec(f"{kind} volume {ref['name']} has no key {item['key']}")
        return out

    def materialize_volumes(self, pod: Obj, container: Obj) -> dict[str, Path]:
        """Local directories for the container's mounts of supported volume types (see the
        module docstring): mount path → directory, filled as the kubelet would fill the volume."""
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        root = self.log_dir / f"{name}.volumes"
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise UnsupportedPodSpec(f"volumeMount {mount['name']} names no volume of the pod")
            local = root / mount["name"]
            files: dict[str, str] | None = None
            if "emptyDir" in volume:
                files = {}
            elif "downwardAPI" in volume:
                files = {}
                for item in volume["downwardAPI"].get("items") or []:
                    if "fieldRef" not in item:
                        raise UnsupportedPodSpec(f"downwardAPI item {item} is not supported by the stand-in")
                    files[item["path"]] = self._field(pod, item["fieldRef"]["fieldPath"])
            elif "secret" in volume:
                files = self._volume_data(volume["secret"], "secret", namespace)
            elif "configMap" in volume:
                files = self._volume_data(volume["configMap"], "configMap", namespace)
            if files is None:
                continue  # PVC, hostPath, ...: not emulated, the path stays as written
            local.mkdir(parents=True, exist_ok=True)
            for rel, text in files.items():
                target = local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            sub = mount.get("subPath")
            mounts[mount["mountPath"].rstrip("/") or "/"] = local / sub if sub else local
        self.volume_dirs[name] = mounts
        return mounts

    @staticmethod
    def rewrite_path(value: str, mounts: Mapping[str, Path]) -> str:
        """``value`` with a leading mount path (or one after ``--flag=``) replaced by its local
        directory; the longest matching mount path wins; anything else unchanged."""
        prefix, sep, rest = value.partition("=")
        if sep and prefix.startswith("-") and rest.startswith("/"):
            return f"{prefix}={StandinKubelet.rewrite_path(rest, mounts)}"
        for mount_path in sorted(mounts, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(mounts[mount_path]) + value[len(mount_path.rstrip("/")) :]
        return value

    def run_container(
        self,
        pod: Obj | str,
        env_extra: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = 600.0,
        namespace: str | None = None,
    ) -> tuple[int, str]:
        """Run the pod's first container locally; return (exit code, termination message).

        What is emulated: ``command`` + ``args`` with ``$(VAR)`` expansion; ``env`` (plain
        values, ``secretKeyRef`` / ``configMapKeyRef`` read through the API, ``fieldRef`` for
        metadata.name/namespace/uid/labels/annotations, spec.nodeName, ...) and ``envFrom``;
        the termination message (through ``$KUBETUNE_TERMINATION_PATH``, see the module
        docstring); stdout and stderr go to ``self.log_dir/<pod>.log`` (``self.logs[pod]``).

        Volumes: mounts of emptyDir, downwardAPI, secret and configMap volumes become local
        directories and the container's argv and env paths are rewritten to them (module
        docstring); other volume types are not emulated.

        What is not: the image (the command runs on this machine, so ``python``/``python3`` as
        the executable means this interpreter, ``sys.executable``, and its directory is put
        first on PATH); resources and limits. The process inherits this process's environment
        (PATH, HOME, the venv; minus ``drop_env_prefixes``) under the container's env. The working
        directory is ``cwd``, else the container's ``workingDir`` if it exists here, else a
        fresh directory. A container without ``command`` (image entrypoint) is refused. On
        ``timeout`` the process group is killed and :class:`TimeoutError` raised.
        """
        pod = self._pod(pod, namespace)
        name = pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        command = list(container.get("command") or [])
        if not command:
            raise UnsupportedPodSpec(
                f"container {container['name']} has no command: the stand-in cannot run an image's entrypoint"
            )
        cenv = self._container_env(pod, container)
        mounts = self.materialize_volumes(pod, container)
        cenv = {k: self.rewrite_path(v, mounts) for k, v in cenv.items()}
        # Rewrite the written paths first, then expand $(VAR) with the (already rewritten) env.
        argv = [expand(self.rewrite_path(a, mounts), cenv) for a in command + list(container.get("args") or [])]
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable

        workdir = self.log_dir / f"{name}.workdir"
        term_path = self.log_dir / f"{name}.termination-log"
        term_path.write_bytes(b"")
        log_path = self.log_dir / f"{name}.log"
        self.logs[name] = log_path
        if cwd is None:
            wd = container.get("workingDir")
            if wd and Path(wd).is_dir():
                cwd = wd
            else:
                workdir.mkdir(exist_ok=True)
                cwd = workdir

        drop = self.drop_env_prefixes
        env = {k: v for k, v in os.environ.items() if not (drop and k.startswith(drop))}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.update(cenv)
        env.update(env_extra or {})
        env[TERMINATION_ENV] = str(term_path)

        with open(log_path, "wb") as log, self._run_lock:
            if self._shut_down:
                raise RuntimeError("the stand-in kubelet was shut down (kill_running(shutdown=True))")
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.running[name] = proc
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(
                f"container {container['name']} of pod {name} ran longer than {timeout:g} s; "
                f"log {log_path}:\n{_tail(log_path)}"
            ) from None
        finally:
            self.running.pop(name, None)
        if code < 0:  # killed by a signal: a container runtime reports 128 + signal
            code = 128 - code
        message = term_path.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _tail(log_path, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES)
        return code, message

    # -- everything ------------------------------------------------------------------------

    def run_job(
        self,
        job_name: str,
        namespace: str,
        *,
        env_extra: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = 600.0,
    ) -> JobRun:
        """Run a Job to completion as controller + kubelet would, one pod at a time.

        Per attempt: create the pod, Pending, Running (Job ``active=1``, ``startTime``), run the
        container, finish the pod, count it. A failed pod is retried until
        ``spec.backoffLimit`` (default 6) failures have been exceeded, then the Job gets
        ``Failed`` (reason ``BackoffLimitExceeded``); a succeeded pod makes it ``Complete``.
        """
        job = self.read_job(job_name, namespace)
        backoff_limit = job["spec"].get("backoffLimit", 6)
        run = JobRun(job_name=job_name, namespace=namespace, succeeded=False)
        start = (job.get("status") or {}).get("startTime") or now()
        failed = 0
        while True:
            pod = self.pod_for(job)
            pod = self.set_pod_phase(pod, "Pending")
            pod = self.set_pod_phase(pod, "Running")
            self.set_job_status(job, active=1, failed=failed or None, start_time=start)
            code, message = self.run_container(pod, env_extra=env_extra, cwd=cwd, timeout=timeout)
            self.finish_pod(pod, code, message)
            run.pods.append(PodRun(pod["metadata"]["name"], code, message, self.logs[pod["metadata"]["name"]]))
            if code == 0:
                stamp = now()
                self.set_job_status(
                    job,
                    active=0,
                    succeeded=1,
                    completion_time=stamp,
                    conditions=[
                        {
                            "type": "SuccessCriteriaMet",
                            "reason": "CompletionsReached",
                            "message": "Reached expected number of succeeded pods",
                        },
                        {"type": "Complete"},
                    ],
                )
                run.succeeded = True
                return run
            failed += 1
            if failed > backoff_limit:
                message = "Job has reached the specified backoff limit"
                self.set_job_status(
                    job,
                    active=0,
                    failed=failed,
                    conditions=[
                        {"type": "FailureTarget", "reason": "BackoffLimitExceeded", "message": message},
                        {"type": "Failed", "reason": "BackoffLimitExceeded", "message": message},
                    ],
                )
                return run
            self.set_job_status(job, active=0, failed=failed)


def _tail(path: Path, lines: int = 40, max_bytes: int | None = None) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    out = "\n".join(text.splitlines()[-lines:])
    if max_bytes is not None:
        out = out.encode()[-max_bytes:].decode(errors="replace")
    return out
