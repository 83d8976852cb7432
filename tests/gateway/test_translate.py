"""gateway.translate and gateway.objects: OpenAI requests → FineTuneJobs, statuses and errors back."""

from __future__ import annotations

import json

import pytest
from kubetune.gateway import translate
from kubetune.gateway.backend import Invalid
from kubetune.gateway.objects import JobCreate
from pydantic import ValidationError

QUICKSTART = "examples/data/support-chat.jsonl"


def request(**kw) -> JobCreate:
    return JobCreate.model_validate({"model": "builtin://tiny-llama", "training_file": "file-1", **kw})


def manifest(req: JobCreate, **kw) -> dict:
    args = dict(
        name="ftjob-abc",
        job_id="ftjob-abc",
        train_uri="/data/train.jsonl",
        validation_uri=None,
        output_uri="file:///out/ftjob-abc",
    )
    return translate.to_manifest(req, **{**args, **kw})


def test_supervised_request_becomes_a_valid_lora_finetunejob() -> None:
    req = request(
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5},
        seed=7,
        suffix="support-bot",
        validation_file="file-2",
    )
    m = manifest(req, validation_uri="/data/val.jsonl", checkpoint_every_steps=9, namespace="team-a")
    job = translate.validate_manifest(m)
    spec = job.spec
    assert spec.model.source == "builtin://tiny-llama"
    assert spec.method.adaptation == "lora"
    assert (spec.hyperparameters.epochs, spec.hyperparameters.batch_size, spec.hyperparameters.seed) == (2, 4, 7)
    assert spec.hyperparameters.learning_rate == pytest.approx(0.5 * translate.LORA_LEARNING_RATE)
    assert (spec.dataset.train, spec.dataset.validation, spec.dataset.format) == (
        "/data/train.jsonl",
        "/data/val.jsonl",
        "chat",
    )
    assert spec.dataset.min_examples == translate.OPENAI_MIN_EXAMPLES == 10
    assert spec.checkpointing.every_steps == 9
    assert spec.suffix == "support-bot"
    assert job.metadata.namespace == "team-a"
    assert m["metadata"]["labels"][translate.JOB_ID_LABEL] == "ftjob-abc"


def test_auto_hyperparameters_leave_the_trainer_defaults() -> None:
    spec = translate.validate_manifest(manifest(request(hyperparameters={"n_epochs": "auto"}))).spec
    assert spec.hyperparameters.epochs == "auto"
    assert spec.hyperparameters.batch_size == "auto"
    assert spec.hyperparameters.learning_rate is None  # the method's default: × 1


def test_method_block_hyperparameters_are_read_like_the_deprecated_ones() -> None:
    req = request(method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4}}})
    assert translate.validate_manifest(manifest(req)).spec.hyperparameters.epochs == 4


def test_suffix_that_is_no_dns_label_stays_out_of_the_spec_but_names_the_model() -> None:
    req = request(suffix="My_Bot.v2")
    assert "suffix" not in manifest(req)["spec"]
    assert (
        translate.fine_tuned_model(req.model, "org-a", req.suffix, "ftjob-123") == "ft:tiny-llama:org-a:My_Bot.v2:123"
    )
    assert translate.fine_tuned_model("Qwen/Qwen2.5-0.5B", "org-a", None, "ftjob-9") == "ft:Qwen/Qwen2.5-0.5B:org-a::9"


@pytest.mark.parametrize(
    ("model", "source"),
    [
        ("builtin://tiny-llama", "builtin://tiny-llama"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "hf://Qwen/Qwen2.5-0.5B-Instruct"),
        ("hf://org/name@rev", "hf://org/name@rev"),
        ("s3://bucket/models/m", "s3://bucket/models/m"),
    ],
)
def test_model_sources(model: str, source: str) -> None:
    assert translate.model_source(model) == source


@pytest.mark.parametrize("model", ["gpt-4o-mini-2024-07-18", "ftp://host/m", "ft:tiny-llama:org::abc"])
def test_models_that_cannot_train_are_refused_naming_model(model: str) -> None:
    with pytest.raises(Invalid) as err:
        translate.model_source(model)
    assert err.value.param == "model" and err.value.status == 400


