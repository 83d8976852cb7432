"""A real kube-apiserver + etcd for kubetune's "real" Kubernetes test tier.

Why this exists: the fast tier (kmock) emulates the Kubernetes HTTP API but does no schema
validation, pruning, status-subresource separation or RBAC. This module runs the real thing,
envtest-style: an etcd and a kube-apiserver on loopback ports, with a throw-away serving cert,
service-account key and static token file, and a kubeconfig for the real ``kubectl``.

Binaries come from ``$KUBEBUILDER_ASSETS`` (the envtest convention, so a user with
setup-envtest can run the same tests against a current Kubernetes), else from the cache that
``hack/build-apiserver.sh`` fills (kube-apiserver v1.20.2 built from Debian's source package,
etcd from Debian). This module never builds anything itself.

It is a plain module (stdlib + subprocess, no pytest import) so fixtures and ad-hoc scripts can
both use it::

    with ApiServer() as api:
        install_crd(api.kubeconfig, Path("crd.yaml").read_text())
        kubectl(api.kubeconfig, "get", "widgets")
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

K8S_VERSION = "v1.20.2"
BUILD_SCRIPT = "hack/build-apiserver.sh"
TEST_USER = "kubetune-test-user"
ADMIN_USER = "kubetune-admin"
OPERATOR_SERVICE_ACCOUNT = ("kubetune-system", "kubetune-operator")
"""(namespace, name) of the operator's ServiceAccount in the Helm chart: registered by default."""
ADMISSION_PLUGINS = ("OwnerReferencesPermissionEnforcement",)
"""Admission plugins enabled on top of the defaults. OwnerReferencesPermissionEnforcement makes
an ownerReference with ``blockOwnerDeletion: true`` (which kubetune's builders set) require
``update`` on the owner's ``finalizers`` subresource, as on most production clusters, so RBAC
proofs on this tier are honest."""


def service_account_username(namespace: str, name: str) -> str:
    """The user name Kubernetes gives a ServiceAccount's tokens."""
    return f"system:serviceaccount:{namespace}:{name}"


class BinariesMissing(RuntimeError):
    """kube-apiserver / etcd are not available; run hack/build-apiserver.sh (or set KUBEBUILDER_ASSETS)."""


