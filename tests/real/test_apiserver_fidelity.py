"""The test apiserver must judge custom resources as a released kube-apiserver does.

kube-apiserver 1.20 built with Go >= 1.16 (hack/build-apiserver.sh uses Go 1.19) refuses an empty
string anywhere below a custom resource's top level: "spec.x.y: Invalid value: "null": ... must
be of type string: "null"" (kubernetes/kubernetes#99804: the vendored OpenAPI validator's
zero-value check, ``reflect.DeepEqual(reflect.Zero(...), reflect.ValueOf(data))``, became true
for every zero value once Go shared one zero buffer; fixed by kubernetes/kube-openapi#230,
released in 1.21). Released 1.20 binaries were built with Go 1.15 and accept "". A tier that is
stricter than any real cluster fails correct operators (a condition with ``message: ""`` made
every status patch of a finished FineTuneJob fail here, and kopf's timer died with it).

The build script must patch that check out and record it in ``bin/.patches``. Until the cached
binaries carry that record, this test is an expected failure (strict: once the cache is rebuilt
it must pass, and the marker must go). Binaries from ``KUBEBUILDER_ASSETS`` (envtest's, built
with a fixed validator) must always pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.k8s_harness import ApiServer, cache_dir, kubectl
from tests.real.e2e import quickstart_manifest

PATCH_MARKER = "kube-openapi-230"


def _cache_lacks_fix(apiserver_bin: Path) -> bool:
    if os.environ.get("KUBEBUILDER_ASSETS"):
        return False
    if apiserver_bin.parent != cache_dir() / "bin":
        return False
    marker = apiserver_bin.parent / ".patches"
    return not (marker.is_file() and PATCH_MARKER in marker.read_text().split())


def test_nested_empty_string_is_a_string(
    apiserver: ApiServer, namespace: str, k8s_binaries: tuple[Path, Path], request: pytest.FixtureRequest
) -> None:
    if _cache_lacks_fix(k8s_binaries[0]):
        request.applymarker(pytest.mark.xfail(
            strict=True,
            reason="cached kube-apiserver built without the kube-openapi#230 fix: add it to "
                   "hack/build-apiserver.sh (writing 'kube-openapi-230' to bin/.patches) and rebuild",
        ))
    doc = quickstart_manifest(None, {"spec.method.lora.targetModules": ["all-linear", ""]})
    created = kubectl(apiserver.kubeconfig, "create", "-n", namespace, "-o", "json", "-f", "-",
                      input=json.dumps(doc), check=False)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["spec"]["method"]["lora"]["targetModules"] == ["all-linear", ""]

    condition = {"type": "Running", "status": "False", "reason": "TrainingSucceeded", "message": "",
                 "lastTransitionTime": "2024-05-01T12:00:00Z"}
    patched = kubectl(apiserver.kubeconfig, "patch", "ftj", "quickstart", "-n", namespace, "--subresource=status",
                      "--type=merge", "-p", json.dumps({"status": {"conditions": [condition]}}), "-o", "json",
                      check=False)
    assert patched.returncode == 0, patched.stderr
    assert json.loads(patched.stdout)["status"]["conditions"] == [condition]
