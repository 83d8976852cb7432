"""The committed CRD on a current API server: installed with every CEL rule, enforced case for case.

The CRD lives on the Kubernetes 1.36 CRD server (tests/cluster_harness.py), which compiles and
runs the CEL rules exactly as every current kube-apiserver does; requests reach it through the
1.20 apiserver's aggregation layer, as kubectl's and the operator's do. This is the tier that
would have caught our first CRD, which every current server refused ("unable to convert structural
schema to CEL declarations": a rule on an untyped node). tests/api keeps the offline twin
(openapi-schema-validator + cel-python) as the fast tier.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from kubetune.api.manifest import load_documents
from kubetune.api.resource import json_problems, parse_manifest

from tests.api.test_fuzz_manifests import mutated
from tests.api.test_invalid_manifests import CANONICAL, CASES, mutate
from tests.cluster.conftest import CRD_FILE, REPO
from tests.cluster_harness import Cluster, CrdRefused
from tests.k8s_harness import api_request, kubectl

CEL = "x-kubernetes-validations"
FTJ_PATH = "/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs"


def request(
    cluster: Cluster, method: str, path: str, body: Any = None, content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    """A request through the 1.20 apiserver (aggregated to the CRD server for kubetune.io)."""
    assert cluster.api is not None
    return api_request(cluster.api.url, cluster.api.token, method, path, body, content_type)


def create(cluster: Cluster, namespace: str, obj: dict[str, Any], dry_run: bool = True) -> tuple[int, dict[str, Any]]:
    """POST a FineTuneJob as kubectl does by default (strict field validation), dry-run."""
    query = "?fieldValidation=Strict" + ("&dryRun=All" if dry_run else "")
    return request(cluster, "POST", FTJ_PATH.format(ns=namespace) + query, obj)


def causes(status: dict[str, Any]) -> list[str]:
    """The field paths a refusal names, as our wire paths: a 422's causes (schema and CEL), or
    the fields of a 400 "strict decoding error: unknown field" (strict field validation)."""
    fields = [str(c.get("field", "")).lstrip(".") for c in (status.get("details") or {}).get("causes") or []]
    return fields + re.findall(r'unknown field "([^"]+)"', str(status.get("message", "")))


def rules(node: Any) -> int:
    if isinstance(node, dict):
        return len(node.get(CEL, [])) + sum(rules(v) for v in node.values())
    if isinstance(node, list):
        return sum(rules(v) for v in node)
    return 0


def test_committed_crd_is_established_with_every_rule(cluster: Cluster) -> None:
    code, version = cluster.crd_server_request("GET", "/version")
    assert code == 200 and (version["major"], version["minor"]) == ("1", "36"), version
    code, stored = cluster.crd_server_request(
        "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.kubetune.io"
    )
    assert code == 200
    conds = {c["type"]: c["status"] for c in stored["status"]["conditions"]}
    assert conds["Established"] == "True" and conds["NamesAccepted"] == "True", conds
    committed = yaml.safe_load(CRD_FILE.read_text())
    assert rules(stored["spec"]) == rules(committed["spec"]) >= 25  # nothing stripped
    # ... and the group answers through the 1.20 apiserver, the way users reach it.
    out = kubectl(cluster.kubeconfig, "api-resources", "--api-group=kubetune.io", "-o", "wide").stdout
    assert "finetunejobs" in out and "ftj" in out


def test_a_rule_on_an_untyped_node_is_refused(cluster: Cluster) -> None:
    """The bug this tier exists for: the CRD server refuses the shape our first CRD had."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    crd["metadata"]["name"] = "oldfinetunejobs.kubetune.io"
    crd["spec"]["names"] = {
        "kind": "OldFineTuneJob",
        "listKind": "OldFineTuneJobList",
        "plural": "oldfinetunejobs",
        "singular": "oldfinetunejob",
    }
    hp = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["hyperparameters"]
    hp["properties"]["learningRate"] = {
        "description": "a number or auto",
        "x-kubernetes-preserve-unknown-fields": True,
        CEL: [{"rule": "type(self) == string ? self == 'auto' : self > 0", "message": "must be > 0 or auto"}],
    }
    with pytest.raises(CrdRefused) as refused:
        cluster.install_crd(yaml.safe_dump(crd), timeout=10)
    assert refused.value.status == 422
    assert "learningRate" in refused.value.message and "CEL" in refused.value.message, refused.value.message


def example_files() -> list[Path]:
    return sorted((REPO / "examples").rglob("*.yaml"))


def test_every_example_is_accepted(cluster: Cluster, cluster_namespace: str) -> None:
    accepted = []
    for path in example_files():
        for doc in load_documents(path):
            if doc.data.get("kind") != "FineTuneJob":
                continue
            obj = copy.deepcopy(doc.data)
            obj["metadata"]["namespace"] = cluster_namespace  # some examples name their team's namespace
            code, answer = create(cluster, cluster_namespace, obj)
            assert code == 201, f"{doc.where}: HTTP {code}: {answer.get('message')}"
            accepted.append(doc.where)
    assert len(accepted) >= 30, accepted


