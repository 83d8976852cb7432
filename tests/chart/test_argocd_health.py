"""The Argo CD health check maps every FineTuneJob status to the right health (RELIABILITY O9).

charts/kubetune/argocd/health.lua runs here in real Lua through lupa, on each fixture under
tests/data/argocd/ (a status the operator writes, and the health and message Argo CD must show).
Argo CD runs health scripts in gopher-lua, a Lua 5.1 that hands JSON numbers over as floats; the
script is run in Lua 5.1 and 5.4, with numbers as Python gives them and as floats. The fixtures'
statuses are validated against the status model, so they cannot describe a status the operator
cannot write. docs/operations.md shows the script in argocd-cm; that copy must equal the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lupa.lua51
import lupa.lua54
import pytest
import yaml
from kubetune.api.spec import Serving
from kubetune.api.status import FineTuneJobStatus

from tests.chart.render import CHART, ROOT

SCRIPT = (CHART / "argocd" / "health.lua").read_text()
FIXTURES = sorted((ROOT / "tests" / "data" / "argocd").glob("*.yaml"))
ENGINES = {"lua5.1": lupa.lua51.LuaRuntime, "lua5.4": lupa.lua54.LuaRuntime}
HEALTH_KEY = "resource.customizations.health.kubetune.io_FineTuneJob"


def floats(value: Any) -> Any:
    """JSON numbers as gopher-lua sees them: every int a float."""
    if isinstance(value, dict):
        return {k: floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [floats(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def health(engine: str, obj: dict[str, Any]) -> dict[str, str]:
    lua = ENGINES[engine]()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPT)
    return {"status": hs["status"], "message": hs["message"]}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("as_floats", [False, True], ids=["ints", "floats"])
@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_health(path: Path, engine: str, as_floats: bool) -> None:
    case = load(path)
    obj = floats(case["object"]) if as_floats else case["object"]
    assert health(engine, obj) == case["expected"]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_status_is_one_the_operator_can_write(path: Path) -> None:
    obj = load(path)["object"]
    if obj.get("status") is not None:
        FineTuneJobStatus.model_validate(obj["status"])
    if (obj.get("spec") or {}).get("serving") is not None:  # the health reads spec.serving too
        Serving.model_validate(obj["spec"]["serving"])


def test_every_phase_and_health_is_covered() -> None:
    cases = [load(p) for p in FIXTURES]
    phases = {(c["object"].get("status") or {}).get("phase") for c in cases}
    assert phases >= {
        None,
        "Pending",
        "Validating",
        "Queued",
        "Running",
        "Succeeded",
        "Failed",
        "Cancelled",
        "Suspended",
    }
    assert {c["expected"]["status"] for c in cases} == {"Progressing", "Healthy", "Degraded", "Suspended"}


def test_serving_health_is_covered() -> None:
    """A Succeeded job with spec.serving: Healthy only when served, Progressing until then,
    Degraded for each failure reason of the Serving condition."""
    served = [load(p) for p in FIXTURES if "serving" in (load(p)["object"].get("spec") or {})]
    assert {c["expected"]["status"] for c in served} == {"Progressing", "Healthy", "Degraded"}
    for case in served:
        ready = (case["object"]["status"].get("serving") or {}).get("ready") is True
        assert (case["expected"]["status"] == "Healthy") == ready
    failures = {
        c["reason"]
        for case in served
        for c in case["object"]["status"]["conditions"]
        if case["expected"]["status"] == "Degraded"
    }
    assert {"ServingFailed", "ServingCRDMissing"} <= failures


def test_operations_doc_snippet_is_the_script() -> None:
    readme = (ROOT / "docs" / "operations.md").read_text()
    found = []
    for block in re.findall(r"```yaml\n(.*?)```", readme, flags=re.DOTALL):
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and HEALTH_KEY in (doc.get("data") or {}):
                found.append(doc["data"][HEALTH_KEY])
    assert found == [SCRIPT], "docs/operations.md's argocd-cm snippet differs from charts/kubetune/argocd/health.lua"
