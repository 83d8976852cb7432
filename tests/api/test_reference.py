"""docs/api.md is `kubetune crd --markdown`'s output and lists every field of the CRD with what it
says about it: description, type, default, enum and bounds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from kubetune.api.crd import crd
from kubetune.api.reference import anchor, markdown

from tests.api.test_crd import walk

API_MD = Path("docs/api.md")


def test_committed_api_reference_is_fresh() -> None:
    assert API_MD.read_text() == markdown(), "docs/api.md is stale: run `make crd` (or `make docs-api`)"


def test_kubetune_crd_markdown_prints_the_committed_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "crd", "--markdown"], capture_output=True, text=True, check=True
    )
    assert out.stdout == API_MD.read_text()


def _rows() -> dict[str, list[str]]:
    """wire path → the cells of its row, read back from the Markdown."""
    rows: dict[str, list[str]] = {}
    section = ""
    for line in markdown().splitlines():
        if line.startswith("### "):
            section = line[4:]
        elif line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[f"{section}.{cells[0].strip('`')}"] = cells
    return rows


def test_every_crd_field_has_a_row_with_its_description() -> None:
    rows = _rows()
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    checked = 0
    for top in ("spec", "status"):
        for path, node in walk(root["properties"][top], top):
            if path == top or path.endswith(("[]", "{}")):
                continue
            key = re.sub(r"\{\}", "{}", path)
            assert key in rows, f"{path} is missing from docs/api.md"
            description = " ".join(node["description"].split()).replace("|", "\\|")
            assert rows[key][3] == description, path
            checked += 1
    assert checked > 300  # the whole spec and status, not a corner of it


def test_types_defaults_enums_and_bounds() -> None:
    rows = _rows()
    assert rows["spec.hyperparameters.epochs"][1:3] == ["integer or string", "`auto`"]
    assert rows["spec.maxRetries"][2] == "`3`" and rows["spec.maxRetries"][4] == "≥ 0; ≤ 100"
    assert rows["spec.model.source"][2] == "required"
    assert "one of `full`, `layers`" in rows["spec.method.adaptation"][4]
    assert rows["spec.hyperparameters.learningRate"][4] == "> 0"
    assert rows["spec.method.objectives"][1] == "list of [object](#specmethodobjectives)"
    assert "CEL: must be an integer >= 1" in rows["spec.hyperparameters.epochs"][4]


def test_object_links_point_at_sections() -> None:
    text = markdown()
    anchors = {anchor(line[4:]) for line in text.splitlines() if line.startswith("### ")}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) > 50
    assert set(links) <= anchors
