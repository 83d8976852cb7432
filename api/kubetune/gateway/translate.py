"""OpenAI fine-tuning ↔ FineTuneJob: the one translation both backends use.

Requests: an OpenAI job request becomes a FineTuneJob manifest (a dict checked by kubetune.api's
models, so what the gateway creates is exactly what `kubectl apply` would accept):

- `model`: `builtin://…`, `hf://…` and storage URIs go to `spec.model.source` as they are; a bare
  Hugging Face id `org/name` becomes `hf://org/name`. OpenAI's own model names cannot train here.
- `method.type: supervised` (and the deprecated top-level `hyperparameters`) trains a **LoRA**
  adapter. OpenAI never says which parameters train; LoRA is the choice that behaves like its
  service: the result is a small adapter on the named base (what `fine_tuned_model` names), it
  trains on the hardware the base merely runs on, and every engine kubetune serves with (kubetune
  serve, vLLM, KServe) loads it as a LoRA module on the base. The OpenAI data format is chat, read
  with kubetune's chat reader and data checks; at least 10 examples, as OpenAI requires.
- `method.type: dpo` → `spec.method.type: dpo` with `spec.method.dpo.beta` (the preference-tuning
  API), `reinforcement` is refused (400, `param: method.type`): kubetune has no graders.
- `n_epochs` → `epochs`, `batch_size` → `batchSize`, `learning_rate_multiplier` → `learningRate` =
  the LoRA default learning rate × the multiplier ("auto" leaves the default: × 1), `seed` →
  `hyperparameters.seed`, `validation_file` → `dataset.validation`, `suffix` → `spec.suffix` when
  it is a DNS label (the FineTuneJob's rule) and always into `fine_tuned_model`
  `ft:<base>:<org>:<suffix>:<id>`.

Status: FineTuneJob phases map to OpenAI's statuses (`phase_status`); a paused job is reported as
`queued` (see `PAUSED_STATUS`), and `status.error` becomes `error {code, message, param}` with
`param` in OpenAI's terms: the request field (`hyperparameters.n_epochs`) or the data line
(`training_file:12`).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import MappingProxyType, SimpleNamespace
from typing import Any, Optional
from urllib.parse import urlsplit

from kubetune.api.enums import Adaptation
from kubetune.api.methods import ADAPTATIONS
from kubetune.api.types import MODEL_SCHEMES
from kubetune.gateway.backend import Invalid
from kubetune.gateway.objects import (
    Checkpoint,
    CheckpointMetrics,
    FineTuningJob,
    JobCreate,
    JobError,
    JobHyperparameters,
    JobMethodOut,
    JobStatus,
)

LORA_LEARNING_RATE = ADAPTATIONS[Adaptation.LORA].default_learning_rate
"""The LoRA adaptation's default learning rate (kubetune.api.methods). OpenAI's multiplier scales it."""
DPO_LEARNING_RATE = LORA_LEARNING_RATE
DEFAULT_N_EPOCHS = 3
"""What `n_epochs: auto` resolves to (kubetune.trainer.hparams.DEFAULT_EPOCHS, OpenAI's default)."""
OPENAI_MIN_EXAMPLES = 10
"""OpenAI accepts a training file from 10 examples; kubetune's own default minimum is 50."""
LABEL_PREFIX = "openai.kubetune.io/"
JOB_ID_LABEL = LABEL_PREFIX + "job-id"
PAUSED_STATUS: JobStatus = "queued"
"""A paused (suspended) job's status. The official client's status enum has no `paused`; a paused
job is waiting to run again once resumed, which is what `queued` says to every client — and unlike
`running` it never suggests progress that is not happening. Events record the pause and resume."""

_EMPTY: Mapping[str, str] = MappingProxyType({})
"""An empty mapping for defaults (read-only: shared by every call)."""

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------ ids


def new_id(prefix: str) -> str:
    """OpenAI-style ids: `file-…`, `ftjob-…`, 24 hex characters of randomness."""
    import secrets

    return f"{prefix}-{secrets.token_hex(12)}"


def stable_id(prefix: str, *parts: Any) -> str:
    """An id derived from what it names (an event or checkpoint recomputed after a restart keeps it)."""
    return f"{prefix}-" + hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:24]