class ApiServerError(RuntimeError):
    """The control plane failed to start or become ready."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl call failed; unlike CalledProcessError, str() includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}"


# ------------------------------------------------------------------------------------------
# Binaries
# ------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where hack/build-apiserver.sh puts its output (same rule as the script)."""
    if os.environ.get("KUBETUNE_K8S_CACHE"):
        return Path(os.environ["KUBETUNE_K8S_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kubetune" / f"k8s-{K8S_VERSION}"


def find_binaries() -> tuple[Path, Path]:
    """Return (kube-apiserver, etcd). Never builds.

    ``KUBEBUILDER_ASSETS`` wins when set (and must then contain both binaries); otherwise the
    build cache is used; otherwise :class:`BinariesMissing` is raised.
    """
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        apiserver, etcd = Path(assets) / "kube-apiserver", Path(assets) / "etcd"
        missing = [str(p) for p in (apiserver, etcd) if not os.access(p, os.X_OK)]
        if missing:
            raise BinariesMissing(f"KUBEBUILDER_ASSETS={assets} is set but lacks executable {', '.join(missing)}")
        return apiserver, etcd
    bindir = cache_dir() / "bin"
    apiserver, etcd = bindir / "kube-apiserver", bindir / "etcd"
    if os.access(apiserver, os.X_OK) and os.access(etcd, os.X_OK):
        return apiserver, etcd
    raise BinariesMissing(
        f"kube-apiserver/etcd not found in {bindir}: run `{BUILD_SCRIPT}` once (about 4-7 "
        "minutes, builds kube-apiserver v1.20.2 from Debian sources), or set KUBEBUILDER_ASSETS "
        "to a directory holding kube-apiserver and etcd (e.g. from setup-envtest)."
    )


@functools.cache
def _help_text(binary: str) -> str:
    """The binary's --help output (to probe which flags this version supports)."""
    proc = subprocess.run([binary, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    return proc.stdout


def _supports(binary: Path, flag: str) -> bool:
    return f"--{flag}" in _help_text(str(binary))


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on `host` (all sockets held open until every port is picked)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _generate_rsa_key(path: Path) -> None:
    """Write a PEM RSA private key (service-account signing key) to ``path``."""
    openssl = shutil.which("openssl")
    if openssl:
        subprocess.run(
            [openssl, "genrsa", "-out", str(path), "2048"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    else:
        try:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise ApiServerError(
                "need either the openssl CLI or the python 'cryptography' package to create the service-account key"
            ) from exc
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    if not path.is_file() or path.stat().st_size == 0:
        raise ApiServerError(f"service-account key was not created at {path}")
    path.chmod(0o600)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _insecure_ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def api_request(
    base_url: str,
    token: str,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> tuple[int, dict[str, Any]]:
    """One JSON call to an API server with a bearer token: (HTTP status, decoded body). Error
    answers are returned, not raised (a test asserts on a 422's Status as on a 201's object)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base_url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_insecure_ssl_context()) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text or b"{}")
        except ValueError:
            return exc.code, {"message": text.decode(errors="replace")}


# ------------------------------------------------------------------------------------------
# The control plane
# ------------------------------------------------------------------------------------------


class ApiServer:
    """etcd + kube-apiserver on loopback, for one test session (use as a context manager).

    After :meth:`start`: ``url`` (https://127.0.0.1:PORT), ``token`` (admin, group
    system:masters, bypasses RBAC), ``user_token`` (user ``kubetune-test-user``, no groups:
    RBAC applies), ``kubeconfig`` (a file using the admin token). Authorization is RBAC, so
    tests can also check permissions with ``kubectl auth can-i --as=...``.

    ServiceAccount identities without a kube-controller-manager: this tier has no token
    controller, so a ServiceAccount gets no token Secret. Instead, each (namespace, name) in
    ``service_accounts`` (default: only ``kubetune-system/kubetune-operator``, the chart's
    operator) gets a bearer token in the static token file, with the user name and groups a
    real ServiceAccount token authenticates as (``system:serviceaccount:NS:NAME``; groups
    ``system:serviceaccounts``, ``system:serviceaccounts:NS``, plus ``system:authenticated``
    which the apiserver adds). RoleBindings whose subject is that ServiceAccount then apply to
    it exactly as on a cluster. The token file is read once at start-up, so only identities
    registered at construction exist: see :meth:`service_account_token` and
    :meth:`service_account_kubeconfig`. (The ServiceAccount object itself need not exist.)

    Admission: ``ADMISSION_PLUGINS`` are enabled on top of 1.20's defaults; ServiceAccount
    admission is disabled by default (``disable_admission_plugins``): without a
    kube-controller-manager there is no token controller (tests/cluster_harness.py runs one and
    turns it back on).
    """

    def __init__(
        self,
        binaries: tuple[Path, Path] | None = None,
        ready_timeout: float = 60.0,
        extra_apiserver_args: Sequence[str] = (),
        service_accounts: Iterable[tuple[str, str]] = (OPERATOR_SERVICE_ACCOUNT,),
        disable_admission_plugins: Sequence[str] = ("ServiceAccount",),
    ) -> None:
        self._binaries = binaries
        self.disable_admission_plugins = tuple(disable_admission_plugins)
        self.ready_timeout = ready_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.service_accounts: tuple[tuple[str, str], ...] = tuple(dict.fromkeys(service_accounts))
        self._sa_tokens: dict[tuple[str, str], str] = {}
        self.tmpdir: Path | None = None
        self.url: str = ""
        self.token: str = ""
        self.user_token: str = ""
        self.kubeconfig: Path = Path()
        self.etcd_url: str = ""
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Path] = {}
        self._started_pids: list[int] = []
        self.startup_seconds: float | None = None

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- public API ------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """PIDs of every process this instance started (kept after stop(), for assertions)."""
        return list(self._started_pids)

    def service_account_token(self, namespace: str, name: str) -> str:
        """Bearer token of ServiceAccount ``namespace/name`` (registered at construction)."""
        try:
            return self._sa_tokens[(namespace, name)]
        except KeyError:
            registered = ", ".join(f"{ns}/{n}" for ns, n in self.service_accounts) or "none"
            raise KeyError(
                f"ServiceAccount {namespace}/{name} has no token: the static token file is read at "
                f"start-up; pass service_accounts=[...] to ApiServer() (registered: {registered})"
            ) from None

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig authenticating as ServiceAccount ``namespace/name`` (its default
        namespace is ``namespace``), for kubectl, the kubernetes client or an operator process.
        Only identities registered at construction work (see the class docstring)."""
        token = self.service_account_token(namespace, name)
        assert self.tmpdir is not None
        path = self.tmpdir / f"kubeconfig-sa-{namespace}-{name}"
        path.write_text(
            json.dumps(self._kubeconfig_dict(service_account_username(namespace, name), token, namespace), indent=2)
        )
        path.chmod(0o600)
        return path

    def start(self) -> None:
        if self._procs:
            raise ApiServerError("already started")
        t0 = time.monotonic()
        apiserver_bin, etcd_bin = self._binaries or find_binaries()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="kubetune-apiserver-"))
        atexit.register(self.stop)
        try:
            self._start(apiserver_bin, etcd_bin)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM each process group, SIGKILL after 10 s, wait, remove the temp dir."""
        atexit.unregister(self.stop)
        # apiserver first, so it does not spin on a vanished etcd.
        for name in ("kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                self._terminate(proc)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # the process is its own group leader
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
        # Reap; and make sure nothing else is left in the group (e.g. an orphaned child).
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        assert self.tmpdir is not None
        log = self.tmpdir / f"{name}.log"
        self._logs[name] = log
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                start_new_session=True,  # own session => own process group
            )
        self._procs[name] = proc
        self._started_pids.append(proc.pid)
        return proc

    def _fail(self, message: str) -> ApiServerError:
        parts = [message]
        for name, log in self._logs.items():
            parts.append(f"--- last lines of {name} log ({log}) ---\n{_tail(log)}")
        return ApiServerError("\n".join(parts))

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise self._fail(f"{name} exited early with status {proc.returncode}")

    def _wait_for(self, what: str, probe: Any, deadline: float) -> None:
        last = "no attempt"
        while True:
            self._check_alive()
            try:
                if probe():
                    return
                last = "not ready"
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise self._fail(f"{what} not ready after {self.ready_timeout:g} s (last probe: {last})")
            time.sleep(0.2)

    def _get(self, path: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=_insecure_ssl_context()) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _start(self, apiserver_bin: Path, etcd_bin: Path) -> None:
        assert self.tmpdir is not None
        tmp = self.tmpdir
        deadline = time.monotonic() + self.ready_timeout
        etcd_port, peer_port, api_port = free_ports(3)

        # --- etcd ---
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd_args = [
            str(etcd_bin),
            "--name=kubetune",
            f"--data-dir={tmp / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kubetune={peer_url}",
            "--initial-cluster-state=new",
        ]
        if _supports(etcd_bin, "unsafe-no-fsync"):
            etcd_args.append("--unsafe-no-fsync")  # test data is disposable; fsync is slow
        self._spawn("etcd", etcd_args)

        # --- credentials for the apiserver ---
        sa_key = tmp / "sa.key"
        _generate_rsa_key(sa_key)
        self.token = secrets.token_hex(16)
        self.user_token = secrets.token_hex(16)
        self._sa_tokens = {sa: secrets.token_hex(16) for sa in self.service_accounts}
        tokens = tmp / "tokens.csv"
        # token,user,uid,"group1,group2"
        lines = [
            f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"',
            f"{self.user_token},{TEST_USER},{TEST_USER}",
        ]
        for (sa_ns, sa_name), sa_token in self._sa_tokens.items():
            user = service_account_username(sa_ns, sa_name)
            lines.append(f'{sa_token},{user},{user},"system:serviceaccounts,system:serviceaccounts:{sa_ns}"')
        tokens.write_text("\n".join(lines) + "\n")
        tokens.chmod(0o600)
        (tmp / "certs").mkdir()

        # Wait for etcd before starting the apiserver (saves its retry back-off).
        def etcd_healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                return json.loads(r.read()).get("health") in ("true", True)

        self._wait_for("etcd", etcd_healthy, deadline)

        # --- kube-apiserver ---
        self.url = f"https://127.0.0.1:{api_port}"
        api_args = [
            str(apiserver_bin),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={tmp / 'certs'}",  # self-signed serving cert is generated here
            f"--service-account-key-file={sa_key}",
            f"--service-account-signing-key-file={sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            f"--enable-admission-plugins={','.join(ADMISSION_PLUGINS)}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
        ]
        if self.disable_admission_plugins:
            api_args.append(f"--disable-admission-plugins={','.join(self.disable_admission_plugins)}")
        if _supports(apiserver_bin, "insecure-port"):
            api_args.append("--insecure-port=0")  # 1.20 still has an HTTP port; turn it off
        api_args += self.extra_apiserver_args
        self._spawn("kube-apiserver", api_args)

        self._write_kubeconfig()

        def apiserver_ready() -> bool:
            status, body = self._get("/readyz", self.token)
            if status != 200:
                raise ApiServerError(f"/readyz {status}: {body[-300:]!r}")
            # The "default" namespace is created by a bootstrap controller shortly after.
            status, _ = self._get("/api/v1/namespaces/default", self.token)
            return status == 200

        self._wait_for("kube-apiserver", apiserver_ready, deadline)

    def _kubeconfig_dict(self, user: str, token: str, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubetune", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "kubetune",
                    "context": {"cluster": "kubetune", "user": user, "namespace": namespace},
                }
            ],
            "current-context": "kubetune",
        }

    def _write_kubeconfig(self) -> None:
        assert self.tmpdir is not None
        config = self._kubeconfig_dict(ADMIN_USER, self.token)
        self.kubeconfig = self.tmpdir / "kubeconfig"
        # JSON is valid YAML; kubectl and the kubernetes client both read it.
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)


# ------------------------------------------------------------------------------------------
# kubectl and CRDs
# ------------------------------------------------------------------------------------------


def _kubectl_binary() -> str:
    return os.environ.get("KUBECTL") or shutil.which("kubectl") or "/usr/bin/kubectl"


def kubectl(
    kubeconfig: Path | str,
    *args: str,
    input: str | None = None,
    check: bool = True,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run the real kubectl against ``kubeconfig``; text output is captured.

    The discovery cache goes next to the kubeconfig (not ~/.kube/cache), so runs on reused
    ports never see a stale cache. Raises :class:`KubectlError` (with stderr) when check fails.
    """
    kubeconfig = Path(kubeconfig)
    argv = [
        _kubectl_binary(),
        f"--kubeconfig={kubeconfig}",
        f"--cache-dir={kubeconfig.parent / 'kubectl-cache'}",
        *args,
    ]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise KubectlError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def _strip_key(node: Any, key: str) -> Any:
    """Copy of a JSON-like tree with every mapping entry named ``key`` removed, at any depth."""
    if isinstance(node, dict):
        return {k: _strip_key(v, key) for k, v in node.items() if k != key}
    if isinstance(node, list):
        return [_strip_key(v, key) for v in node]
    return node


def _yaml_to_objects(kubeconfig: Path, text: str) -> list[dict[str, Any]]:
    """Parse (multi-document) YAML; PyYAML if importable, else kubectl's client-side dry run."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        out = kubectl(
            kubeconfig,
            "create",
            "--dry-run=client",
            "--validate=false",
            "-o",
            "json",
            "-f",
            "-",
            input=text,
        ).stdout
        obj = json.loads(out)
        return list(obj["items"]) if obj.get("kind") == "List" else [obj]
    return [doc for doc in yaml.safe_load_all(text) if doc]


def install_crd(kubeconfig: Path | str, crd_yaml_text: str, timeout: float = 30) -> list[str]:
    """Apply CRD(s) from YAML text and wait until each is Established; return their names.

    Every ``x-kubernetes-validations`` key is stripped first: kube-apiserver 1.20 has no CEL
    (and kubectl's client-side validation would reject the unknown field); the offline CEL
    tests cover those rules.
    """
    kubeconfig = Path(kubeconfig)
    objs = [_strip_key(o, "x-kubernetes-validations") for o in _yaml_to_objects(kubeconfig, crd_yaml_text)]
    names: list[str] = []
    for obj in objs:
        if obj.get("kind") != "CustomResourceDefinition":
            raise ValueError(f"install_crd expects CustomResourceDefinitions, got {obj.get('kind')}")
        names.append(obj["metadata"]["name"])
    doc = {"apiVersion": "v1", "kind": "List", "items": objs}
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(doc))
    # Polled here rather than with `kubectl wait --for=condition=Established`: Debian's kubectl
    # fails at once ("accessor error: <nil>") when it reads the CRD before the server wrote any
    # status.conditions, which a loaded machine makes likely.
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = json.loads(kubectl(kubeconfig, "get", f"crd/{name}", "-o", "json").stdout)
            conditions = (crd.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established after {timeout:.0f} s: {conditions}")
            time.sleep(0.2)
    return names


def alive(pids: Iterable[int]) -> list[int]:
    """The subset of ``pids`` that still exist (zombies excluded), for leak assertions."""
    result = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            result.append(pid)
    return result
