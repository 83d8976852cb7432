"""The chart installs the very CRD in crds/, byte for byte, plus the keep annotation.

The chart cannot read crds/ (outside the chart directory), so `make crd` writes a copy to
charts/kubetune/files/; if the two ever differed, a Helm install would serve another API than the
one the operator and `kubetune validate` enforce.
"""

from __future__ import annotations

import yaml

from tests.chart.render import CHART, ROOT, render, render_files

REPO_CRD = ROOT / "crds" / "finetunejobs.kubetune.io.yaml"
CHART_CRD = CHART / "files" / "finetunejobs.kubetune.io.yaml"
KEEP = "  annotations:\n    helm.sh/resource-policy: keep\n"


def test_chart_copy_is_byte_identical() -> None:
    assert CHART_CRD.read_bytes() == REPO_CRD.read_bytes(), "charts/kubetune/files/ is stale: run `make crd`"


def test_rendered_crd_is_the_repo_crd_plus_the_keep_annotation() -> None:
    rendered = render_files()["kubetune/templates/crd.yaml"]
    repo = REPO_CRD.read_text()
    assert rendered.count(KEEP) == 1
    assert rendered.replace(KEEP, "", 1) == repo
    # The annotation sits in the CRD's own metadata, nowhere else.
    crd = yaml.safe_load(rendered)
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    del crd["metadata"]["annotations"]
    assert crd == yaml.safe_load(repo)


def test_crd_is_optional() -> None:
    assert "kubetune/templates/crd.yaml" not in {
        k for k, v in render_files({"crds": {"install": False}}).items() if v.strip()
    }
    assert not [o for o in render({"crds": {"install": False}}) if o["kind"] == "CustomResourceDefinition"]