def model_source(model: str) -> str:
    """`spec.model.source` for the request's `model` (400 naming `model` when it is none)."""
    if model.startswith("ft:"):
        raise Invalid(
            f"model {model!r}: continuing from a fine-tuned model is not offered; name its base model "
            "(builtin://tiny-llama, a Hugging Face id such as Qwen/Qwen2.5-0.5B-Instruct, or s3://… )",
            param="model",
            code="model_not_available",
        )
    if "://" in model:
        scheme = model.split("://", 1)[0]
        if scheme not in MODEL_SCHEMES:
            raise Invalid(
                f"model {model!r}: the scheme {scheme}:// is not a model source; use one of "
                + ", ".join(f"{s}://" for s in MODEL_SCHEMES),
                param="model",
                code="model_not_available",
            )
        return model
    if _HF_ID.match(model):
        return f"hf://{model}"
    raise Invalid(
        f"model {model!r} is not available: name a Hugging Face id (org/name), builtin://tiny-llama, or a "
        "URI (hf://, s3://, gs://, file://, pvc://) of the base model to fine-tune",
        param="model",
        code="model_not_available",
    )


def base_id(source: str) -> str:
    """The short name of a base model as model ids show it (tiny-llama, org/name, my-model): the
    same rule as `kubetune serve` (kubetune.trainer.inference.base_id, kept equal by a test)."""
    if source.startswith("builtin://"):
        return source[len("builtin://") :].strip("/")
    if source.startswith("hf://"):
        return source[len("hf://") :].strip("/").partition("@")[0]
    path = urlsplit(source).path if "://" in source else source
    return path.rstrip("/").rsplit("/", 1)[-1] or source


def fine_tuned_model(model: str, organization_id: str, suffix: Optional[str], job_id: str) -> str:
    """`ft:<base>:<org>:<suffix>:<id>` as OpenAI names tuned models (an empty suffix segment without one);
    `<id>` is the job id without its `ftjob-` prefix."""
    return f"ft:{base_id(model_source(model))}:{organization_id}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


# ------------------------------------------------------------------------------------ request → manifest


def check_request(request: JobCreate) -> None:
    """What the request models cannot say alone: the method kubetune cannot run."""
    if request.method_type() == "reinforcement":
        raise Invalid(
            "method.type reinforcement is not offered through this API: use supervised (chat examples) "
            "or dpo (preference pairs), or write a FineTuneJob with spec.method.type: grpo and its graders",
            param="method.type",
            code="unsupported_method",
        )
    model_source(request.model)


def learning_rate(multiplier: Any, method_type: str = "supervised") -> Optional[float]:
    """`learning_rate_multiplier` → `spec.hyperparameters.learningRate` (None: the default, × 1)."""
    if multiplier == "auto" or multiplier is None:
        return None
    base = DPO_LEARNING_RATE if method_type == "dpo" else LORA_LEARNING_RATE
    return float(multiplier) * base


