"""RELIABILITY O11: record every (verb, resource) the operator uses across the operator suite.

Each fast-tier operator test (tests/fast/test_operator*.py) runs the real handlers against the
kmock emulator, whose request log carries the User-Agent: kopf's own requests say `kopf/…`, the
operator's child-object client says `kubetune-operator/…` and the test's setup requests say
neither. After each such test, this plugin folds the operator's requests into one set.

At the end of a session that ran *all* of those tests and saw them pass, the set is compared
with `tests/data/operator-api-usage.json` — the file the Helm chart's RBAC is checked against
(tests/chart) — and a difference fails the session, like a stale golden file. Regenerate with
`KUBETUNE_UPDATE_GOLDEN=1`. A partial run (`-k`, one file) checks nothing: it cannot know the set.

One permission is implied rather than requested: a child created with an ownerReference that
has `blockOwnerDeletion: true` needs `update` on the owner's `finalizers` subresource when the
API server runs the OwnerReferencesPermissionEnforcement admission plugin (most do).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.kmock_harness import verb_resource

USAGE_FILE = Path(__file__).resolve().parent / "data" / "operator-api-usage.json"
FAST_DIR = Path(__file__).resolve().parent / "fast"
OPERATOR_AGENTS = ("kopf/", "kubetune-operator/")
PEERING_GROUP = "kopf.dev"
OWNER = ("kubetune.io", "finetunejobs")
SERVING_SUFFIX = " serving"  # kubetune.operator.client.SERVING_AGENT

_used: set[tuple[str, str, str]] = set()
_serving: set[tuple[str, str, str]] = set()
_items: set[str] = set()
_passed: set[str] = set()
_deselected: list[str] = []


def _records(item: pytest.Item) -> bool:
    path = Path(item.path).resolve()
    return path.parent == FAST_DIR and path.name.startswith("test_operator")


def split(resource: str) -> tuple[str, str]:
    """`batch/v1/jobs` → (`batch`, `jobs`); `v1/pods` → (``, `pods`); subresources kept."""
    parts = resource.split("/")
    if parts[0] == "v1":
        return "", "/".join(parts[1:])
    return parts[0], "/".join(parts[2:])


def used_by_operator(requests: Any, serving: bool | None = None) -> set[tuple[str, str, str]]:
    """(verb, group, resource) of the operator's requests in a kmock request log; with `serving`
    True (False) only those spec.serving made (did not make): their User-Agent ends in ` serving`."""
    out: set[tuple[str, str, str]] = set()
    for record in requests:
        if not record.user_agent.startswith(OPERATOR_AGENTS):
            continue
        if serving is not None and record.user_agent.endswith(SERVING_SUFFIX) != serving:
            continue
        verb, resource = verb_resource(record)
        if resource.startswith("/"):  # discovery (/api, /apis/…): allowed to every authenticated user
            continue
        group, plural = split(resource)
        out.add((verb, group, plural))
        if verb == "create" and plural != "events" and group not in (OWNER[0], PEERING_GROUP):
            # a child object: ours carry blockOwnerDeletion (see the module docstring)
            out.add(("update", OWNER[0], f"{OWNER[1]}/finalizers"))
    return out


def as_document(
    used: set[tuple[str, str, str]], serving: set[tuple[str, str, str]] = frozenset()
) -> dict[str, list[dict[str, str]]]:
    """`always` and `peering` (kopf's peering calls) from the trainer-side requests; `serving`:
    what spec.serving's requests need beyond `always` (the chart grants it with serving.enabled)."""
    rows = sorted(used, key=lambda t: (t[1], t[2], t[0]))
    entry = lambda v, g, r: {"verb": v, "group": g, "resource": r}
    return {
        "always": [entry(*row) for row in rows if row[1] != PEERING_GROUP],
        "peering": [entry(*row) for row in rows if row[1] == PEERING_GROUP],
        "serving": [entry(*row) for row in sorted(serving - used, key=lambda t: (t[1], t[2], t[0]))],
    }


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _items.update(item.nodeid for item in items if _records(item))


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected.extend(item.nodeid for item in items if _records(item))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    kube = getattr(item, "funcargs", {}).get("kube")
    if _records(item) and kube is not None:
        _used.update(used_by_operator(list(kube.requests), serving=False))
        _serving.update(used_by_operator(list(kube.requests), serving=True))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid in _items and report.when == "call" and report.passed:
        _passed.add(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _items or _deselected or _passed != _items:
        return  # a partial or failing run: the set would be incomplete
    files = {nodeid.split("::", 1)[0].rsplit("/", 1)[-1] for nodeid in _items}
    if files != {path.name for path in FAST_DIR.glob("test_operator*.py")}:
        return  # some of the recording files were not collected (one file, -k on a path): partial
    document = as_document(_used, _serving)
    text = json.dumps(document, indent=2) + "\n"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        USAGE_FILE.write_text(text)
        return
    committed = USAGE_FILE.read_text() if USAGE_FILE.exists() else ""
    if committed != text:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "O11: the operator's API usage changed", red=True)
            reporter.write_line(
                f"{USAGE_FILE} is stale; rerun with KUBETUNE_UPDATE_GOLDEN=1 and update the chart's RBAC. Measured:"
            )
            reporter.write_line(text)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
