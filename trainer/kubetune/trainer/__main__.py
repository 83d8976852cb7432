"""The trainer pod's command: `python -m kubetune.trainer --spec FILE|-`.

`python -m kubetune.trainer fetch (--uri URI | --model SOURCE) --dest DIR` instead copies a committed
result (verified against its manifest) or a base model to DIR: the serving pods' init containers
(kubetune.trainer.fetch).

Reads the FineTuneJob (JSON or YAML; the operator passes it as JSON), runs it, writes the
summary to the termination-message path and stdout, and exits 0 on success,
PERMANENT_EXIT_CODE on errors retrying cannot fix, PREEMPTED_EXIT_CODE after a handled SIGTERM,
and 1 for anything else (retriable: the Job's backoffLimit decides).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from kubetune.api.contract import (
    CREDENTIALS_SECRET_ENV,
    DEFAULT_METRICS_PORT,
    DEFAULT_TERMINATION_PATH,
    METRICS_PORT_ENV,
    PERMANENT_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    TERMINATION_PATH_ENV,
    TrainerSummary,
    bounded_summary,
    file_param,
)
from kubetune.api.pod import CREDENTIAL_KEYS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kubetune.trainer", description=__doc__)
    p.add_argument("--spec", required=True, help="FineTuneJob as JSON or YAML: a file, or - for stdin")
    p.add_argument("--output", help="override spec.output.uri")
    p.add_argument("--validate-only", action="store_true", help="only validate the data (no model is loaded)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get(METRICS_PORT_ENV, DEFAULT_METRICS_PORT)),
        help="0: any free port, -1: off",
    )
    p.add_argument("--termination-path", default=os.environ.get(TERMINATION_PATH_ENV, DEFAULT_TERMINATION_PATH))
    p.add_argument(
        "--events", help="append progress and status as JSON lines to this file (kubetune api --local reads them)"
    )
    return p.parse_args(argv)


def event_writer(path: str, opts: Any) -> None:
    """Point `opts`' progress and status callbacks at `path`, one JSON object a line, flushed:
    `{"time", "type": "status", "message"}` and `{"time", "type": "progress", "step", "total",
    "loss", "tokens_per_s", "eta", "tokens", "epoch", "checkpoint_step"}` (the last three read
    from the trainer's own metrics). A worker process that outlives no one needs no port."""
    import json
    import time

    from kubetune.api.contract import TrainerMetric as M

    def write(record: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **record}, allow_nan=False, default=str) + "\n")

    def sample(metric: Any) -> float | None:
        return opts.metrics.registry.get_sample_value(metric.value)

    def on_progress(p: dict[str, Any]) -> None:
        loss = p.get("loss")
        write(
            {
                "type": "progress",
                **{k: v for k, v in p.items() if k != "loss"},
                "loss": loss if isinstance(loss, (int, float)) and loss == loss and abs(loss) != float("inf") else None,
                "tokens": sample(M.TOKENS),
                "epoch": sample(M.EPOCH),
                "checkpoint_step": sample(M.LAST_CHECKPOINT_STEP),
            }
        )

    def on_status(message: str) -> None:
        logging.getLogger("kubetune.trainer").info("%s", message)
        write({"type": "status", "message": message})

    opts.on_progress, opts.on_status = on_progress, on_status


def load_job(source: str) -> Any:
    """The FineTuneJob from a file or stdin; a spec error is a permanent error."""
    import yaml
    from kubetune.api import parse_manifest
    from kubetune.api.manifest import Loader

    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    obj = yaml.load(text, Loader=Loader)  # JSON is YAML
    job, problems = parse_manifest(obj)
    if job is None:
        raise SpecError("; ".join(str(p) for p in problems), next((p.path for p in problems if p.path), None))
    return job