def to_manifest(
    request: JobCreate,
    *,
    name: str,
    job_id: str,
    train_uri: str,
    validation_uri: Optional[str],
    output_uri: str,
    namespace: Optional[str] = None,
    gpus: int = 0,
    checkpoint_every_steps: Optional[int] = None,
    labels: Mapping[str, str] = _EMPTY,
    annotations: Mapping[str, str] = _EMPTY,
) -> dict[str, Any]:
    """The FineTuneJob manifest for `request` (not yet validated; see `validate_manifest`)."""
    check_request(request)
    hp = request.effective_hyperparameters()
    method_type = request.method_type()
    hyper: dict[str, Any] = {}
    if hp.n_epochs != "auto":
        hyper["epochs"] = hp.n_epochs
    if hp.batch_size != "auto":
        hyper["batchSize"] = hp.batch_size
    if (lr := learning_rate(hp.learning_rate_multiplier, method_type)) is not None:
        hyper["learningRate"] = lr
    if request.seed is not None:
        hyper["seed"] = request.seed
    method: dict[str, Any] = {"adaptation": "lora"}
    if method_type == "dpo":
        method["type"] = "dpo"
        beta = getattr(hp, "beta", "auto")
        if beta != "auto":
            method["dpo"] = {"beta": float(beta)}
    # OpenAI's chat files, and its DPO files (input.messages, preferred_output, non_preferred_output),
    # which spec.method.type: dpo reads as they are.
    dataset: dict[str, Any] = {"train": train_uri, "minExamples": OPENAI_MIN_EXAMPLES, "format": "chat"}
    if validation_uri:
        dataset["validation"] = validation_uri
    spec: dict[str, Any] = {
        "model": {"source": model_source(request.model)},
        "dataset": dataset,
        "method": method,
        "hyperparameters": hyper,
        "resources": {"gpus": gpus},
        "output": {"uri": output_uri},
    }
    if checkpoint_every_steps:
        spec["checkpointing"] = {"everySteps": int(checkpoint_every_steps)}
    if request.suffix and len(request.suffix) <= 40 and _DNS_LABEL.match(request.suffix):
        spec["suffix"] = request.suffix
    metadata: dict[str, Any] = {"name": name, "labels": {JOB_ID_LABEL: job_id, **dict(labels)}}
    if namespace:
        metadata["namespace"] = namespace
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": metadata, "spec": spec}


def validate_manifest(manifest: dict[str, Any]) -> Any:
    """The FineTuneJob model of `manifest`, or Invalid naming the request field a problem is about."""
    from kubetune.api import parse_manifest

    job, problems = parse_manifest(manifest)
    if job is None:
        first = problems[0]
        param = request_param(first.path) if first.path else None
        raise Invalid("; ".join(str(p) for p in problems), param=param)
    return job


# ------------------------------------------------------------------------------------ status → OpenAI

_PHASE_STATUS: dict[str, JobStatus] = {
    "Pending": "validating_files",
    "Validating": "validating_files",
    "Queued": "queued",
    "Running": "running",
    "Suspended": PAUSED_STATUS,
    "Succeeded": "succeeded",
    "Failed": "failed",
    "Cancelled": "cancelled",
}
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


def phase_status(phase: Optional[str], *, suspend: bool = False, cancel: bool = False) -> JobStatus:
    """OpenAI's status for a FineTuneJob phase. No phase yet (just created) is `validating_files`;
    a requested cancel is `cancelled` at once unless the job already finished (the operator's
    Cancelled phase follows); a requested pause is the paused status before the phase catches up."""
    status = _PHASE_STATUS.get(phase or "Pending", "validating_files")
    if status in TERMINAL:
        return status
    if cancel:
        return "cancelled"
    if suspend:
        return PAUSED_STATUS
    return status


_SPEC_PARAMS = {
    "spec.model.source": "model",
    "spec.model": "model",
    "spec.dataset.train": "training_file",
    "spec.dataset.validation": "validation_file",
    "spec.hyperparameters.epochs": "hyperparameters.n_epochs",
    "spec.hyperparameters.batchSize": "hyperparameters.batch_size",
    "spec.hyperparameters.learningRate": "hyperparameters.learning_rate_multiplier",
    "spec.hyperparameters.seed": "seed",
    "spec.suffix": "suffix",
    "spec.method.type": "method.type",
    "spec.method.dpo.beta": "method.dpo.hyperparameters.beta",
}


def request_param(spec_path: str) -> str:
    """A FineTuneJob field path in the request's terms (unknown ones are returned as they are)."""
    path = spec_path if spec_path.startswith("spec.") else f"spec.{spec_path.lstrip('.')}"
    return _SPEC_PARAMS.get(path, spec_path)


def error_param(param: Optional[str], files: Mapping[str, str]) -> Optional[str]:
    """`status.error.param` in OpenAI's terms: `file:line` of a known data file → `training_file:LINE`
    (or `validation_file:LINE`), a spec path → the request field. `files` maps data URIs to fields."""
    if not param:
        return None
    for uri, field in sorted(dict(files).items(), key=lambda kv: -len(kv[0])):
        for shown in (uri, uri.removeprefix("file://")):
            if param == shown:
                return field
            if param.startswith(shown + ":") and param[len(shown) + 1 :].isdigit():
                return f"{field}:{param[len(shown) + 1 :]}"
    return request_param(param) if param.startswith("spec.") else param


