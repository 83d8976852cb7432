"""Every example manifest is valid to the models (`kubetune validate`) and to the CRD offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubetune.api import Adaptation, Objective
from kubetune.api.enums import ServingEngine
from kubetune.api.manifest import is_finetunejob, load_documents

from tests.crd_offline import validate as crd_validate

EXAMPLES = sorted(Path("examples").rglob("*.yaml"))
CRD = yaml.safe_load(Path("crds/finetunejobs.kubetune.io.yaml").read_text())


def jobs() -> list[tuple[str, dict]]:
    return [(doc.where, doc.data) for path in EXAMPLES for doc in load_documents(path) if is_finetunejob(doc.data)]


def test_kubetune_validate_accepts_every_example() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", *map(str, EXAMPLES)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(": ok (FineTuneJob") == len(jobs())


@pytest.mark.parametrize(("where", "data"), jobs(), ids=[w for w, _ in jobs()])
def test_crd_accepts_example(where: str, data: dict) -> None:
    assert crd_validate(CRD, data) == []


def test_examples_cover_every_method_and_variant() -> None:
    adaptations, objectives, features, engines = set(), set(), set(), set()
    for _, data in jobs():
        spec = data["spec"]
        adaptations.add(spec["method"]["adaptation"])
        objectives.update(o["type"] for o in spec["method"].get("objectives", []))
        scheduling = spec.get("scheduling", {})
        if scheduling.get("queueName"):
            features.add("kueue")
        if scheduling.get("schedulerName") == "volcano":
            features.add("volcano")
        if spec.get("resources", {}).get("nodes", 1) > 1:
            features.add("multi-node")
        if spec.get("resources", {}).get("gpus", 1) > 1:
            features.add("multi-gpu")
        if "serving" in spec:
            engines.add(spec["serving"]["engine"])
            if spec["method"]["adaptation"] not in ("lora", "qlora"):
                features.add("served-merged")
    assert adaptations >= {a.value for a in Adaptation}
    assert objectives >= {o.value for o in Objective}
    assert features >= {"kueue", "volcano", "multi-node", "multi-gpu", "served-merged"}
    assert engines == {e.value for e in ServingEngine}