def test_dpo_maps_to_method_type_and_beta() -> None:
    req = request(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1}}})
    spec = manifest(req)["spec"]
    assert spec["method"] == {"adaptation": "lora", "type": "dpo", "dpo": {"beta": 0.25}}
    assert spec["hyperparameters"] == {"epochs": 1}
    assert spec["dataset"]["format"] == "chat"  # OpenAI's preference records, read as they are by type dpo
    ftj = translate.validate_manifest(manifest(req))  # the API models of spec.method.type accept it
    assert (ftj.spec.method.training_type, ftj.spec.method.dpo.beta) == ("dpo", 0.25)
    job = translate.openai_job(job_id="ftjob-1", created_at=1, request=req, organization_id="o", status={})
    assert job.method.type == "dpo" and job.method.dpo["hyperparameters"]["beta"] == 0.25


def test_reinforcement_is_refused_naming_method_type() -> None:
    req = request(method={"type": "reinforcement", "reinforcement": {"grader": {}}})
    with pytest.raises(Invalid) as err:
        manifest(req)
    assert err.value.param == "method.type"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"suffix": "x" * 65}, "suffix"),
        ({"suffix": "a:b"}, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters"),
        ({"seed": -1}, "seed"),
        ({"integrations": [{"type": "wandb"}]}, "integrations"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_openai_limits(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        request(**body)
    assert err.value.errors()[0]["loc"][0] == field


def test_limits_at_the_edge_pass() -> None:
    req = request(suffix="x" * 64, metadata={f"k{i}": "v" * 512 for i in range(16)})
    assert len(req.metadata) == 16


@pytest.mark.parametrize(
    ("phase", "suspend", "cancel", "status"),
    [
        (None, False, False, "validating_files"),
        ("Pending", False, False, "validating_files"),
        ("Validating", False, False, "validating_files"),
        ("Queued", False, False, "queued"),
        ("Running", False, False, "running"),
        ("Running", True, False, translate.PAUSED_STATUS),
        ("Suspended", True, False, "queued"),
        ("Running", False, True, "cancelled"),
        ("Succeeded", False, True, "succeeded"),
        ("Failed", False, False, "failed"),
        ("Cancelled", False, False, "cancelled"),
    ],
)
def test_phase_status(phase, suspend, cancel, status) -> None:
    assert translate.phase_status(phase, suspend=suspend, cancel=cancel) == status


def test_failed_job_error_names_the_request_field_or_data_line() -> None:
    files = {"/d/file-1.jsonl": "training_file", "/d/file-2.jsonl": "validation_file"}
    assert translate.error_param("/d/file-1.jsonl:12", files) == "training_file:12"
    assert translate.error_param("/d/file-2.jsonl:3", files) == "validation_file:3"
    assert translate.error_param("/d/file-1.jsonl", files) == "training_file"
    assert translate.error_param("spec.hyperparameters.epochs", files) == "hyperparameters.n_epochs"
    assert translate.error_param("spec.model.source", files) == "model"
    err = translate.job_error(
        {"code": "InvalidData", "message": "/d/file-1.jsonl:12: no assistant turn", "param": "/d/file-1.jsonl:12"},
        files,
        {"/d/file-1.jsonl": "file-1 (train.jsonl)"},
    )
    assert (err.code, err.message, err.param) == (
        "InvalidData",
        "file-1 (train.jsonl):12: no assistant turn",
        "training_file:12",
    )


def test_openai_job_reports_resolved_numbers_name_and_finish() -> None:
    req = request(hyperparameters={"learning_rate_multiplier": "auto"}, suffix="s", metadata={"team": "a"})
    status = {
        "phase": "Succeeded",
        "completionTime": "2026-01-02T03:04:05Z",
        "effective": {"epochs": 3, "batchSize": 8, "learningRate": 4e-4},
    }
    job = translate.openai_job(
        job_id="ftjob-xyz", created_at=5, request=req, organization_id="org-a", status=status, trained_tokens=1234
    )
    assert job.status == "succeeded" and job.fine_tuned_model == "ft:tiny-llama:org-a:s:xyz"
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (3, 8)
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(4e-4 / translate.LORA_LEARNING_RATE)
    assert job.finished_at == 1767323045 and job.trained_tokens == 1234 and job.metadata == {"team": "a"}
    running = translate.openai_job(
        job_id="ftjob-xyz",
        created_at=5,
        request=req,
        organization_id="org-a",
        status={"phase": "Running", "progress": {"etaSeconds": 60}},
        now=1000,
    )
    assert running.estimated_finish == 1060 and running.fine_tuned_model is None and running.finished_at is None


def test_checkpoints_newest_first_with_final_metrics() -> None:
    ckpts = translate.openai_checkpoints(
        "ftjob-1",
        "ft:m:o::1",
        [
            {"step": 10, "uri": "file:///c/step-10", "loss": 2.0, "time": "2026-01-01T00:00:00Z"},
            {"step": 20, "uri": "file:///c/step-20", "loss": 1.5, "time": "2026-01-01T00:01:00Z"},
        ],
        {"evalLoss": 1.4, "tokenAccuracy": 0.5},
    )
    assert [c.step_number for c in ckpts] == [20, 10]
    assert ckpts[0].fine_tuned_model_checkpoint == "ft:m:o::1:ckpt-step-20"
    assert (ckpts[0].metrics.valid_loss, ckpts[1].metrics.valid_loss, ckpts[1].metrics.train_loss) == (1.4, None, 2.0)
    assert ckpts[0].id == translate.openai_checkpoints("ftjob-1", "x", [{"step": 20, "uri": "u"}])[0].id


def test_check_data_names_the_training_file_line(tmp_path) -> None:
    lines = open(QUICKSTART).read().splitlines()[:20]
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    error, _ = translate.check_data(
        str(bad), None, files={str(bad): "training_file"}, names={str(bad): "file-9 (bad.jsonl)"}
    )
    assert error is not None and error.param == "training_file:7" and error.code == "InvalidData"
    assert "file-9 (bad.jsonl):7" in error.message and str(tmp_path) not in error.message
    error, report = translate.check_data(QUICKSTART, None)
    assert error is None and report["examples"] + report["validationExamples"] == 300


def test_the_gateway_twins_of_trainer_constants_agree() -> None:
    """The gateway must not import the trainer, so it keeps copies; these keep them equal."""
    from kubetune.gateway import local
    from kubetune.trainer import builtin, hparams, inference
    from kubetune.trainer.methods import lora

    assert lora.Lora.default_learning_rate == translate.LORA_LEARNING_RATE
    assert translate.DEFAULT_N_EPOCHS == hparams.DEFAULT_EPOCHS
    assert local.CPU_BATCH_SIZE == hparams.CPU_BATCH_SIZE
    assert set(local.BUILTIN_MODELS) == set(builtin.BUILTIN_MODELS)
    for source in ("builtin://tiny-llama", "hf://org/name@main", "s3://b/models/m/", "/abs/path/model", "pvc://c/x"):
        assert translate.base_id(source) == inference.base_id(source)


def test_check_data_reads_dpo_files_as_preference_pairs(tmp_path) -> None:
    """A dpo job's files are OpenAI's preference format: the chat check would refuse every line, the
    preference check accepts them and names the line of a pair whose two answers are the same."""
    good = "examples/data/support-dpo.jsonl"
    error, report = translate.check_data(good, None, method_type="dpo")
    assert error is None and report["examples"] + report["validationExamples"] == sum(1 for _ in open(good))
    error, _ = translate.check_data(good, None, files={good: "training_file"})
    assert error is not None and error.param == "training_file:1"  # not chat records
    rows = [json.loads(line) for line in open(good)][:12]
    rows[6]["non_preferred_output"] = rows[6]["preferred_output"]
    bad = tmp_path / "bad-dpo.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    error, _ = translate.check_data(
        str(bad), None, files={str(bad): "training_file"}, names={str(bad): "file-7 (bad-dpo.jsonl)"}, method_type="dpo"
    )
    assert error is not None and error.param == "training_file:7", error
