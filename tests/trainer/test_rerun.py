"""Reruns, resumes and the storage preflight (issue 15, items 5 and 6), on the tiny model in
process: a finished output is reported, not retrained (unless spec.output.overwrite); a resume
keeps the loss log and never steps past maxSteps; a checkpoint of another spec is refused; bad
credentials and a missing bucket fail before anything loads; a failed final commit loses nothing.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api.contract import PERMANENT_EXIT_CODE
from kubetune.api.crd import training_digest
from kubetune.api.manifest import load_job
from kubetune.trainer import data, rerun, storage
from kubetune.trainer import run as run_mod

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "support-chat.jsonl"


def spec_file(tmp: Path, out: str, name: str = "rr", **blocks: Any) -> Path:
    small = tmp / "train.jsonl"  # 40 examples, 4 held out: seconds per run
    if not small.exists():
        small.write_text("".join(DATA.read_text().splitlines(keepends=True)[:40]))
    body: dict[str, Any] = {
        "model": {"source": "builtin://tiny-llama"},
        "dataset": {
            "train": str(small),
            "validationSplit": 0.1,
            "maxSeqLength": 128,
            "overlength": "truncate",
            "minExamples": 10,
        },
        "method": {"adaptation": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["all-linear"]}},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 4, "maxSteps": 4, "seed": 7},
        "output": {"uri": out},
        "checkpointing": {"everySteps": 2, "keep": 5},
        "evaluation": {"samples": 0, "compareBase": False},
    }
    for key, value in blocks.items():
        body[key] = {**body.get(key, {}), **value}
    path = tmp / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}
        )
    )
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path.parent / "shared-cache"))


def train(spec: Path, tmp: Path, progress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    opts = run_mod.Options(
        scratch=tmp / f"scratch-{uuid.uuid4().hex[:6]}", on_progress=(progress.append if progress is not None else None)
    )
    return run_mod.run(load_job(str(spec)), opts)


def forbid_loading(monkeypatch: pytest.MonkeyPatch, data_too: bool = True) -> None:
    """Fail the test if the model is fetched or loaded (and, with `data_too`, the data read)."""
    import transformers
    from kubetune.trainer import sources

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("data or model loaded")

    if data_too:
        monkeypatch.setattr(data, "validate", boom)
    monkeypatch.setattr(sources, "resolve_model", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("trained a step")

    monkeypatch.setattr(transformers.Trainer, "training_step", boom)


def losses(out: Path) -> list[list[float]]:
    return json.loads((out / "adapter" / "training_log.json").read_text())["losses"]


def test_overwrite_stays_out_of_the_wire_form_and_the_training_digest_ignores_output() -> None:
    from kubetune.api.spec import FineTuneJobSpec

    base = {
        "model": {"source": "builtin://tiny-llama"},
        "dataset": {"train": "d.jsonl"},
        "method": {"adaptation": "lora"},
        "output": {"uri": "s3://b/a"},
    }
    spec = FineTuneJobSpec.model_validate(base)
    assert "overwrite" not in spec.wire()["output"]  # at its default: spec digests of existing jobs unchanged
    assert (
        FineTuneJobSpec.model_validate({**base, "output": {"uri": "s3://b/a", "overwrite": True}}).wire()["output"][
            "overwrite"
        ]
        is True
    )
    moved = FineTuneJobSpec.model_validate({**base, "output": {"uri": "s3://b/other"}, "evaluation": {"samples": 0}})
    assert training_digest(moved.wire()) == training_digest(spec.wire())
    faster = FineTuneJobSpec.model_validate({**base, "hyperparameters": {"learningRate": 1e-3}})
    assert training_digest(faster.wire()) != training_digest(spec.wire())


@pytest.mark.slow
def test_a_finished_output_is_reported_and_overwrite_retrains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why: 'a finished output is reloaded, re-evaluated, then fails "another job committed"'."""
    out = tmp_path / "out"
    spec = spec_file(tmp_path, out.as_uri(), hyperparameters={"maxSteps": 2})
    first = train(spec, tmp_path)
    manifest_bytes = (out / "manifest.json").read_bytes()
    assert json.loads(manifest_bytes)[rerun.DIGEST_KEY] == training_digest(load_job(str(spec)).spec.wire())

    with monkeypatch.context() as m:
        forbid_loading(m)
        again = train(spec, tmp_path)  # the same spec: nothing read, loaded or trained
        # a different training spec at the same output: refused before anything loads
        other = spec_file(tmp_path, out.as_uri(), hyperparameters={"maxSteps": 2, "learningRate": 1e-3})
        with pytest.raises(run_mod.UserError) as err:
            train(other, tmp_path)
    assert again == first and again["status"] == "succeeded" and again["steps"] == 2
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert err.value.param == "spec.output.uri" and "spec.output.overwrite: true" in str(err.value)

    # through the CLI: --overwrite sets spec.output.overwrite, and the result is trained again
    import kubetune.localrun
    from click.testing import CliRunner
    from kubetune.cli import main

    seen = []
    monkeypatch.setattr(kubetune.localrun, "run_locally", lambda job, output, port: seen.append(job) or 0)
    assert CliRunner().invoke(main, ["run", str(other), "--overwrite"]).exit_code == 0
    assert seen[0].spec.output.overwrite is True
    replaced = run_mod.run(seen[0], run_mod.Options(scratch=tmp_path / "scratch-overwrite"))
    assert replaced["status"] == "succeeded" and replaced["effective"]["learningRate"] == 1e-3
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["hyperparameters"]["learningRate"] == 1e-3 and (out / "manifest.json").read_bytes() != manifest_bytes
    )
    assert storage.verify(storage.Store(out.as_uri()), "")[0]


