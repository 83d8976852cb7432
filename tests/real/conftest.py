"""Fixtures for the real tier: one kube-apiserver + etcd per session (tests/k8s_harness.py).

Binaries come from ``$KUBEBUILDER_ASSETS`` when set, else from the cache that
``hack/build-apiserver.sh`` fills; nothing is ever built here. When they are missing:

* with ``CI`` set (``CI=true``) every test of this tier fails: the tier is mandatory in CI;
* locally with ``KUBETUNE_SKIP_REAL=1`` the tier is skipped, and the run's summary says so;
* otherwise every test fails with the message explaining how to get the binaries.

Every test collected under tests/real gets the ``real`` marker (``-m "not real"`` deselects it).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s_harness import ApiServer, BinariesMissing, find_binaries, install_crd, kubectl

REAL_DIR = Path(__file__).resolve().parent
REPO = REAL_DIR.parents[1]
CRD_DIR = REPO / "crds"

SKIP_REASON = "real apiserver tier skipped: KUBETUNE_SKIP_REAL=1 and no binaries; run hack/build-apiserver.sh"
_skipped: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's: filter by path.
    for item in items:
        if Path(item.path).resolve().is_relative_to(REAL_DIR):
            item.add_marker(pytest.mark.real)
            # The test apiserver's certificate is self-signed: verification is off on purpose.
            item.add_marker(pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped:  # make the skip visible even without -rs
        terminalreporter.write_sep("-", _skipped[0], yellow=True)


@pytest.fixture(scope="session")
def k8s_binaries() -> tuple[Path, Path]:
    """(kube-apiserver, etcd), or fail / skip as described in the module docstring."""
    try:
        return find_binaries()
    except BinariesMissing as exc:
        missing = str(exc)  # pytest.fail/skip outside the except: no chained traceback
    if _in_ci():
        pytest.fail(f"the real apiserver tier is mandatory in CI (CI is set): {missing}", pytrace=False)
    if os.environ.get("KUBETUNE_SKIP_REAL") == "1":
        if not _skipped:
            _skipped.append(SKIP_REASON)
        pytest.skip(SKIP_REASON)
    pytest.fail(
        f"{missing} (or set KUBETUNE_SKIP_REAL=1 to skip the real apiserver tier locally)",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def apiserver(k8s_binaries: tuple[Path, Path]) -> Iterator[ApiServer]:
    """The session's kube-apiserver with the FineTuneJob CRD installed (CEL stripped: 1.20)."""
    api = ApiServer(binaries=k8s_binaries)
    api.start()
    try:
        crd_text = "\n---\n".join(p.read_text() for p in sorted(CRD_DIR.glob("*.yaml")))
        install_crd(api.kubeconfig, crd_text)
        yield api
    finally:
        api.stop()


@pytest.fixture
def namespace(apiserver: ApiServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test; deleted afterwards without waiting.

    (This tier runs no kube-controller-manager, so a deleted namespace stays Terminating and its
    objects stay in etcd until the session's apiserver goes away; names are unique per test.)
    """
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{base}-{secrets.token_hex(3)}"
    kubectl(apiserver.kubeconfig, "create", "namespace", name)
    yield name
    kubectl(apiserver.kubeconfig, "delete", "namespace", name, "--wait=false", check=False)