class SpecError(Exception):
    """The FineTuneJob does not parse; `param` is the first problem's field path."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def write_termination(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as err:  # running outside a pod without the path: stdout still has it
        logging.getLogger("kubetune.trainer").debug("termination message not written to %s: %s", path, err)


def gcs_credentials_from_env() -> None:
    """Credentials arrive only through secretKeyRef env vars, but google-auth wants a file: write
    GOOGLE_APPLICATION_CREDENTIALS_JSON to a private file and point GOOGLE_APPLICATION_CREDENTIALS at it."""
    blob = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS_JSON")
    if not blob or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return
    import tempfile

    fd, path = tempfile.mkstemp(prefix="gcp-credentials-", suffix=".json")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(blob)
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = path


def validate_only(job: Any) -> TrainerSummary:
    """The validation Job's work: check the data in one streaming pass (`data.check`, what
    `kubetune validate --data` runs too) without importing the ML stack or loading a model."""
    from kubetune.trainer import data, datareport, sources

    if (too_long := sources.context_problem_for(job.spec)) is not None:  # local and built-in models: no download
        raise SpecError(too_long, "spec.dataset.maxSeqLength")
    report = data.check(
        job.spec.dataset, extra_keys=data.extra_keys_for(job.spec), record_check=data.record_check_for(job.spec)
    )
    # The dataset report (duplicates, leakage, PII, estimates) and spec.dataset.pii: refuse fails here,
    # before any GPU is requested; its summary goes to status.dataReport.
    data_report = datareport.stream(job.spec)
    warnings = report.warnings + datareport.check_policy(data_report)
    for warning in warnings:
        logging.getLogger("kubetune.trainer").warning("%s", warning)
    for line in datareport.summary_lines(data_report):
        logging.getLogger("kubetune.trainer").info("%s", line)
    return TrainerSummary(
        status="validated",
        examples=report.examples,
        validation_examples=report.validation_examples,
        warnings=warnings[:5],
        data_report=datareport.status_summary(data_report),
    )


def failed(reason: str, err: BaseException | str, param: str | None = None) -> TrainerSummary:
    return TrainerSummary(status="failed", reason=reason, message=str(err), param=param)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def missing_credentials(env: Any = None) -> TrainerSummary | None:
    """In a pod whose FineTuneJob names a credentials Secret: the failure to report when none of
    the Secret's keys arrived (the Secret is absent, or holds none of the expected keys)."""
    env = os.environ if env is None else env
    secret = env.get(CREDENTIALS_SECRET_ENV)
    if not secret or any(env.get(key) for key in CREDENTIAL_KEYS):
        return None
    message = (
        f"spec.output.credentialsSecret names Secret {secret!r}, but the pod received none of its keys "
        f"({', '.join(CREDENTIAL_KEYS)}): create the Secret in this namespace with those keys, e.g. "
        f"kubectl create secret generic {secret} --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=..."
    )
    return failed("SecretMissing", message, "spec.output.credentialsSecret")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kubetune.trainer import quiet

    quiet.install()  # before the ML libraries are imported (bitsandbytes logs at import)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch"]:
        from kubetune.trainer import fetch

        gcs_credentials_from_env()
        return fetch.main(argv[1:])
    args = parse_args(argv)
    if (missing := missing_credentials()) is not None:
        return _finish(args, missing, PERMANENT_EXIT_CODE)
    gcs_credentials_from_env()
    if args.validate_only:
        return _finish(args, *_validate_only_summary(args))
    from kubetune.trainer.run import Options, Preempted, UserError, run

    summary: TrainerSummary
    code = 0
    try:
        job = load_job(args.spec)
        opts = Options(output=args.output)
        if args.events:
            event_writer(args.events, opts)
        # Under torchrun one process per pod (local rank 0) serves metrics and writes the
        # termination message; the others would fight over the port and the file.
        if args.metrics_port >= 0 and _local_rank() == 0:
            server = opts.metrics.serve(args.metrics_port)
            print(f"metrics: http://0.0.0.0:{server.server_port}/metrics", flush=True)  # type: ignore[attr-defined]
        summary = TrainerSummary.model_validate(run(job, opts))
    except (SpecError, FileNotFoundError) as err:
        summary, code = failed("InvalidSpec", err, getattr(err, "param", None)), PERMANENT_EXIT_CODE
    except UserError as err:
        summary, code = failed(err.reason, err, err.param), PERMANENT_EXIT_CODE
    except Preempted as err:
        summary, code = TrainerSummary(status="preempted", reason="Preempted", message=str(err)), PREEMPTED_EXIT_CODE
    except Exception as err:  # retriable: the traceback is for operators, not a user error
        from kubetune.trainer.storage import PermanentStorageError, StorageError

        if isinstance(err, StorageError):  # its message says where and what to do; no traceback
            permanent = isinstance(err, PermanentStorageError)
            summary = failed("StorageError", err, "spec.output.uri" if permanent else None)
            if not permanent:  # _finish prints a permanent error's message itself
                print(summary.message, file=sys.stderr)
            return _finish(args, summary, PERMANENT_EXIT_CODE if permanent else 1)
        traceback.print_exc()
        summary, code = failed("Error", f"{type(err).__name__}: {err}"), 1
    return _finish(args, summary, code)


def _validate_only_summary(args: argparse.Namespace) -> tuple[TrainerSummary, int]:
    from kubetune.trainer.data import DataError

    try:
        return validate_only(load_job(args.spec)), 0
    except (SpecError, FileNotFoundError) as err:
        return failed("InvalidSpec", err, getattr(err, "param", None)), PERMANENT_EXIT_CODE
    except DataError as err:
        param = file_param(err.problems[0].file, err.problems[0].line) if err.problems else None
        return failed("InvalidData", err, param), PERMANENT_EXIT_CODE


def _finish(args: argparse.Namespace, summary: TrainerSummary, code: int) -> int:
    """Write the summary where the operator reads it (termination message) and to stdout."""
    text = bounded_summary(summary)
    if _local_rank() == 0:
        write_termination(args.termination_path, text)
    if code == PERMANENT_EXIT_CODE:
        print(summary.message, file=sys.stderr)
    print(text, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
