"""One fine-tuning run, top to bottom: parse → validate data → load → train → save → upload.

The same function runs in the trainer pod (`python -m kubetune.trainer`) and on a laptop
(`kubetune run`). Data is validated before a model byte is loaded; checkpoints go to object
storage while training continues; the adapter and its manifest are written last; the summary
goes to the termination-message path for the operator. When spec.serving needs a full model and
the result is an adapter engines cannot load (DoRA, IA3), a merged copy is committed at `merged/`
first. User-caused errors raise `UserError` (exit code PERMANENT_EXIT_CODE); anything else is
retriable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJob
from kubetune.api.contract import SUMMARY_CHECKPOINTS_MAX, TrainerSummary, file_param
from kubetune.api.enums import TrainingType
from kubetune.api.spec import served_merged
from kubetune.trainer import (
    data,
    datareport,
    evaluation,
    hparams,
    methods,
    objectives,
    optimizers,
    provenance,
    quiet,
    rerun,
    sources,
    storage,
)
from kubetune.trainer import report as html_report
from kubetune.trainer.callbacks import CheckpointUploader, LoopCallback, Preemption, TokenCounter
from kubetune.trainer.metrics import TrainerMetrics

log = logging.getLogger("kubetune.trainer")


class UserError(Exception):
    """An error retrying cannot fix (bad spec, data, model files, lost commit race); `param` is
    the spec field or file:line it is about, when known (the summary's `param`)."""

    def __init__(self, message: str, reason: str = "PermanentError", param: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.param = param


class Preempted(Exception):
    """Training stopped on SIGTERM after its checkpoint was committed."""


@dataclass
class Options:
    output: str | None = None
    metrics: TrainerMetrics = field(default_factory=TrainerMetrics)
    on_progress: Callable[[dict[str, Any]], None] | None = None
    on_status: Callable[[str], None] = lambda msg: log.info(msg)
    scratch: Path | None = None


def run(job: FineTuneJob, opts: Options) -> dict[str, Any]:
    """Train `job`; returns the summary (a `TrainerSummary`'s wire dict). Raises UserError,
    Preempted, or anything retriable. The run's scratch directory (local checkpoints, the result
    before upload: full weights for some methods) is removed when the run ends, however it ends,
    unless the caller gave its own (`opts.scratch`)."""
    quiet.for_run()
    if opts.scratch is not None:
        return _run(job, opts, Path(opts.scratch))
    scratch = Path(tempfile.mkdtemp(prefix="kubetune-"))
    try:
        return _run(job, opts, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(job: FineTuneJob, opts: Options, scratch: Path) -> dict[str, Any]:
    spec = job.spec
    started = time.time()
    out_uri = opts.output or spec.output.uri
    try:
        storage.check_within(out_uri, os.environ.get("KUBETUNE_ALLOWED_OUTPUT_PREFIX"))
    except storage.PermanentStorageError as err:
        raise UserError(f"spec.output.uri: {err}", "InvalidSpec", "spec.output.uri") from None
    # 0. The output: a finished result of this training is reported, not retrained; another
    #    spec's result or checkpoints are refused before anything is read.
    store = storage.Store(out_uri)
    with _output_errors():
        previous = rerun.finished(store, spec, out_uri)
    if previous is not None:
        opts.on_status(
            f"{storage.display_uri(out_uri)} already holds this spec's finished result: nothing to train "
            "(spec.output.overwrite: true, or kubetune run --overwrite, trains it again)"
        )
        return previous

    # 1. Data, before any model is touched.
    opts.on_status(f"validating {spec.dataset.train}")
    try:
        rerun.check_dataset(spec)
    except rerun.Refused as err:
        raise UserError(str(err), err.reason, err.param) from None
    extra_keys = data.extra_keys_for(spec)
    try:
        report = data.validate(
            spec.dataset,
            extra_keys=extra_keys,
            seed=spec.hyperparameters.seed,
            record_check=data.record_check_for(spec),
        )
    except data.DataError as err:
        raise UserError(str(err), "InvalidData", data_param(err)) from None
    # spec.dataset.pii, before anything else sees the data: redacted records are what trains.
    try:
        train_records, val_records, pii_scan, pii_warnings = datareport.enforce(
            spec.dataset.pii, spec.dataset.format, report.train, report.validation
        )
    except data.DataError as err:
        raise UserError(str(err), "InvalidData", data_param(err)) from None
    for warning in report.warnings + pii_warnings:
        log.warning("%s", warning)

    # The output proven writable (a small put + delete) before the model loads.
    with _output_errors():
        rerun.prepare_output(store, spec, out_uri)

    # 2. The model files (downloaded and checked, not loaded yet) and the tokenizer.
    opts.on_status(f"fetching {spec.model.source}")
    try:
        model_dir = sources.resolve_model(spec.model)
        sources.check_model_dir(model_dir, spec.model.trust_remote_code)
    except sources.ModelSourceError as err:
        raise UserError(f"spec.model.source: {err}", "InvalidSpec", "spec.model.source") from None
    if (too_long := sources.context_problem(sources.read_config(model_dir), spec.dataset.max_seq_length)) is not None:
        raise UserError(too_long, "InvalidSpec", "spec.dataset.maxSeqLength")
    # The base's and the datasets' digests hash while it trains (rank 0 alone writes the manifest).
    origin = provenance.Provenance(spec.model.source, model_dir, spec.dataset) if _rank_zero() else None
    from transformers import AutoTokenizer

    load_kwargs = sources.load_pretrained_kwargs(spec.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.dataset.format == "chat":
        data.ensure_chat_template(tokenizer)  # the template training renders with is saved with the result

    # 3. Examples: tokenised with the chat template, split, overlength handled; the dataset report.
    #    Preference and GRPO rows go to TRL as records (it tokenises them), the graders are built now.
    kind = spec.method.training_type
    supervised = kind == TrainingType.SUPERVISED
    scorers: list[Any] = []
    if supervised:
        try:
            fmt = spec.dataset.format  # each record tokenised once: the report counts it, training keeps it
            train_enc, val_enc = (
                data.encode_all(train_records, fmt, tokenizer),
                data.encode_all(val_records, fmt, tokenizer),
            )
            data_report = datareport.build(spec, train_records, val_records, encoded=train_enc + val_enc, scan=pii_scan)
            train, train_dropped = _encode(train_enc, spec)
            val, val_dropped = _encode(val_enc, spec)
        except data.DataError as err:
            raise UserError(str(err), "InvalidData", data_param(err)) from None
        # Examples whose answer truncation cut off are dropped and said; none left is permanent.
        if train_dropped or val_dropped:
            log.warning("%s", data.unsupervised_warning(train_dropped + val_dropped, spec.dataset.max_seq_length))
        for part, kept, dropped in (("training", train, train_dropped), ("validation", val, val_dropped)):
            if dropped and not kept:
                raise UserError(
                    data.no_supervision_message(part, dropped, spec.dataset.max_seq_length),
                    "InvalidData",
                    "spec.dataset.maxSeqLength",
                )
    else:
        from kubetune.trainer import graders, preference

        data_report = datareport.build(spec, train_records, val_records, scan=pii_scan)
        preference.ensure_chat_template(tokenizer)
        try:
            train = preference.rows(train_records + val_records, kind)  # one form across both files
        except data.DataError as err:
            raise UserError(str(err), "InvalidData", data_param(err)) from None
        train, val = train[: len(train_records)], train[len(train_records) :]
        if kind == TrainingType.GRPO:
            assert spec.method.grpo is not None  # the spec's rules: type grpo needs a grpo block
            try:
                scorers = graders.build(spec.method.grpo.graders)
            except graders.GraderError as err:
                raise UserError(str(err), "InvalidSpec", err.param) from None
    if not train or not val:
        raise UserError(
            "spec.dataset: no example is left after dropping overlength ones; raise maxSeqLength",
            "InvalidData",
            "spec.dataset.maxSeqLength",
        )

    # 4. The model, shaped by the adaptation.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = hparams.device()
    if device == "cpu":  # said once, here: everything after follows `device`
        (log.warning if spec.resources.gpus else opts.on_status)("no GPU: training on CPU")
    adaptation = methods.build(spec.method.adaptation, spec.method.config())
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    _check_model_fits(spec, adaptation, config)  # packing and adapter targets, from config.json alone
    torch.manual_seed(spec.hyperparameters.seed)
    opts.on_status("loading the base model")
    # fp32 master weights for whatever trains, a frozen base in the compute dtype on a GPU
    # (hparams.load_dtype), whatever dtype the checkpoint was saved in.
    placement: dict[str, Any] = {"dtype": hparams.load_dtype(spec, device)}
    if device == "cuda":
        # Straight onto this process's GPU (4-bit weights can only be quantised there).
        placement["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if spec.dataset.packing:
        # Packed rows: flash-attention varlen on a GPU that has it (padding-free), else SDPA
        # with the block-diagonal mask transformers derives from the position restarts.
        placement["attn_implementation"] = data.packing_attention(device, config)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, **load_kwargs, **{**placement, **adaptation.load_kwargs(device)}
    )
    chosen = _after_load(adaptation, model)  # targets again on the loaded model: before base evaluation
    _, total_params = methods.count_parameters(model)
    effective = hparams.resolve(
        spec,
        adaptation.default_learning_rate,
        total_params,
        config.hidden_size,
        config.num_hidden_layers,
        getattr(config, "vocab_size", None),
        getattr(config, "intermediate_size", None),
    )
    effective.update(chosen)
    collate = data.Collator(tokenizer.pad_token_id, packing=False)
    metrics = opts.metrics
    results: dict[str, Any] = {}  # numbers, and the per-objective numbers under `objectives`
    objective_numbers: dict[str, float] = {}

    def on_objective_metrics(values: dict[str, float]) -> None:
        objective_numbers.update(values)
        for name, value in values.items():
            metrics.objective.labels(name=name).set(value)

    if spec.evaluation.compare_base and supervised:
        opts.on_status("evaluating the base model")
        base = evaluate(model, val, collate, effective["batchSize"])
        results["baseEvalLoss"] = base["loss"]
        metrics.base_eval_loss.set(base["loss"])
    elif spec.evaluation.compare_base:
        opts.on_status("evaluating the base model on the held-out data")
        base_numbers = preference.heldout(model, tokenizer, val, spec, scorers)
        results.update(_held_out_results(base_numbers, "base"))
        on_objective_metrics({("base" + k[0].upper() + k[1:]): v for k, v in base_numbers.items() if "/" not in k})
    # Generation A/B on held-out prompts (SFT; the preference types compare by preference accuracy
    # or grader score above).
    samples = (
        evaluation.pick(val_records, spec.dataset.format, spec.evaluation.samples)
        if supervised and _rank_zero()
        else []
    )
    base_answers: list[str] = []
    if samples:
        opts.on_status(f"answering {len(samples)} held-out prompts with the base model")
        base_answers = evaluation.generate(
            model, tokenizer, samples, spec.evaluation.max_new_tokens, spec.hyperparameters.seed
        )
    model = adaptation.apply(model, tokenizer)
    effective.update(hparams.master_weights(model, effective["precision"]))
    opts.metrics.set_effective(effective)
    trainable, adapted_params = methods.count_parameters(model)  # an adapter's parameters count in the total

    # 5. Train, resuming from the newest committed checkpoint.
    resume = storage.latest_valid_checkpoint(store, scratch / "resume")
    digest = rerun.digest_of(spec)
    if resume:
        try:  # checked before anything loaded too (rerun.finished); this catches one committed since then
            rerun.check_checkpoint(resume.manifest, digest, resume.uri or out_uri)
        except rerun.Refused as err:
            raise UserError(str(err), err.reason, err.param) from None
    skipped = resume.skipped
    train_set: list[Any] = train
    if spec.dataset.packing:
        try:
            data.prepare_model_for_packing(model)
        except ValueError as err:
            raise UserError(f"spec.dataset.packing: {err}", "InvalidSpec", "spec.dataset.packing") from None
        train_set = data.pack(train, spec.dataset.max_seq_length)
    tokens = TokenCounter(data.Collator(tokenizer.pad_token_id, packing=spec.dataset.packing))
    preemption = Preemption()
    preemption.install()

    def eval_now() -> dict[str, float]:
        if not supervised:
            res = preference.heldout(model, tokenizer, val, spec, scorers)
            on_objective_metrics({k: v for k, v in res.items() if "/" not in k})
            return res
        res = evaluate(model, val, collate, effective["batchSize"])
        metrics.eval_loss.set(res["loss"])
        loop.eval_losses.append((trainer.state.global_step, res["loss"]))
        trainer.state.log_history.append(
            {"step": trainer.state.global_step, "eval_loss": res["loss"]}
        )  # kept by checkpoints
        return res

    periodic_eval = eval_now if kind != TrainingType.GRPO else None  # GRPO's greedy generation: at the end only
    loop = LoopCallback(metrics, tokens, preemption, opts.on_progress, periodic_eval, spec.evaluation.every_steps)
    uploader = CheckpointUploader(
        commit=lambda local, step: storage.commit_checkpoint(
            store, local, step, {"jobName": job.metadata.name, rerun.DIGEST_KEY: digest}
        ),
        prune=lambda: storage.prune_checkpoints(store, spec.checkpointing.keep),
        metrics=metrics,
        loop=loop,
    )
    callbacks = [loop, uploader, *adaptation.callbacks()]
    lr, wd = effective["learningRate"], spec.hyperparameters.weight_decay
    groups = adaptation.param_groups(lr, wd)
    if groups is None:
        groups = optimizers.default_groups(model, wd)
    try:
        optimizer = optimizers.build(spec.method.optimizer, groups, lr, wd)
    except ValueError as err:
        raise UserError(str(err), "InvalidSpec", "spec.method.optimizer") from None
    terms = []
    if spec.method.objectives:
        ctx = objectives.Context(
            spec=spec,
            tokenizer=tokenizer,
            model_dir=model_dir,
            validation=val,
            collate=collate,
            load_model=lambda source: _load_other(source, device),
            max_steps=lambda: trainer.state.max_steps,
            global_step=lambda: trainer.state.global_step,
        )
        try:
            terms = objectives.build(spec, ctx)
            for _, term in terms:
                term.prepare(model)
        except objectives.IncompatibleError as err:
            raise UserError(str(err), err.reason, "spec.method.objectives") from None
    if supervised:
        trainer = _trainer(
            model,
            train_set,
            tokens,
            effective,
            spec,
            scratch / "run",
            callbacks,
            optimizer,
            terms,
            on_objective_metrics,
        )
    else:
        args = preference.training_args(spec, effective, scratch / "run", hparams.device() == "cpu", _SCHEDULERS)
        callbacks.append(preference.TrlMetrics(on_objective_metrics).callback)
        trainer = preference.build_trainer(spec, model, tokenizer, train, args, callbacks, optimizer, scorers)
        tokens.collate, trainer.data_collator = trainer.data_collator, tokens  # count what TRL's collator batches
    opts.on_status(
        f"training: {trainable:,} of {adapted_params:,} parameters ({effective['weightsDtype']} weights, "
        f"{effective['computeDtype']} compute)"
    )
    resume_dir = None
    if resume.step is not None:  # a checkpoint verified (what `if resume` tests)
        resume_dir = str(resume.path)
        loop.on_train_begin_resume(resume.step)
        opts.on_status(f"resuming from checkpoint step {resume.step}")
    try:
        try:
            if resume and resume.path is not None and rerun.reached_end(resume.path):
                rerun.load_final_checkpoint(trainer, resume.path)  # all steps done: evaluate and commit only
                loop.restore_history(trainer.state)
            else:
                trainer.train(resume_from_checkpoint=resume_dir)
        finally:
            preemption.uninstall()  # from here a Ctrl-C interrupts at once
            uploader.finish()
    except storage.PermanentStorageError as err:  # a checkpoint commit refused (bucket deleted, key revoked)
        raise UserError(
            f"spec.output.uri: committing a checkpoint failed: {err}", "StorageError", "spec.output.uri"
        ) from None
    if preemption.requested.is_set():
        raise Preempted(f"stopped on {preemption.name} at step {trainer.state.global_step}; checkpoint committed")

    # 6. Evaluate, save, upload: the manifest is written last.
    final = eval_now()
    if supervised:
        results.update({"evalLoss": final["loss"], "tokenAccuracy": final["tokenAccuracy"]})
        results["perplexity"] = math.exp(min(final["loss"], 50))
        metrics.token_accuracy.set(final["tokenAccuracy"])
    else:
        numbers = _held_out_results(final, "")
        results["objectives"] = {**results.get("objectives", {}), **numbers.pop("objectives", {})}
        results.update(numbers)
        for scorer in scorers:
            scorer.close()
    if loop.last_loss is not None:
        results["trainLoss"] = loop.last_loss
    results["tokensPerSecond"] = float(metrics.tokens_per_second._value.get())
    if objective_numbers:
        results["objectives"] = {**results.get("objectives", {}), **objective_numbers}
    if loop.gpu.joules:
        results["energyKWh"] = loop.gpu.joules / 3.6e6
    sample_rows: list[dict[str, Any]] = []
    if samples:
        opts.on_status(f"answering {len(samples)} held-out prompts with the tuned model")
        sample_rows = _generation_ab(spec, model, tokenizer, samples, base_answers, results, metrics)
    if not trainer.is_world_process_zero():
        # Under torchrun every rank trains; global rank 0 alone saves and commits the result.
        worker = TrainerSummary(
            status="succeeded", role="worker", rank=int(os.environ.get("RANK", "0")), metrics=results
        )
        return worker.wire()
    result_dir = scratch / "result"
    opts.on_status("saving the adapter")
    merged = str(spec.output.format) == "merged"
    adaptation.save(model, result_dir, merged, model_dir)
    provenance.fix_adapter_config(result_dir, spec.model.source, origin.revision if origin else None)
    tokenizer.save_pretrained(result_dir)
    (result_dir / "training_log.json").write_text(json.dumps({"losses": loop.losses}))
    report_data = {
        "name": job.metadata.name,
        "baseModel": spec.model.source,
        "method": str(spec.method.adaptation),
        "steps": trainer.state.global_step,
        "durationSeconds": round(time.time() - started, 1),
        "metrics": results,
        "history": {
            "loss": loop.losses,
            "evalLoss": loop.eval_losses,
            "learningRate": loop.learning_rates,
            "tokensPerSecond": loop.throughput,
        },
        "samples": sample_rows,
        "dataReport": data_report,
        "cost": {"energyKWh": results.get("energyKWh")},
    }
    manifest_extra = {
        "name": job.metadata.name + (f"-{spec.suffix}" if spec.suffix else ""),
        "baseModel": spec.model.source,
        "method": spec.method.wire(),
        "hyperparameters": effective,
        "metrics": results,
        "trainableParameters": trainable,
        "versions": _versions(),
        **(origin.record() if origin else {}),
        "dataPolicy": {
            "pii": str(spec.dataset.pii),
            "findings": pii_scan.total,
            "redactedExamples": pii_scan.redacted,
            "byKind": dict(pii_scan.counts),
        },
    }
    manifest_extra[rerun.DIGEST_KEY] = digest
    try:
        manifest_extra["reports"] = _write_reports(store, report_data, sample_rows, data_report)
        merged_uri = _merged_for_serving(
            spec, adaptation, model, tokenizer, model_dir, result_dir, store, manifest_extra, opts
        )
        summary = TrainerSummary(
            status="succeeded",
            adapter={
                "uri": storage.safe_join(out_uri, "adapter"),
                "manifestUri": storage.safe_join(out_uri, "manifest.json"),
                "mergedUri": merged_uri,
            },
            metrics=results,
            checkpoints=kept_checkpoints(store, uploader.committed, spec.checkpointing.keep),
            checkpoint_corrupt=[f"step {s}: {r}" for s, r in skipped][:3],
            effective=effective,
            steps=trainer.state.global_step,
            trainable_parameters=trainable,
            duration_seconds=round(time.time() - started, 1),
            checkpoint_stall_seconds=max(uploader.stalls) if uploader.stalls else None,
            seconds_per_step=statistics.median(loop.step_seconds) if loop.step_seconds else None,
            data_report=datareport.status_summary(data_report),
            report_uri=storage.safe_join(out_uri, html_report.REPORT_FILE),
        )
        manifest_extra[rerun.SUMMARY_KEY] = summary.wire()  # what a rerun of this spec reports (rerun.finished_summary)
        storage.commit_result(store, result_dir, manifest_extra)
        return rerun.finished_summary(store, storage.read_manifest(store, ""))
    except storage.CommitConflict as err:
        raise UserError(str(err), "StorageError", "spec.output.uri") from None
    except storage.StorageError as err:
        resumed = [{"step": resume.step, "uri": resume.uri}] if resume and resume.uri else []
        # The scratch directory goes when the run ends: the uncommitted result moves out of it first.
        kept_dir = Path(tempfile.mkdtemp(prefix="kubetune-result-")) / "result"
        shutil.move(str(result_dir), kept_dir)
        kept_note = rerun.kept_result_message(kept_dir, uploader.committed or resumed)
        if isinstance(err, storage.PermanentStorageError):
            raise UserError(
                f"spec.output.uri: committing the result failed: {err} {kept_note}", "StorageError", "spec.output.uri"
            ) from None
        raise storage.StorageError(f"spec.output.uri: committing the result failed: {err} {kept_note}") from None


@contextlib.contextmanager
def _output_errors() -> Iterator[None]:
    """rerun's refusals and the output store's errors before training, as the entry points report
    them: UserError (permanent, naming the field), or a retriable StorageError naming spec.output.uri."""
    try:
        yield
    except rerun.Refused as err:
        raise UserError(str(err), err.reason, err.param) from None
    except storage.PermanentStorageError as err:
        raise UserError(f"spec.output.uri: {err}", "StorageError", "spec.output.uri") from None
    except storage.StorageError as err:  # transient: retriable, still before the model loaded
        raise storage.StorageError(f"spec.output.uri: {err}") from None


def _check_model_fits(spec: Any, adaptation: Any, config: Any) -> None:
    """Refuse, before any weight loads, what this model family cannot do: packing where its
    attention does not keep packed examples apart, adapter targets that match none (or only some)
    of its layers. The targets are checked on the model built from config.json on the meta device."""
    from kubetune.trainer.methods import families, targets

    if spec.dataset.packing:
        try:
            families.check_packing(config)
        except ValueError as err:
            raise UserError(f"spec.dataset.packing: {err}", "InvalidSpec", "spec.dataset.packing") from None
    if adaptation.facts.targets:
        skeleton = targets.skeleton(config, spec.model.trust_remote_code)
        if skeleton is not None:
            _targets(adaptation, skeleton, quiet=True)


def _targets(adaptation: Any, model: Any, quiet: bool = False) -> dict[str, Any]:
    """The adapter's resolved targets as status.effective keys ({} for methods without targets)."""
    from kubetune.trainer.methods import targets

    try:
        resolved = adaptation.resolve_targets(model, quiet)
    except targets.TargetError as err:
        raise UserError(str(err), "InvalidSpec", err.param) from None
    return {} if resolved is None else resolved.effective()


def _after_load(adaptation: Any, model: Any) -> dict[str, Any]:
    """The method's check of the loaded model (qlora: it really is 4-bit), then its targets."""
    from kubetune.trainer.methods import targets

    try:
        adaptation.after_load(model)
    except targets.TargetError as err:
        raise UserError(str(err), "InvalidSpec", err.param) from None
    return _targets(adaptation, model)


def _rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _generation_ab(
    spec: Any,
    model: Any,
    tokenizer: Any,
    samples: list[evaluation.Sample],
    base_answers: list[str],
    results: dict[str, Any],
    metrics: TrainerMetrics,
) -> list[dict[str, Any]]:
    """The tuned model's answers to the samples, base and tuned scored (and judged) into
    results["generation"] and the generation-score gauge; the rows of eval/samples.jsonl."""
    ev = spec.evaluation
    tuned_answers = evaluation.generate(model, tokenizer, samples, ev.max_new_tokens, spec.hyperparameters.seed)
    names = [str(m) for m in ev.metrics]
    generation: dict[str, Any] = {
        "samples": len(samples),
        "base": evaluation.score(base_answers, samples, names, ev.regex),
        "tuned": evaluation.score(tuned_answers, samples, names, ev.regex),
    }
    verdicts = None
    if ev.judge is not None:
        generation["judge"], verdicts = evaluation.judge_samples(ev.judge, samples, base_answers, tuned_answers)
        if "winRate" in generation["judge"]:
            metrics.generation_score.labels(model="tuned", metric="judgeWinRate").set(generation["judge"]["winRate"])
    for who in ("base", "tuned"):
        for name, value in generation[who].items():
            metrics.generation_score.labels(model=who, metric=name).set(value)
    results["generation"] = generation
    return evaluation.rows(samples, base_answers, tuned_answers, names, ev.regex, verdicts)


def _write_reports(
    store: storage.Store, report_data: dict[str, Any], sample_rows: list[dict[str, Any]], data_report: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """eval/samples.jsonl, data-report.json, report-data.json and report.html at the output's root,
    before the manifest (which records each one's sha256 and size). Nothing is written over another
    job's committed output."""
    if store.exists(storage.MANIFEST):
        raise storage.CommitConflict(
            f"{storage.display_uri(store.uri_for(storage.MANIFEST))} already exists: another job committed to this output. "
            "Give this job its own spec.output.uri."
        )
    files: dict[str, bytes] = {
        datareport.REPORT_FILE: json.dumps(data_report, indent=1).encode(),
        html_report.DATA_FILE: html_report.to_json(report_data),
    }
    if sample_rows:
        files[evaluation.SAMPLES_FILE] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows).encode()
    files[html_report.REPORT_FILE] = html_report.render(json.loads(files[html_report.DATA_FILE])).encode()
    for key, blob in files.items():
        store.put_bytes(key, blob)
    return {key: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)} for key, blob in files.items()}


MERGED = "merged"
"""`<output>/merged/`: the base with the adapter folded in, for engines that cannot load the adapter."""


def _merged_for_serving(
    spec: Any,
    adaptation: Any,
    model: Any,
    tokenizer: Any,
    model_dir: Path,
    result_dir: Path,
    store: storage.Store,
    manifest_extra: dict[str, Any],
    opts: Options,
) -> str | None:
    """The URI of a full model an engine can serve, when spec.serving needs one (`served_merged`):
    the result itself when it is already full weights (full, layers, transfer, gradualUnfreeze,
    or output.format: merged), else a merged copy committed at `merged/` with its own manifest.
    The copy is committed before the result's manifest, which stays the last write and records
    the copy's manifest digest. None when the result is served as a LoRA adapter (or not served)."""
    if spec.serving is None:
        return None
    if not (result_dir / "adapter_config.json").is_file():  # what `save` wrote is already full weights
        return store.uri_for(storage.ADAPTER)  # (lora/qlora with output.format: merged too)
    if not served_merged(spec.method.adaptation):
        return None  # a LoRA adapter: engines load it on the base
    if store.exists(storage.MANIFEST):  # checked before the upload, as commit_result does before its own
        raise storage.CommitConflict(
            f"{storage.display_uri(store.uri_for(storage.MANIFEST))} already exists: another job committed to this output. "
            "Give this job its own spec.output.uri."
        )
    opts.on_status("merging the adapter into the base for serving")
    merged_dir = result_dir.parent / MERGED
    adaptation.save(model, merged_dir, True, model_dir)  # peft's merge_and_unload: the model is not used after this
    tokenizer.save_pretrained(merged_dir)
    merged = storage.upload_dir(merged_dir, store, MERGED, {**manifest_extra, "mergedFrom": storage.ADAPTER})
    digest = hashlib.sha256(store.read_bytes(f"{MERGED}/{storage.MANIFEST}")).hexdigest()
    manifest_extra["merged"] = {
        "prefix": MERGED,
        "sha256": digest,
        "bytes": sum(f["bytes"] for f in merged["files"].values()),
    }
    return store.uri_for(MERGED)


def _held_out_results(numbers: dict[str, float], prefix: str) -> dict[str, Any]:
    """preference.heldout's numbers as summary metrics: preferenceAccuracy / meanReward (with the
    `base` prefix for the base model), per-grader means under objectives."""
    out: dict[str, Any] = {}
    for key, value in numbers.items():
        if "/" in key:
            out.setdefault("objectives", {})[(prefix + "/" if prefix else "heldout/") + key] = value
        else:
            out[prefix + key[0].upper() + key[1:] if prefix else key] = value
    return out


def kept_checkpoints(store: storage.Store, committed: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The checkpoints storage still holds after pruning (newest `keep`), with the step's loss and
    time where this run committed it: what `status.checkpoints` mirrors. A listing that fails
    falls back to this run's commits (the trainer prunes to the same `keep`)."""
    details = {c["step"]: c for c in committed}
    limit = max(1, min(keep, SUMMARY_CHECKPOINTS_MAX))
    try:
        steps = storage.list_checkpoints(store)[-limit:]
    except storage.StorageError as err:
        log.warning("listing the kept checkpoints failed: %s", err)
        steps = sorted(details)[-limit:]
    return [details.get(s) or {"step": s, "uri": store.uri_for(storage.checkpoint_prefix(s))} for s in steps]


def data_param(err: data.DataError) -> str | None:
    """file:line of the first data problem, for the summary's `param`."""
    return file_param(err.problems[0].file, err.problems[0].line) if err.problems else None


def evaluate(model: Any, examples: list[Any], collate: Any, batch_size: int) -> dict[str, float]:
    """Token-weighted held-out loss and exact-match token accuracy over the label tokens, from
    chunked logits (`chunked.token_stats`) where the model can skip its full logits."""
    import torch
    from kubetune.trainer import chunked

    use_hidden = chunked.supports_hidden(model)
    was_training = model.training
    model.eval()
    total_loss = 0.0
    total_tokens = 0
    correct = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i : i + batch_size])
            batch.pop(data.GUIDE_MASK_KEY, None)
            labels = batch.pop("labels").to(device)
            batch = {k: v.to(device) for k, v in batch.items()}
            if use_hidden:
                loss_sum, n, right = chunked.token_stats(chunked.forward_hidden(model, batch, labels.shape[1]), labels)
                total_loss, total_tokens, correct = total_loss + loss_sum, total_tokens + n, correct + right
                continue
            logits = model(**batch).logits[:, -labels.shape[1] :, :].float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            mask = shift_labels != data.IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total_loss += float(loss)
            total_tokens += int(mask.sum())
            correct += int(((shift_logits.argmax(-1) == shift_labels) & mask).sum())
    if was_training:
        model.train()
    n = max(total_tokens, 1)
    return {"loss": total_loss / n, "tokenAccuracy": correct / n}


def _trainer(
    model: Any,
    train_set: list[Any],
    collator: Any,
    eff: dict[str, Any],
    spec: Any,
    out: Path,
    callbacks: list[Any],
    optimizer: Any,
    terms: list[Any],
    on_metrics: Callable[[dict[str, float]], None],
) -> Any:
    from transformers import Trainer, TrainingArguments

    hp = spec.hyperparameters
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=eff["epochs"],
        max_steps=hp.max_steps or -1,
        learning_rate=eff["learningRate"],
        per_device_train_batch_size=eff["batchSize"],
        gradient_accumulation_steps=eff["gradientAccumulation"],
        warmup_steps=hp.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=_SCHEDULERS[str(hp.scheduler)],
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=eff["precision"] in ("bf16", "pureBf16"),
        fp16=eff["precision"] == "fp16",
        activation_checkpointing=hp.gradient_checkpointing,  # transformers 5's name (the old one warns)
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.checkpointing.every_steps,
        save_total_limit=None,
        save_only_model=False,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=hparams.device() == "cpu",
        eval_strategy="no",
    )
    common = dict(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=collator,
        callbacks=callbacks,
        optimizers=(optimizer, None),
    )
    trainer: Trainer
    if terms:
        trainer = objectives.ObjectiveTrainer(**common, terms=terms, on_metrics=on_metrics)
    else:
        trainer = objectives.ChunkedTrainer(**common)
    trainer.remove_callback(_printer())
    return trainer


_SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constantWithWarmup": "constant_with_warmup",
    "slantedTriangular": "linear",  # ULMFiT's STLR: linear warm-up then linear decay
}


def _printer() -> type:
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback


def _encode(encodings: list[Any], spec: Any) -> tuple[list[Any], list[Any]]:
    """The examples that train (tokens, labels, guidance mask) and the records dropped because
    truncation left them no trained token; the records were tokenised once, by data.encode_all."""
    ds = spec.dataset
    return data.training_examples(encodings, ds.max_seq_length, ds.overlength, data.spans_field_for(spec))


def _load_other(source: Any, device: str) -> tuple[Any, Any]:
    """A second model (a teacher) with the same safety checks as the base, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = sources.resolve_model(source)
        sources.check_model_dir(path, source.trust_remote_code)
    except sources.ModelSourceError as err:
        raise UserError(f"teacher {source.source}: {err}", "InvalidSpec", "spec.method.objectives") from None
    kwargs = sources.load_pretrained_kwargs(source.trust_remote_code)
    # transformers decorates PreTrainedModel.to with functools.wraps, whose typeshed stub drops the bound self
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=source.trust_remote_code)
    return model, tok


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    import platform

    for pkg in (
        "kubetune",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "trl",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    return out