def job_error(
    error: Optional[Mapping[str, Any]], files: Mapping[str, str], names: Mapping[str, str] = _EMPTY
) -> Optional[JobError]:
    """`status.error` ({code, message, param}) as the OpenAI job's `error`; data URIs in the message are
    replaced by what the user knows (`names`: URI → `file-… (train.jsonl)`)."""
    if not error:
        return None
    message = str(error.get("message") or "")
    for uri, shown in sorted(dict(names).items(), key=lambda kv: -len(kv[0])):
        path = uri.removeprefix("file://")
        # the data layer shows a long path by its tail: "…" + the last 79 characters
        for form in (uri, path, "…" + uri[-79:], "…" + path[-79:]):
            message = message.replace(form, shown)
    return JobError(
        code=str(error.get("code") or "Error"), message=message, param=error_param(error.get("param"), files)
    )


def unix(value: Any) -> Optional[int]:
    """RFC 3339 (or a number) → unix seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    try:
        return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def resolved_hyperparameters(request: JobCreate, effective: Optional[Mapping[str, Any]]) -> JobHyperparameters:
    """The job's hyperparameters: what the trainer resolved once it did (status.effective: epochs,
    batchSize, learningRate), else what was asked (numbers or "auto")."""
    hp = request.effective_hyperparameters()
    out = JobHyperparameters(
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate_multiplier,
        n_epochs=hp.n_epochs,
        beta=getattr(hp, "beta", None),
    )
    if effective:
        if effective.get("epochs"):
            out.n_epochs = int(effective["epochs"])
        if effective.get("batchSize"):
            out.batch_size = int(effective["batchSize"])
        if effective.get("learningRate"):
            base = DPO_LEARNING_RATE if request.method_type() == "dpo" else LORA_LEARNING_RATE
            out.learning_rate_multiplier = round(float(effective["learningRate"]) / base, 6)
    return out


def openai_job(
    *,
    job_id: str,
    created_at: int,
    request: JobCreate,
    organization_id: str,
    status: Mapping[str, Any],
    suspend: bool = False,
    cancel: bool = False,
    files: Mapping[str, str] = _EMPTY,
    names: Mapping[str, str] = _EMPTY,
    trained_tokens: Optional[int] = None,
    result_files: Sequence[str] = (),
    now: Optional[float] = None,
) -> FineTuningJob:
    """The OpenAI job object for a FineTuneJob's `status` (its wire dict, camelCase)."""
    state = phase_status(status.get("phase"), suspend=suspend, cancel=cancel)
    hyper = resolved_hyperparameters(request, status.get("effective"))
    method_type = request.method_type()
    hp_out = hyper.model_dump(exclude_none=True)
    if method_type != "dpo":
        hp_out.pop("beta", None)
    method = JobMethodOut(type=method_type, **{method_type: {"hyperparameters": hp_out}})
    progress = status.get("progress") or {}
    estimated = None
    if state == "running" and progress.get("etaSeconds") is not None:
        estimated = int((now or time.time()) + progress["etaSeconds"])
    tuned = None
    if state == "succeeded":
        tuned = fine_tuned_model(request.model, organization_id, request.suffix, job_id)
    return FineTuningJob(
        id=job_id,
        created_at=created_at,
        error=job_error(status.get("error"), files, names) if state == "failed" else None,
        fine_tuned_model=tuned,
        finished_at=unix(status.get("completionTime")) if state in TERMINAL else None,
        hyperparameters=JobHyperparameters(**{k: v for k, v in hp_out.items() if k != "beta"}),
        model=request.model,
        organization_id=organization_id,
        result_files=list(result_files),
        seed=request.seed if request.seed is not None else 42,
        status=state,
        trained_tokens=trained_tokens if state == "succeeded" else None,
        training_file=request.training_file,
        validation_file=request.validation_file,
        integrations=[],
        estimated_finish=estimated,
        method=method,
        metadata=request.metadata,
        user_provided_suffix=request.suffix,
    )


