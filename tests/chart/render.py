"""Render charts/kubetune with Helm's own Go library (PyPI helm-python-sdk) into plain objects.

No helm binary can be installed here, but helm-python-sdk binds Helm v4's engine: the templates,
Sprig functions, `.Files` and the values schema behave exactly as in `helm install`. Each
scenario below is a values set the tests render; the chart is loaded once per process.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
RELEASE = "kt"
NAMESPACE = "kubetune-system"
WATCHED = ["team-a", "team-b"]
DIGEST = "sha256:" + "0123456789abcdef" * 4

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cluster-wide": {"watch": {"scope": "Cluster"}, "peering": {"enabled": True}},
    "namespaced": {"watch": {"scope": "Namespaced", "namespaces": WATCHED}},
    "monitoring": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "podMonitor": {"enabled": True},
        },
        "dashboards": {"enabled": True},
    },
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [443]},
            "trainer": {"egressCidrs": ["52.216.0.0/15"], "egressPorts": [443]},
        },
        "watch": {"scope": "Namespaced", "namespaces": WATCHED},
    },
    "digest": {"image": {"digest": DIGEST}, "trainer": {"image": {"digest": DIGEST}}},
}


@functools.lru_cache(maxsize=1)
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render_files(
    values: dict[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path → rendered text, as `helm template NAME -n NAMESPACE` prints them."""
    return chart().render(values or {}, name=name, namespace=namespace, is_install=True)


def render(
    values: dict[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object the chart renders with `values` (NOTES.txt and empty documents left out)."""
    return [
        doc
        for path, text in sorted(render_files(values, name=name, namespace=namespace).items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.load_all(text, Loader=yaml.CSafeLoader)  # libyaml: the CRD alone is 64 KB
        if doc
    ]


@functools.cache
def _scenario(name: str) -> list[dict[str, Any]]:
    return render(SCENARIOS[name])


def scenario(name: str) -> list[dict[str, Any]]:
    """The objects of a named scenario (rendered once, a fresh copy each call)."""
    return copy.deepcopy(_scenario(name))


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    """The operator's literal variables (POD_IP comes from the downward API: not listed)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}
