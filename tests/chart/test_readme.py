"""charts/kubetune/README.md is hack/chart_readme.py's output: one row per chart value, with the
comment values.yaml has above it, its default and its type from values.schema.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml

from tests.chart.render import CHART, ROOT
from tests.chart.test_values import SCHEMA, VALUES, keyed_lines

README = CHART / "README.md"


def rows() -> dict[str, list[str]]:
    out = {}
    for line in README.read_text().splitlines():
        if line.startswith(("| `", "| **`")):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[cells[0].strip("*`")] = cells
    return out


def test_chart_readme_is_fresh() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "chart_readme.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr


def test_every_value_has_a_row() -> None:
    table = rows()
    paths = [path.lstrip(".") for path, _ in keyed_lines(yaml.compose(VALUES.read_text()), SCHEMA)]
    assert len(paths) > 100
    assert sorted(table) == sorted(paths)


def test_rows_carry_comment_default_and_type() -> None:
    table = rows()
    scope = table["watch.scope"]
    assert scope[1:3] == ['`"Cluster"` \\| `"Namespaced"`', '`"Cluster"`']
    assert scope[3].startswith("Cluster: the operator watches every namespace through a ClusterRole.")
    # a comment wrapped at a hyphen is joined without a space
    assert "kubectl port-forward" in table["operator.bindAddress"][3]
    requests = json.loads(table["operator.resources.requests"][2].strip("`"))
    assert requests == yaml.safe_load(VALUES.read_text())["operator"]["resources"]["requests"]
    assert table["watch"][1] == "object" and table["watch"][2] == ""