def openai_checkpoints(
    job_id: str, tuned_model: str, checkpoints: list[Mapping[str, Any]], metrics: Optional[Mapping[str, Any]] = None
) -> list[Checkpoint]:
    """`status.checkpoints` (oldest first: step, uri, loss, time) as OpenAI checkpoints, newest first.
    The newest carries the final eval numbers when the job has them."""
    out: list[Checkpoint] = []
    ordered = sorted(checkpoints, key=lambda c: int(c["step"]))
    for i, ref in enumerate(ordered):
        step = int(ref["step"])
        m = CheckpointMetrics(step=float(step), train_loss=ref.get("loss"))
        if metrics and i == len(ordered) - 1:
            m.valid_loss = metrics.get("evalLoss")
            m.valid_mean_token_accuracy = metrics.get("tokenAccuracy")
            m.full_valid_loss = metrics.get("evalLoss")
            m.full_valid_mean_token_accuracy = metrics.get("tokenAccuracy")
        out.append(
            Checkpoint(
                id=stable_id("ftckpt", job_id, step),
                created_at=unix(ref.get("time")) or 0,
                fine_tuned_model_checkpoint=f"{tuned_model}:ckpt-step-{step}",
                fine_tuning_job_id=job_id,
                step_number=step,
                metrics=m,
            )
        )
    return out[::-1]


# ------------------------------------------------------------------------------------ data checks


_OPENAI_HINTS = (
    (
        re.compile(r"set spec\.method\.type: (dpo|supervised)\b"),
        lambda m: f'create the job with method {{"type": "{m[1]}"}}',
    ),
    (
        re.compile(r"set spec\.method\.type: (kto|orpo)\b"),
        lambda m: f"use kubetune's spec.method.type: {m[1]} (not in OpenAI's API)",
    ),
    (
        re.compile(r"set spec\.dataset\.format: \w+"),
        lambda m: 'convert each line to {"messages": [...]} (the only format of OpenAI\'s API)',
    ),
)


def openai_wording(message: str) -> str:
    """The data layer's hints in the terms of OpenAI's API: a fine-tuning job's `method.type`, and
    chat files only (there is no format field)."""
    for pattern, repl in _OPENAI_HINTS:
        message = pattern.sub(repl, message)
    return message


def check_data(
    train_path: str,
    validation_path: Optional[str],
    *,
    files: Mapping[str, str] = _EMPTY,
    names: Mapping[str, str] = _EMPTY,
    method_type: str = "supervised",
) -> tuple[Optional[JobError], dict]:
    """The trainer's own data checks (kubetune.trainer.data.check: one streaming pass, no torch),
    as `validating_files` runs them: (None, {examples, validationExamples, warnings}) or the job
    error whose `param` names the file line (`training_file:3`). A dpo job's files are checked as
    preference pairs (OpenAI's `input`/`preferred_output`/`non_preferred_output`), as the trainer does."""
    from kubetune.api.contract import file_param
    from kubetune.api.spec import Dataset, Method
    from kubetune.trainer import data

    try:
        dataset = Dataset.model_validate(
            {"train": train_path, "validation": validation_path, "format": "chat", "minExamples": OPENAI_MIN_EXAMPLES}
        )
        method = Method.model_validate(
            {"adaptation": "lora", "type": method_type} if method_type == "dpo" else {"adaptation": "lora"}
        )
        check = data.record_check_for(SimpleNamespace(method=method))
        report = data.check(dataset, record_check=check)
    except data.DataError as err:
        first = err.problems[0] if err.problems else None
        param = file_param(first.file, first.line) if first else None
        return job_error({"code": "InvalidData", "message": openai_wording(str(err)), "param": param}, files, names), {}
    except ValueError as err:  # e.g. a format the data layer does not know yet
        return JobError(code="InvalidData", message=str(err), param="training_file"), {}
    return None, {
        "examples": report.examples,
        "validationExamples": report.validation_examples,
        "warnings": list(report.warnings),
    }
