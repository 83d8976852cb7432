"""Every examples/methods/<name>.yaml runs to a verified adapter with `kubetune run` on CPU.

One manifest per adaptation, objective term and optimizer, named by its API enum value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetune.api import Adaptation, Objective, Optimizer
from kubetune.cli import main
from kubetune.trainer import storage

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "methods").glob("*.yaml"))
pytestmark = pytest.mark.slow


def test_one_example_per_method() -> None:
    names = {p.stem for p in EXAMPLES}
    assert names == {e.value for e in (*Adaptation, *Objective, *Optimizer)}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_method_example_runs(path: Path, tmp_path: Path, builtin_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out = (tmp_path / "out").as_uri()
    result = CliRunner().invoke(main, ["run", str(path.relative_to(ROOT)), "--output", out])
    assert result.exit_code == 0, result.output + repr(result.exception)
    store = storage.Store(out)
    ok, reason = storage.verify(store, "")
    assert ok, reason
    manifest = json.loads(store.read_bytes("manifest.json"))
    metrics = manifest["metrics"]
    assert metrics["evalLoss"] > 0 and "baseEvalLoss" in metrics
    for term in manifest["method"].get("objectives", []):
        assert metrics.get("objectives"), f"{term['type']} reported no numbers"