@pytest.mark.slow
def test_resume_keeps_the_loss_log_and_stops_at_max_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why: 'resuming with maxSteps reports step 4/3 and loses the loss log'; and a failed final
    commit loses nothing: the last step's checkpoint stays and a rerun only evaluates and commits."""
    out = tmp_path / "out"
    spec = spec_file(tmp_path, out.as_uri(), hyperparameters={"maxSteps": 3}, checkpointing={"everySteps": 2})

    def refuse_commit(*a: Any, **k: Any) -> Any:
        raise storage.StorageError("put_file s3://b/out/adapter: the object store is failing")

    with monkeypatch.context() as m:
        m.setattr(storage, "commit_result", refuse_commit)
        with pytest.raises(storage.StorageError) as err:
            train(spec, tmp_path)
    assert "spec.output.uri" in str(err.value) and "is kept at" in str(err.value)
    assert "checkpoint of step 3 stays committed" in str(err.value)  # the last step, though 3 % everySteps != 0
    store = storage.Store(out.as_uri())
    assert storage.list_checkpoints(store) == [2, 3] and not store.exists("manifest.json")
    straight = json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    straight_losses = [[e["step"], e["loss"]] for e in straight["log_history"] if "loss" in e]
    assert [s for s, _ in straight_losses] == [1, 2, 3]

    progress: list[dict[str, Any]] = []
    with monkeypatch.context() as m:
        forbid_training(m)  # step 3 of 3 is checkpointed: no step 4
        done = train(spec, tmp_path, progress)
    assert done["status"] == "succeeded" and done["steps"] == 3
    assert progress == [] and losses(out) == straight_losses

    # resuming from step 2 of 3: one step trained, the log of steps 1-2 restored
    for key in ("manifest.json", "adapter", "checkpoints/step-3"):
        store.rm(key, recursive=True)
    for report in store.ls(""):
        if report != "checkpoints":
            store.rm(report, recursive=True)
    progress.clear()
    resumed = train(spec, tmp_path, progress)
    assert resumed["steps"] == 3 and [(p["step"], p["total"]) for p in progress] == [(3, 3)]
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    assert losses(out)[:2] == straight_losses[:2]
    assert losses(out)[2][1] == pytest.approx(straight_losses[2][1], rel=1e-5)


