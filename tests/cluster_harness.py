"""A real single-node Kubernetes cluster for kubetune's "cluster" test tier.

Why this exists: the "real" tier (tests/k8s_harness.py) is one kube-apiserver 1.20 and etcd; it
cannot compile CEL, and a stand-in plays the Job controller and the kubelet. Our first CRD was
refused by every current API server and no test could see it. This module assembles the most
real cluster the build machine allows (../shared/TESTING.md, "A real cluster on this machine"):

* **CEL at Kubernetes 1.36** — the standalone CRD server (``k8s.io/apiextensions-apiserver`` built
  from Debian sid by hack/build-crd-server.sh) with its own etcd 3.5, **aggregated** behind the
  1.20 kube-apiserver: an ``APIService`` for ``v1alpha1.kubetune.io`` whose Service is an
  ExternalName for localhost. kubectl and the operator see one cluster; FineTuneJobs are stored,
  pruned and validated (CEL included) by 1.36, everything else by 1.20, RBAC by 1.20 (the CRD
  server delegates authentication and authorization to it). The 1.20 side carries a front-proxy
  CA and client certificate (``--requestheader-*``, ``--proxy-client-*``).
* **The real control plane at 1.20** — kube-controller-manager (Job controller, garbage
  collector, TTL-after-finished, ServiceAccount tokens) and kube-scheduler, built from the same
  Debian tree as the apiserver (hack/build-apiserver.sh).
* **Real pods in real containers** — Debian's docker.io daemon on a private socket, data root
  and exec root with no bridge, no iptables and no IP forwarding (the host's network is never
  touched); a runtime shim registered as the default runtime clamps ``oomScoreAdj`` to >= 0 and
  drops ``process.rlimits`` (this sandbox lacks CAP_SYS_RESOURCE) and execs runc; and the real
  kubelet 1.20 (dockershim) registering node ``localhost``. No registry is reachable: the pause
  image is imported from the ``pause`` binary hack/build-apiserver.sh compiles from the tree's
  ``build/pause/linux/pause.c``, the bases our Dockerfiles start FROM from the debootstrap
  tarball of hack/build-base-images.sh. Pods run with ``hostNetwork`` (there is no CNI) and
  ``imagePullPolicy: Never``.

Limits of this tier, and what still needs a stand-in: the Job controller is 1.20's, so Job
``suspend``, Indexed completion and ``podFailurePolicy`` do not exist here (they are pruned from
Jobs); GPUs, several nodes and a pod network only a real cloud cluster has.

Like k8s_harness, this is a plain module (no pytest import), and it never builds anything: the
``hack/`` scripts fill the caches (``make cluster-tools``). :class:`BinariesMissing` names the
script to run. Every process runs in its own process group and is stopped by :meth:`stop`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import http.server
import json
import os
import shutil
import signal
import socketserver
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.k8s_harness import (
    ApiServer,
    ApiServerError,
    BinariesMissing,
    _insecure_ssl_context,
    _tail,
    api_request,
    cache_dir,
    free_ports,
    kubectl,
)

REPO = Path(__file__).resolve().parents[1]
KUBETUNE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune"
NODE_NAME = "localhost"
PAUSE_IMAGE = "kubetune.local/pause:3.4.1"
DOCKER_CLI = "/usr/bin/docker"
"""Debian's docker.io client, of the same release as the daemon (another client may be first on PATH)."""
AGGREGATED_GROUP = "kubetune.io"
AGGREGATED_VERSION = "v1alpha1"


# ------------------------------------------------------------------------------------------
# Binaries and cached inputs
# ------------------------------------------------------------------------------------------


def control_plane_binaries() -> dict[str, Path]:
    """kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, etcd and pause (1.20)."""
    bindir = cache_dir() / "bin"
    names = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "etcd", "pause")
    found = {n: bindir / n for n in names}
    missing = [n for n, p in found.items() if not os.access(p, os.X_OK)]
    if missing:
        raise BinariesMissing(
            f"{', '.join(missing)} not found in {bindir}: run `bash hack/build-apiserver.sh` once "
            "(it builds the 1.20 control plane from Debian's source package)"
        )
    return found


