"""Every examples/methods/<name>.yaml runs to a verified adapter with `kubetune run` on CPU.

One manifest per adaptation, objective term, optimizer and training type (dpo, orpo, kto, grpo),
named by its API enum value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from kubetune.api import Adaptation, Objective, Optimizer
from kubetune.api.enums import TrainingType
from kubetune.api.manifest import load_yaml as load_manifest_yaml
from kubetune.cli import main
from kubetune.trainer import storage

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "methods").glob("*.yaml"))
pytestmark = pytest.mark.slow


def test_one_example_per_method() -> None:
    names = {p.stem for p in EXAMPLES}
    types = {t.value for t in TrainingType if t != TrainingType.SUPERVISED}
    assert names == {e.value for e in (*Adaptation, *Objective, *Optimizer)} | types


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
    kind = manifest["method"].get("type", "supervised")
    if kind == "grpo":  # the base-vs-tuned comparison: mean grader reward
        assert "meanReward" in metrics and "baseMeanReward" in metrics and "reward" in metrics["objectives"]
    elif kind != "supervised":  # dpo, orpo, kto: held-out preference accuracy
        assert 0 <= metrics["preferenceAccuracy"] <= 1 and "basePreferenceAccuracy" in metrics
    else:
        assert metrics["evalLoss"] > 0 and "baseEvalLoss" in metrics
    for term in manifest["method"].get("objectives", []):
        assert metrics.get("objectives"), f"{term['type']} reported no numbers"


def test_spans_guide_end_to_end(tmp_path: Path, builtin_cache: Path) -> None:
    """The spans guide's evidence masks flow from the records through the collator to the loss."""
    import yaml
    from kubetune.api.manifest import load_job
    from kubetune.trainer.run import Options, run

    rows = []
    for i in range(60):
        question = f"Where is order {1000 + i}? It shipped on Monday."
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"Order {1000 + i} is on its way."},
                ],
                "evidence": [[0, 16]],  # "Where is order N" in the last user message
            }
        )
    data = tmp_path / "spans.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    job = load_manifest_yaml((ROOT / "examples" / "methods" / "attentionGuidance.yaml").read_text())
    job["spec"]["dataset"] = {"train": str(data), "validationSplit": 0.2, "maxSeqLength": 128}
    job["spec"]["method"]["objectives"][0]["attentionGuidance"] = {
        "guide": "spans",
        "spansField": "evidence",
        "weight": 0.5,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    opts = Options(output=(tmp_path / "out").as_uri())
    summary = run(load_job(str(tmp_path / "job.yaml")), opts)
    assert summary["metrics"]["objectives"]["attentionLoss"] > 0
    assert 0 < summary["metrics"]["objectives"]["guidedMass"] <= 1
    # the same numbers are on the metrics endpoint, one series per objective value
    from prometheus_client import generate_latest

    exposed = generate_latest(opts.metrics.registry).decode()
    assert 'kubetune_trainer_objective_value{name="attentionLoss"}' in exposed
    assert 'kubetune_trainer_objective_value{name="guidedMass"}' in exposed