@pytest.mark.slow
def test_a_checkpoint_of_another_spec_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why: 'a changed spec crashes on the old checkpoint (size mismatch) or silently keeps the old
    learning rate while the manifest records the new one'."""
    out = tmp_path / "out"
    train(spec_file(tmp_path, out.as_uri(), hyperparameters={"maxSteps": 2}), tmp_path)
    store = storage.Store(out.as_uri())
    store.rm("manifest.json")  # as if the pod died before its commit: only the checkpoint stands
    assert storage.list_checkpoints(store) == [2]
    for change in (
        {"method": {"lora": {"r": 8, "alpha": 16, "targetModules": ["all-linear"]}}},
        {"hyperparameters": {"maxSteps": 2, "learningRate": 1e-4}},
    ):
        with monkeypatch.context() as m:
            forbid_loading(m)
            with pytest.raises(run_mod.UserError) as err:
                train(spec_file(tmp_path, out.as_uri(), **change), tmp_path)
        assert err.value.param == "spec.output.uri" and err.value.reason == "InvalidSpec"
        assert "checkpoints/step-2" in str(err.value) and "Change spec.output.uri" in str(err.value)
        assert f"delete the checkpoints under {out.as_uri()}/checkpoints" in str(err.value)
    assert storage.list_checkpoints(store) == [2]  # refused, nothing deleted


def _main(spec: Path, tmp: Path) -> tuple[int, dict[str, Any]]:
    from kubetune.trainer.__main__ import main

    code = main(["--spec", str(spec), "--metrics-port", "-1", "--termination-path", str(tmp / "termination")])
    return code, json.loads((tmp / "termination").read_text())


def test_bad_credentials_fail_before_anything_loads(
    tmp_path: Path,
    s3_bucket: str,
    s3_faults,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    """Why: 'bad credentials fail after the model loads'."""
    forbid_loading(monkeypatch)
    spec = spec_file(tmp_path, f"{s3_bucket}/job")
    with s3_faults.inject("403", op="*", times=1000):
        code, summary = _main(spec, tmp_path)
    assert code == PERMANENT_EXIT_CODE
    assert summary["reason"] == "StorageError" and summary["param"] == "spec.output.uri"
    assert summary["message"].startswith("spec.output.uri: ") and "spec.output.credentialsSecret" in summary["message"]
    assert "Traceback" not in capsys.readouterr().err


def test_a_missing_bucket_fails_before_anything_loads(
    tmp_path: Path,
    s3_bucket: str,
    s3_faults,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Why: 'a missing bucket fails at the first checkpoint or after the whole run, losing the result'."""
    forbid_loading(monkeypatch, data_too=False)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    code, summary = _main(spec_file(tmp_path, f"s3://{bucket}/job"), tmp_path)
    assert code == PERMANENT_EXIT_CODE
    assert summary["reason"] == "StorageError" and summary["param"] == "spec.output.uri"
    assert "bucket does not exist" in summary["message"] and bucket in summary["message"]
    assert "write check" in summary["message"]
    # the dataset's bucket missing, the output fine: its field named, still before anything loads
    spec = spec_file(tmp_path, f"{s3_bucket}/job", dataset={"train": f"s3://{bucket}/train.jsonl"})
    code, summary = _main(spec, tmp_path)
    assert code == PERMANENT_EXIT_CODE and summary["param"] == "spec.dataset.train"
    assert summary["message"].startswith(f"spec.dataset.train: s3://{bucket}/train.jsonl does not exist")
    assert (
        s3_faults.count("PutObject", bucket=s3_bucket.removeprefix("s3://")) == 0
    )  # refused before anything is written


def test_a_failing_store_is_retriable_and_said_clearly(
    tmp_path: Path,
    s3_bucket: str,
    s3_faults,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    forbid_loading(monkeypatch, data_too=False)
    monkeypatch.setattr(storage.Store, "__init__", _no_backoff(storage.Store.__init__))
    with s3_faults.inject("503", op="PutObject", times=1000):
        code, summary = _main(spec_file(tmp_path, f"{s3_bucket}/job"), tmp_path)
    assert code == 1 and summary["reason"] == "StorageError"
    assert summary["message"].startswith("spec.output.uri: ") and "failing or unreachable" in summary["message"]
    assert "Traceback" not in capsys.readouterr().err


def _no_backoff(init: Any) -> Any:
    def fast(self: Any, uri: str, storage_options: Any = None, retries: int = 5, backoff: float = 0.5) -> None:
        init(self, uri, storage_options, retries=2, backoff=0)

    return fast
