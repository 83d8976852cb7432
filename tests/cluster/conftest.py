"""Fixtures of the cluster tier: one real single-node cluster for tests/cluster (tests/cluster_harness.py).

The fixtures are package-scoped: the cluster and dockerd stop when the last test of this directory
has run, so they do not take CPU from the rest of the suite.

What runs: the 1.20 control plane (apiserver, controller-manager, scheduler, kubelet on Docker)
and the 1.36 CRD server aggregated for kubetune.io, with the committed CRD installed *with* its
CEL rules; the operator and trainer images built from the committed Dockerfiles.

Inputs come from caches that ``make cluster-tools`` fills (hack/build-apiserver.sh,
hack/build-crd-server.sh, hack/build-base-images.sh, Debian's docker.io); nothing is built here
except the two images. When an input is missing:

* with ``CI`` set every test of this tier fails: the tier is mandatory in CI;
* locally with ``KUBETUNE_SKIP_CLUSTER=1`` the tier is skipped, and the run's summary says so;
* otherwise every test fails with the message naming the script to run.

Every test collected under tests/cluster gets the ``cluster`` marker (``-m "not cluster"``
deselects the tier).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster_harness import (
    OPERATOR_BASE,
    OPERATOR_IMAGE,
    TRAINER_BASE,
    TRAINER_IMAGE,
    BinariesMissing,
    Cluster,
    Dockerd,
    WheelServer,
    build_image,
    import_bases,
    local_torch_wheel_dir,
)
from tests.k8s_harness import kubectl

CLUSTER_DIR = Path(__file__).resolve().parent
REPO = CLUSTER_DIR.parents[1]
CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
TRAINER_SERVICE_ACCOUNT = "kubetune-trainer"
SKIP_REASON = "cluster tier skipped: KUBETUNE_SKIP_CLUSTER=1 and its inputs are missing; run `make tools`"
_skipped: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.path).resolve().is_relative_to(CLUSTER_DIR):
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped:
        terminalreporter.write_sep("-", _skipped[0], yellow=True)


def _missing(message: str) -> None:
    if _in_ci():
        pytest.fail(f"the cluster tier is mandatory in CI (CI is set): {message}", pytrace=False)
    if os.environ.get("KUBETUNE_SKIP_CLUSTER") == "1":
        if not _skipped:
            _skipped.append(SKIP_REASON)
        pytest.skip(SKIP_REASON)
    pytest.fail(f"{message} (or set KUBETUNE_SKIP_CLUSTER=1 to skip the cluster tier locally)", pytrace=False)


@pytest.fixture(scope="package")
def docker_daemon() -> Iterator[Dockerd]:
    daemon = Dockerd()
    failure = None
    try:
        daemon.start()
    except BinariesMissing as exc:
        failure = str(exc)
    if failure:
        _missing(failure)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="package")
def cluster(docker_daemon: Dockerd) -> Iterator[Cluster]:
    """The session's cluster with the committed CRD (CEL included) on the 1.36 CRD server."""
    failure = None
    try:
        c = Cluster(docker_daemon)
    except BinariesMissing as exc:
        failure = str(exc)
    if failure:
        _missing(failure)
    c.start()
    try:
        c.install_crd(CRD_FILE.read_text())
        yield c
    finally:
        c.stop()


@dataclass(frozen=True)
class BuiltImages:
    """The two images built from the committed Dockerfiles in this session."""

    operator: str
    trainer: str
    seconds: dict[str, float]
    bytes: dict[str, int]


@pytest.fixture(scope="package")
def images(docker_daemon: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> BuiltImages:
    """Both committed Dockerfiles, unmodified; only their base-image build arguments change, since
    the digest-pinned bases cannot be pulled here: operator/Dockerfile with PYTHON_IMAGE set to
    the debootstrap base imported as python:3.11.11-slim-bookworm, trainer/Dockerfile with
    BASE_IMAGE set to the same Debian base instead of nvidia/cuda (no registry here, no GPU) and
    the machine's local CPU torch wheel offered through PIP_FIND_LINKS. Warm runs reuse Docker's layer cache on the persistent data
    root, so only the layers after a source change are rebuilt."""
    try:
        import_bases(docker_daemon)
    except BinariesMissing as exc:
        _missing(str(exc))
    wheels = local_torch_wheel_dir()
    if wheels is None:
        _missing("no local torch wheel (pip's find-links, e.g. /opt/wheels) to build the trainer image with")
    logs = tmp_path_factory.mktemp("image-builds")
    seconds = {
        "operator": build_image(
            docker_daemon,
            "operator/Dockerfile",
            OPERATOR_IMAGE,
            {"PYTHON_IMAGE": OPERATOR_BASE},
            log=logs / "operator.log",
        )
    }
    torch = sorted(wheels.glob("torch-*.whl"))[-1].name.split("-")[1]  # e.g. 2.13.0+cpu
    with WheelServer(wheels) as server:
        seconds["trainer"] = build_image(
            docker_daemon,
            "trainer/Dockerfile",
            TRAINER_IMAGE,
            {"BASE_IMAGE": TRAINER_BASE, "TORCH_VERSION": torch, "PIP_FIND_LINKS": server.url},
            log=logs / "trainer.log",
        )
    # The images these replaced (now untagged) would pile up on the persistent data root.
    docker_daemon.docker("image", "prune", "--force", timeout=300)
    sizes = {"operator": docker_daemon.image_size(OPERATOR_IMAGE), "trainer": docker_daemon.image_size(TRAINER_IMAGE)}
    record = {"seconds": seconds, "bytes": sizes, "bases": {"operator": OPERATOR_BASE, "trainer": TRAINER_BASE}}
    (logs / "images.json").write_text(json.dumps(record, indent=2))
    print(f"\nimages built: {json.dumps(record)}")
    return BuiltImages(OPERATOR_IMAGE, TRAINER_IMAGE, seconds, sizes)


@pytest.fixture
def cluster_namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace with the trainer ServiceAccount the chart creates (no token mounted);
    deleted afterwards, its objects collected by the real namespace controller."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"c-{base}-{secrets.token_hex(3)}"
    admin = cluster.kubeconfig
    kubectl(admin, "create", "namespace", name)
    sa = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": TRAINER_SERVICE_ACCOUNT, "namespace": name},
        "automountServiceAccountToken": False,
    }
    kubectl(admin, "apply", "-f", "-", input=json.dumps(sa))
    yield name
    kubectl(admin, "delete", "namespace", name, "--wait=false", check=False)


def wait_for(what: str, probe, timeout: float, interval: float = 0.5, diagnose=None):
    """Poll ``probe()`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{diagnose()}" if diagnose else ""
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r}){extra}")