@pytest.mark.parametrize(("changes", "path"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_manifest_is_refused_by_the_server_at_path(
    cluster: Cluster, changes: dict[str, Any], path: str
) -> None:
    """Each case of the models' table, refused by the API server itself (schema, strict field
    validation or CEL) with a cause at the models' wire path or below it."""
    code, status = create(cluster, "default", mutate(CANONICAL, changes))
    assert code in (400, 422), (code, status.get("message"))  # 400: an unknown field (strict decoding)
    fields = causes(status)
    assert any(f == path or f.startswith(path + ".") or f.startswith(path + "[") for f in fields), (
        path,
        fields,
        status.get("message"),
    )


def test_canonical_manifest_is_accepted(cluster: Cluster) -> None:
    code, answer = create(cluster, "default", CANONICAL)
    assert code == 201, answer


def test_cel_rules_are_what_refuses(cluster: Cluster) -> None:
    """Cross-field cases no schema keyword can express come back with the CEL rule's own message."""
    code, status = create(
        cluster,
        "default",
        mutate(CANONICAL, {"spec.dataset.validation": "s3://d/v.jsonl", "spec.dataset.validationSplit": 0.1}),
    )
    assert code == 422 and "set either validation (a separate file) or validationSplit" in status["message"], status


# --------------------------------------------------------------------------- immutability


def _started(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = mutate(CANONICAL, {"metadata.name": name})
    code, created = create(cluster, namespace, obj, dry_run=False)
    assert code == 201, created
    status_path = f"{FTJ_PATH.format(ns=namespace)}/{name}/status"
    code, patched = request(
        cluster,
        "PATCH",
        status_path,
        {"status": {"phase": "Running", "startTime": "2026-12-02T10:00:00Z"}},
        "application/merge-patch+json",
    )
    assert code == 200 and patched["status"]["startTime"] == "2026-12-02T10:00:00Z", patched
    return patched


@pytest.mark.parametrize(
    ("patch", "allowed"),
    [
        ({"spec": {"model": {"source": "hf://mistralai/Mistral-7B-v0.3"}}}, False),
        ({"spec": {"hyperparameters": {"learningRate": 1e-4}}}, False),
        ({"spec": {"method": {"lora": {"r": 32}}}}, False),
        ({"spec": {"resources": {"gpus": 4}}}, False),
        ({"spec": {"suspend": True}}, True),
        ({"spec": {"scheduling": {"priorityClassName": "high"}}}, True),
    ],
    ids=["model", "learning-rate", "lora-rank", "resources", "suspend", "scheduling"],
)
def test_spec_is_frozen_once_started(
    cluster: Cluster, cluster_namespace: str, patch: dict[str, Any], allowed: bool
) -> None:
    """The root transition rule (oldSelf), which cel-python cannot run, enforced by the server."""
    name = "frozen-" + "-".join(sorted(patch["spec"])).lower()
    _started(cluster, cluster_namespace, name)
    code, answer = request(
        cluster,
        "PATCH",
        f"{FTJ_PATH.format(ns=cluster_namespace)}/{name}",
        copy.deepcopy(patch),
        "application/merge-patch+json",
    )
    if allowed:
        assert code == 200, answer
    else:
        assert code == 422, answer
        assert "spec is immutable once training has started" in answer["message"], answer["message"]


def test_spec_is_editable_before_start(cluster: Cluster, cluster_namespace: str) -> None:
    obj = mutate(CANONICAL, {"metadata.name": "not-started"})
    code, _ = create(cluster, cluster_namespace, obj, dry_run=False)
    assert code == 201
    code, answer = request(
        cluster,
        "PATCH",
        f"{FTJ_PATH.format(ns=cluster_namespace)}/not-started",
        {"spec": {"model": {"source": "hf://mistralai/Mistral-7B-v0.3"}}},
        "application/merge-patch+json",
    )
    assert code == 200 and answer["spec"]["model"]["source"].endswith("v0.3"), answer


# ------------------------------------------------------------------- fuzzed, against the server

REAL_FUZZ = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


@REAL_FUZZ
@given(mutated())
def test_fuzzed_manifests_models_agree_with_the_real_server(cluster: Cluster, obj: dict[str, Any]) -> None:
    """The offline fuzz test's manifests (tests/api/test_fuzz_manifests.py), a fixed 300, sent to
    the 1.36 server: it accepts exactly what the models accept. (Values JSON cannot carry are
    left out: they never reach a server.)"""
    if json_problems(obj):
        return
    job, problems = parse_manifest(obj)
    code, answer = create(cluster, "default", obj)
    assert code in (201, 400, 422), (code, answer)
    assert (job is not None) == (code == 201), (problems, answer.get("message"))