def crd_server_binaries() -> tuple[Path, Path]:
    """(apiextensions-apiserver, etcd 3.5): ``$KUBETUNE_CRD_SERVER_BIN`` or hack/build-crd-server.sh's cache."""
    env = os.environ.get("KUBETUNE_CRD_SERVER_BIN")
    bindir = Path(env) if env else KUBETUNE_CACHE / "crd-server" / "current" / "bin"
    server, etcd = bindir / "apiextensions-apiserver", bindir / "etcd"
    missing = [str(p) for p in (server, etcd) if not os.access(p, os.X_OK)]
    if missing:
        raise BinariesMissing(
            f"{', '.join(missing)} missing: run `bash hack/build-crd-server.sh` once (it builds the 1.36 "
            "CRD server from Debian sid, or falls back to the pinned copy), or set KUBETUNE_CRD_SERVER_BIN"
        )
    return server, etcd


def crd_server_version() -> str:
    """What hack/build-crd-server.sh recorded about the CRD server in use (one line)."""
    server, _ = crd_server_binaries()
    version = server.parent.parent / "VERSION"
    return version.read_text().strip() if version.is_file() else f"{server} (no VERSION file)"


def base_image_tarball() -> Path:
    """The newest debootstrap rootfs tarball of hack/build-base-images.sh."""
    found = sorted((KUBETUNE_CACHE / "images").glob("debian-bookworm-python-*.tar"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise BinariesMissing("no base image tarball: run `bash hack/build-base-images.sh` once (debootstrap, ~2 min)")
    return found[-1]


def _wait(what: str, probe: Any, timeout: float, interval: float = 0.25, on_timeout: Any = None) -> None:
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        try:
            if probe():
                return
            last = "not ready"
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise ApiServerError(f"{what} not ready after {timeout:g} s (last probe: {last}){extra}")
        time.sleep(interval)


class _Processes:
    """Processes in their own process groups, with logs in one directory; stopped in reverse order."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: list[int] = []

    def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.logdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.logdir,
                env=env,
                start_new_session=True,
            )
        self.procs[name] = proc
        self.pids.append(proc.pid)
        return proc

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ApiServerError(f"{name} exited with status {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        return _tail(self.logdir / f"{name}.log", lines)

    def stop(self, name: str, grace: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


class CrdRefused(ApiServerError):
    """The CRD server refused a CustomResourceDefinition (HTTP status and the server's message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


# ------------------------------------------------------------------------------------------
# Certificates (front proxy for aggregation)
# ------------------------------------------------------------------------------------------


def _write_ca_and_client(directory: Path, ca_name: str, client_cn: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a client certificate it signs: (ca.crt, client.crt, client.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_cn)]))
        .issuer_name(ca_subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / f"{ca_name}.crt", directory / f"{client_cn}.crt", directory / f"{client_cn}.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


# ------------------------------------------------------------------------------------------
# Docker
# ------------------------------------------------------------------------------------------

SHIM = '''#!/usr/bin/python3
"""kubetune's runtime shim (tests/cluster_harness.py): this sandbox lacks CAP_SYS_RESOURCE, so runc
fails on a negative oomScoreAdj (the kubelet asks -998 for pause containers) and on raised
rlimits. On create/run, rewrite the bundle's config.json (oomScoreAdj >= 0, no process.rlimits),
then exec runc with the same arguments."""
import json, os, sys
args = sys.argv[1:]
if "create" in args or "run" in args:
    bundle = os.getcwd()
    for i, a in enumerate(args):
        if a in ("--bundle", "-b") and i + 1 < len(args):
            bundle = args[i + 1]
        elif a.startswith("--bundle="):
            bundle = a.split("=", 1)[1]
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    proc = cfg.get("process") or {}
    proc.pop("rlimits", None)
    if (proc.get("oomScoreAdj") or 0) < 0:
        proc["oomScoreAdj"] = 0
    with open(path + ".tmp", "w") as f:
        json.dump(cfg, f)
    os.replace(path + ".tmp", path)
os.execv(RUNC, ["runc", *args])
'''


class Dockerd:
    """Debian's dockerd on a private socket, exec root and (persistent) data root.

    The data root (``~/.cache/kubetune/docker``) is kept between runs so imported bases, built
    images and their layer cache make warm runs fast; every container is removed at stop.
    Networking is off (``--bridge=none --iptables=false --ip-forward=false --ip-masq=false``):
    containers use the host's network namespace, nothing on the host is reconfigured.
    """

    def __init__(self, data_root: Path | None = None) -> None:
        self.data_root = data_root or KUBETUNE_CACHE / "docker"
        self.run_dir: Path | None = None
        self.socket: Path = Path()
        self._procs: _Processes | None = None
        self._lock: Any = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def pids(self) -> list[int]:
        return list(self._procs.pids) if self._procs else []

    def start(self, timeout: float = 60.0) -> None:
        for tool in ("dockerd", "containerd", "runc"):
            if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin"):
                raise BinariesMissing(f"{tool} not found: `apt-get install docker.io` (hack/cluster-deps.sh)")
        self.data_root.mkdir(parents=True, exist_ok=True)
        # One daemon per data root: a second test session on the machine waits here.
        self._lock = open(self.data_root.parent / "docker.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        # Short path: unix sockets are limited to 108 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="ktd-", dir="/tmp"))
        self.socket = self.run_dir / "docker.sock"
        runc = shutil.which("runc", path="/usr/sbin:/usr/bin") or "/usr/sbin/runc"
        shim = self.run_dir / "kubetune-runtime-shim"
        shim.write_text(SHIM.replace("RUNC", repr(runc)))
        shim.chmod(0o755)
        config = self.run_dir / "daemon.json"
        config.write_text("{}")  # never the host's /etc/docker/daemon.json
        self._procs = _Processes(self.run_dir)
        self._procs.spawn(
            "dockerd",
            [
                shutil.which("dockerd", path="/usr/sbin:/usr/bin") or "dockerd",
                f"--config-file={config}",
                f"--host={self.host}",
                f"--data-root={self.data_root}",
                f"--exec-root={self.run_dir / 'exec'}",
                f"--pidfile={self.run_dir / 'docker.pid'}",
                "--bridge=none",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--userland-proxy=false",
                f"--add-runtime=kubetune-shim={shim}",
                "--default-runtime=kubetune-shim",
                "--log-level=warn",
            ],
        )
        try:
            _wait(
                "dockerd",
                lambda: self._check() or self.docker("version", check=False).returncode == 0,
                timeout,
                on_timeout=lambda: self._procs.tail("dockerd") if self._procs else "",
            )
            self.remove_all_containers()  # left by an interrupted run on the persistent data root
        except BaseException:
            self.stop()
            raise

    def _check(self) -> None:
        if self._procs:
            self._procs.check()

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600.0, input: bytes | None = None, capture: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [DOCKER_CLI, *args],
            env=self.env(),
            input=input.decode() if input else None,
            capture_output=capture,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ApiServerError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def image_exists(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self.docker("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())

    def import_rootfs(self, tarball: Path, name: str, changes: Iterable[str] = ()) -> None:
        args = ["import"]
        for change in changes:
            args += ["--change", change]
        self.docker(*args, str(tarball), name)

    def import_pause(self, pause_binary: Path, name: str = PAUSE_IMAGE) -> None:
        """The pod sandbox image, from the statically linked pause binary (as upstream's
        build/pause Dockerfile: FROM scratch, ADD pause, ENTRYPOINT /pause, USER 65535)."""
        if self.image_exists(name):
            return
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(pause_binary, Path(tmp) / "pause")
            tar = Path(tmp) / "pause.tar"
            subprocess.run(["tar", "-C", tmp, "-cf", str(tar), "pause"], check=True)
            self.import_rootfs(tar, name, ['ENTRYPOINT ["/pause"]', "USER 65535:65535"])

    def remove_all_containers(self) -> None:
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", "-v", *ids, check=False, timeout=120)

    def stop(self) -> None:
        if self._procs is not None:
            with contextlib.suppress(Exception):
                if "dockerd" in self._procs.procs and self._procs.procs["dockerd"].poll() is None:
                    self.remove_all_containers()
            self._procs.stop_all()
            # dockerd's own containerd and the shims are in dockerd's process group or exit with
            # their containers; anything left under our exec root is ours to kill.
            _kill_matching(str(self.run_dir))
            self._procs = None
        if self.run_dir is not None:
            # dockerd bind-mounts the host's network namespace under exec/netns and leaves it.
            _unmount_under(self.run_dir)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _kill_matching(needle: str) -> None:
    """SIGKILL every process whose command line mentions ``needle`` (our private paths)."""
    if not needle:
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), signal.SIGKILL)


WHEEL_PORT = 47931
"""Where :class:`WheelServer` listens when it can: the URL is a build argument, and Docker's layer
cache keys RUN steps on build arguments, so a port that changes every run rebuilds torch's layer."""


class WheelServer:
    """Serves a directory of wheels over HTTP on loopback: a ``PIP_FIND_LINKS`` for ``docker
    build --network=host`` (how the local CPU torch wheel reaches the trainer image's build).
    Listens on :data:`WHEEL_PORT`, or a free port when that is taken (the build is then cold)."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        try:
            self._server = socketserver.ThreadingTCPServer(("127.0.0.1", WHEEL_PORT), handler)
        except OSError:
            self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WheelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def local_torch_wheel_dir() -> Path | None:
    """The directory pip is configured to find the local CPU torch wheel in (``find-links``)."""
    candidates = [os.environ.get("PIP_FIND_LINKS", ""), "/opt/wheels"]
    for raw in candidates:
        for part in raw.split():
            path = Path(part.removeprefix("file://"))
            if path.is_dir() and any(path.glob("torch-*.whl")):
                return path
    return None


# ------------------------------------------------------------------------------------------
# The cluster
# ------------------------------------------------------------------------------------------


class Cluster:
    """1.20 kube-apiserver + controller-manager + scheduler + kubelet (docker), and the 1.36 CRD
    server aggregated for ``kubetune.io``. Use as a context manager; see the module docstring.

    After :meth:`start`: ``api`` (the :class:`ApiServer`, its ``kubeconfig`` is the admin's),
    ``crd_kubeconfig`` (the CRD server directly, for installing CRDs), ``docker`` (the daemon),
    ``crd_server_url``. :meth:`install_crd` puts a CRD on the 1.36 server, with its CEL rules.
    """

    def __init__(self, docker: Dockerd, ready_timeout: float = 120.0) -> None:
        self.docker = docker
        self.ready_timeout = ready_timeout
        self.bins = control_plane_binaries()
        self.crd_server_bin, self.crd_etcd_bin = crd_server_binaries()
        self.tmp: Path = Path()
        self.api: ApiServer | None = None
        self.crd_kubeconfig: Path = Path()
        self.crd_server_url = ""
        self.kubelet_port = 0
        self._procs: _Processes | None = None

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        assert self.api is not None
        return self.api.kubeconfig

    def pids(self) -> list[int]:
        return (self.api.pids() if self.api else []) + (list(self._procs.pids) if self._procs else [])

    def logs(self, name: str, lines: int = 40) -> str:
        if name in ("kube-apiserver", "etcd") and self.api is not None:
            return (self.api._logs and _tail(self.api._logs[name], lines)) or ""
        return self._procs.tail(name, lines) if self._procs else ""

    def start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="kubetune-cluster-"))
        self._procs = _Processes(self.tmp)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        assert self._procs is not None
        front_ca, proxy_crt, proxy_key = _write_ca_and_client(self.tmp, "front-proxy-ca", "front-proxy-client")
        self.api = ApiServer(
            binaries=(self.bins["kube-apiserver"], self.bins["etcd"]),
            ready_timeout=self.ready_timeout,
            # Real ServiceAccounts: tokens come from the controller-manager's token controller.
            disable_admission_plugins=(),
            extra_apiserver_args=[
                f"--requestheader-client-ca-file={front_ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={proxy_crt}",
                f"--proxy-client-key-file={proxy_key}",
                # `kubectl logs` goes apiserver → kubelet at the node's hostname (localhost).
                "--kubelet-preferred-address-types=Hostname",
                "--feature-gates=TTLAfterFinished=true",
            ],
        )
        self.api.start()
        assert self.api.tmpdir is not None
        self._start_crd_server()
        self._aggregate()
        self._start_controllers()
        self._start_kubelet()

    # -- the CRD server (1.36) ---------------------------------------------------------------

    def _start_crd_server(self) -> None:
        assert self._procs is not None and self.api is not None
        etcd_port, peer_port, port = free_ports(3)
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._procs.spawn(
            "crd-etcd",
            [
                self.crd_etcd_bin,
                "--name=crd",
                f"--data-dir={self.tmp / 'crd-etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=crd=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
            ],
        )
        _wait(
            "etcd 3.5",
            lambda: self._procs.check() or _http_ok(etcd_url + "/health"),
            self.ready_timeout,
            on_timeout=lambda: self._procs.tail("crd-etcd"),
        )
        admin = self.api.kubeconfig
        self.crd_server_url = f"https://127.0.0.1:{port}"
        self._procs.spawn(
            "crd-server",
            [
                self.crd_server_bin,
                f"--etcd-servers={etcd_url}",
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                f"--cert-dir={self.tmp / 'crd-certs'}",
                f"--authentication-kubeconfig={admin}",
                f"--authorization-kubeconfig={admin}",
                f"--kubeconfig={admin}",
                # These need informers (and APIs) that a 1.20 core server lacks: they would wait forever.
                "--disable-admission-plugins=MutatingAdmissionPolicy,ValidatingAdmissionPolicy",
                "--enable-priority-and-fairness=false",
            ],
        )
        self.crd_kubeconfig = self.tmp / "kubeconfig-crd-server"
        config = json.loads(admin.read_text())
        config["clusters"][0]["cluster"]["server"] = self.crd_server_url
        self.crd_kubeconfig.write_text(json.dumps(config))
        self.crd_kubeconfig.chmod(0o600)
        token = self.api.token
        _wait(
            "CRD server",
            lambda: self._procs.check() or _http_ok(self.crd_server_url + "/readyz", token),
            self.ready_timeout,
            on_timeout=lambda: self._procs.tail("crd-server"),
        )

    def _aggregate(self) -> None:
        """Route group kubetune.io of the 1.20 apiserver to the CRD server."""
        assert self.api is not None
        port = int(self.crd_server_url.rsplit(":", 1)[1])
        objects = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "kubetune-crd-server", "namespace": "kube-system"},
                "spec": {
                    "type": "ExternalName",
                    "externalName": "localhost",
                    "ports": [{"port": port, "protocol": "TCP"}],
                },
            },
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": f"{AGGREGATED_VERSION}.{AGGREGATED_GROUP}"},
                "spec": {
                    "group": AGGREGATED_GROUP,
                    "version": AGGREGATED_VERSION,
                    "groupPriorityMinimum": 1000,
                    "versionPriority": 15,
                    "insecureSkipTLSVerify": True,
                    "service": {"namespace": "kube-system", "name": "kubetune-crd-server", "port": port},
                },
            },
        ]
        kubectl(
            self.api.kubeconfig,
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
        )

    def crd_server_request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        """One request to the CRD server itself (kubectl cannot: the standalone server serves no
        `/apis` discovery document). Returns (HTTP status, decoded JSON body)."""
        assert self.api is not None
        return api_request(self.crd_server_url, self.api.token, method, path, body)

    def install_crd(self, crd_yaml_text: str, timeout: float = 60.0) -> list[str]:
        """Create (or replace) CRD(s) on the 1.36 CRD server, CEL rules included, and wait until
        each is Established there and its group answers through the aggregated 1.20 endpoint.
        A CRD the server refuses raises with the server's message."""
        import yaml

        collection = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        docs = [d for d in yaml.safe_load_all(crd_yaml_text) if d]
        for doc in docs:
            name = doc["metadata"]["name"]
            code, existing = self.crd_server_request("GET", f"{collection}/{name}")
            if code == 200:
                doc = {
                    **doc,
                    "metadata": {**doc["metadata"], "resourceVersion": existing["metadata"]["resourceVersion"]},
                }
                code, answer = self.crd_server_request("PUT", f"{collection}/{name}", doc)
            else:
                code, answer = self.crd_server_request("POST", collection, doc)
            if code not in (200, 201):
                raise CrdRefused(code, answer.get("message", str(answer)))

        def established() -> bool:
            for doc in docs:
                code, crd = self.crd_server_request("GET", f"{collection}/{doc['metadata']['name']}")
                conds = {c["type"]: c for c in crd.get("status", {}).get("conditions", [])}
                if code != 200 or conds.get("Established", {}).get("status") != "True":
                    raise ApiServerError(f"not Established: {conds or crd}")
            return True

        _wait("CRD Established on the CRD server", established, timeout, interval=0.25)
        assert self.api is not None

        def available() -> bool:
            status = kubectl(
                self.api.kubeconfig, "get", "apiservice", f"{AGGREGATED_VERSION}.{AGGREGATED_GROUP}", "-o", "json"
            ).stdout
            conds = {c["type"]: c for c in json.loads(status).get("status", {}).get("conditions", [])}
            if conds.get("Available", {}).get("status") != "True":
                raise ApiServerError(f"APIService not Available: {conds.get('Available')}")
            for doc in docs:
                plural = doc["spec"]["names"]["plural"]
                kubectl(self.api.kubeconfig, "get", f"{plural}.{doc['spec']['group']}", "-A", "-o", "name")
            return True

        _wait("aggregated kubetune.io", available, timeout, interval=0.5)
        return [d["metadata"]["name"] for d in docs]

    # -- controllers, scheduler, kubelet (1.20) ----------------------------------------------

    def _start_controllers(self) -> None:
        assert self._procs is not None and self.api is not None and self.api.tmpdir is not None
        admin = self.api.kubeconfig
        serving_cert = self.api.tmpdir / "certs" / "apiserver.crt"
        self._procs.spawn(
            "kube-controller-manager",
            [
                self.bins["kube-controller-manager"],
                f"--kubeconfig={admin}",
                "--controllers=*",
                "--leader-elect=false",
                f"--service-account-private-key-file={self.api.tmpdir / 'sa.key'}",
                f"--root-ca-file={serving_cert}",
                "--use-service-account-credentials=false",
                "--feature-gates=TTLAfterFinished=true",
                "--port=0",
                "--secure-port=0",
                # Tests delete namespaces and jobs constantly: collect garbage promptly.
                "--concurrent-gc-syncs=5",
            ],
        )
        self._procs.spawn(
            "kube-scheduler",
            [
                self.bins["kube-scheduler"],
                f"--kubeconfig={admin}",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
            ],
        )

    def _start_kubelet(self) -> None:
        assert self._procs is not None and self.api is not None
        self.docker.import_pause(self.bins["pause"])
        root = self.tmp / "kubelet"
        root.mkdir()
        (self.kubelet_port,) = free_ports(1)
        self._procs.spawn(
            "kubelet",
            [
                self.bins["kubelet"],
                f"--kubeconfig={self.api.kubeconfig}",
                "--container-runtime=docker",
                f"--docker-endpoint={self.docker.host}",
                f"--container-runtime-endpoint=unix://{self.tmp / 'dockershim.sock'}",
                f"--experimental-dockershim-root-directory={self.tmp / 'dockershim'}",
                f"--root-dir={root}",
                f"--cert-dir={self.tmp / 'kubelet-pki'}",
                f"--volume-plugin-dir={self.tmp / 'volume-plugins'}",
                f"--hostname-override={NODE_NAME}",
                "--address=127.0.0.1",
                f"--port={self.kubelet_port}",
                "--read-only-port=0",
                "--healthz-port=0",
                "--fail-swap-on=false",
                "--cgroup-driver=cgroupfs",
                "--cgroups-per-qos=false",
                "--enforce-node-allocatable=",
                "--eviction-hard=",
                # Leave the host alone: no iptables chains, no hairpin set-up, no kernel tunables.
                "--make-iptables-util-chains=false",
                "--hairpin-mode=none",
                # Never garbage-collect the images the tests built.
                "--image-gc-high-threshold=100",
                "--image-gc-low-threshold=99",
                f"--pod-infra-container-image={PAUSE_IMAGE}",
                "--serialize-image-pulls=false",
                "--node-status-update-frequency=2s",
                "--sync-frequency=5s",
            ],
        )
        admin = self.api.kubeconfig

        def node_ready() -> bool:
            self._procs.check()
            node = json.loads(kubectl(admin, "get", "node", NODE_NAME, "-o", "json").stdout)
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            return conds.get("Ready") == "True"

        _wait(
            f"node {NODE_NAME}",
            node_ready,
            self.ready_timeout,
            interval=0.5,
            on_timeout=lambda: self._procs.tail("kubelet"),
        )

        # The default ServiceAccount of `default` proves the token controller runs.
        def default_sa() -> bool:
            sa = json.loads(kubectl(admin, "get", "serviceaccount", "default", "-n", "default", "-o", "json").stdout)
            return bool(sa.get("secrets"))

        _wait(
            "ServiceAccount tokens",
            default_sa,
            self.ready_timeout,
            on_timeout=lambda: self._procs.tail("kube-controller-manager"),
        )

    def stop(self) -> None:
        if self._procs is not None:
            # The kubelet first, so it does not restart containers; then every container.
            self._procs.stop("kubelet")
            with contextlib.suppress(Exception):
                self.docker.remove_all_containers()
            self._procs.stop_all()
            self._procs = None
        if self.api is not None:
            self.api.stop()
        if self.tmp and self.tmp != Path() and self.tmp.exists():
            # kubelet leaves bind mounts of secrets/emptyDirs (tmpfs) under its root dir.
            _unmount_under(self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)


def _unmount_under(root: Path) -> None:
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    targets = [line.split()[1] for line in mounts if len(line.split()) > 1 and line.split()[1].startswith(str(root))]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def _http_ok(url: str, token: str | None = None) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=2, context=_insecure_ssl_context()) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


# ------------------------------------------------------------------------------------------
# Images built from the committed Dockerfiles
# ------------------------------------------------------------------------------------------

BASE_ENV = [
    # What the host's pip is configured with: the debootstrap base carries the same CA bundle.
    "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
    "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt",
    "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
]
OPERATOR_BASE = "python:3.11.11-slim-bookworm"
"""What operator/Dockerfile's PYTHON_IMAGE is set to here: the debootstrap base, imported under the
tag the Dockerfile pins by digest."""
TRAINER_BASE = "kubetune.local/debian-bookworm-python:substitute-for-cuda"
"""What trainer/Dockerfile's BASE_IMAGE is set to here: Debian instead of nvidia/cuda (no CUDA, CPU torch)."""
OPERATOR_IMAGE = "kubetune.local/operator:test"
TRAINER_IMAGE = "kubetune.local/trainer:test"


def import_bases(docker: Dockerd) -> None:
    """Import the debootstrap rootfs under the names the builds start FROM (once per tarball)."""
    tarball = base_image_tarball()
    marker = f"kubetune.base={tarball.name}"
    for name in (OPERATOR_BASE, TRAINER_BASE):
        labels = docker.docker("image", "inspect", "--format", "{{json .Config.Labels}}", name, check=False)
        if labels.returncode == 0 and tarball.name in labels.stdout:
            continue
        docker.import_rootfs(tarball, name, [*BASE_ENV, f"LABEL {marker}"])


def build_image(
    docker: Dockerd, dockerfile: str, tag: str, build_args: dict[str, str] | None = None, log: Path | None = None
) -> float:
    """``docker build --network=host`` of a committed Dockerfile with the repository as context;
    returns the seconds it took. The log goes to ``log`` (raises with its tail on failure)."""
    args = ["build", "--network=host", "-f", str(REPO / dockerfile), "-t", tag]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    start = time.monotonic()
    proc = docker.docker(*args, str(REPO), check=False, timeout=1800)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise ApiServerError(
            f"docker build -f {dockerfile} failed:\n" + textwrap.indent((proc.stdout + proc.stderr)[-4000:], "  ")
        )
    return time.monotonic() - start
