"""What a run finds at spec.output.uri and the dataset URIs before it trains, decided before the
model loads (`finished` even before the data is read).

* A committed `manifest.json` of this same training (`crd.training_digest`) is a finished run:
  its summary, recorded in the manifest, is returned and nothing is read, loaded or trained. One
  of another spec is refused, unless `spec.output.overwrite` asks for it to be deleted first.
* A committed checkpoint of another training is refused: resuming it would crash on mismatched
  shapes or silently keep the old learning rate, data or method.
* Writability and credentials are proven with a small put + delete (`preflight`) and each dataset
  file with a one-byte read (`check_dataset`), so that a bad key or a missing bucket fails in
  seconds, permanently, instead of after the model loads or at the first checkpoint; a failing
  store is a retriable StorageError.
* A checkpoint at the last step is finished training (`reached_end`): a rerun after a failed
  commit only evaluates and commits it (`load_final_checkpoint`), and a failed commit says where
  the result still is (`kept_result_message`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from kubetune.api.contract import TrainerSummary
from kubetune.api.crd import training_digest
from kubetune.trainer import storage

log = logging.getLogger("kubetune.trainer")

DIGEST_KEY = "trainingDigest"
"""The manifest key (checkpoints and the result) holding the training digest of the spec that wrote it."""
SUMMARY_KEY = "summary"
"""The result manifest's copy of the run's summary (all but the manifest's own digest and size)."""
PREFLIGHT_PREFIX = ".kubetune-preflight"
TRAINER_STATE = "trainer_state.json"


class Refused(Exception):
    """The output holds something this run must not use or replace; `param` names the spec field."""

    def __init__(self, message: str, param: str = "spec.output.uri", reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.param, self.reason = param, reason


def digest_of(spec: Any) -> str:
    return training_digest(spec.wire())


def preflight(store: storage.Store) -> None:
    """Write and delete one small object under the output: credentials, the bucket and the right
    to write and delete, checked now. Raises the store's own errors (permanent or transient)."""
    key = f"{PREFLIGHT_PREFIX}-{uuid.uuid4().hex[:12]}"
    # A local output directory the check creates is removed again: a run refused later (bad
    # targets, no trained token) leaves the output as it found it.
    created: list[Path] = []  # the output directory and the parents the put will make, innermost first
    if store.local:
        missing = Path(store.root)
        while not missing.exists() and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
    try:
        store.put_bytes(key, b"kubetune preflight: safe to delete\n")
        store.rm(key)
        for directory in created:
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
    except storage.StorageError as err:
        kind = type(err) if isinstance(err, storage.PermanentStorageError) else storage.StorageError
        raise kind(f"the write check before training (put and delete of one small object) failed: {err}") from err


def finished(store: storage.Store, spec: Any, out_uri: str) -> dict[str, Any] | None:
    """Read-only, before the data is read: the previous summary (a wire dict) when this training
    already finished at the output; Refused when the output holds another spec's result or
    checkpoint (unless spec.output.overwrite, which `prepare_output` then applies); else None."""
    digest = digest_of(spec)
    if store.exists(storage.MANIFEST) and not spec.output.overwrite:
        manifest = storage.read_manifest(store, "")
        if manifest.get(DIGEST_KEY) == digest and isinstance(manifest.get(SUMMARY_KEY), dict):
            return finished_summary(store, manifest)
        why = (
            "was written by another spec (model, data, method or hyperparameters differ)"
            if manifest.get(DIGEST_KEY)
            else "records no training digest (an older kubetune, or another tool), so it cannot be matched to this spec"
        )
        raise Refused(
            f"spec.output.uri: {storage.display_uri(out_uri)} already holds a finished result that {why}. Change "
            "spec.output.uri, or set spec.output.overwrite: true (kubetune run --overwrite) to delete it and train again."
        )
    if not spec.output.overwrite:
        check_checkpoints(store, digest)
    return None


def prepare_output(store: storage.Store, spec: Any, out_uri: str) -> None:
    """After the data checked out and before the model loads: the output proven writable
    (`preflight`), and with spec.output.overwrite a finished result and another spec's
    checkpoints deleted. Raises storage errors."""
    preflight(store)
    if spec.output.overwrite:
        if store.exists(storage.MANIFEST):
            remove_result(store)
            log.warning(
                "spec.output.overwrite: deleted the finished result and checkpoints at %s; training starts over",
                storage.display_uri(out_uri),
            )
        check_checkpoints(store, digest_of(spec), overwrite=True)


def check_checkpoints(store: storage.Store, digest: str, overwrite: bool = False) -> None:
    """Refuse the committed checkpoints of another training (their manifest's digest differs), or
    with `overwrite` delete them; those written before digests were recorded are accepted."""
    for step in storage.list_checkpoints(store):
        try:
            manifest = storage.read_manifest(store, storage.checkpoint_prefix(step))
        except storage.ObjectNotFound:
            continue  # pruned meanwhile
        except storage.PermanentStorageError as err:
            if "is not a valid manifest" in str(err):
                continue  # resume skips and reports it (CheckpointCorrupt)
            raise
        try:
            check_checkpoint(manifest, digest, store.uri_for(storage.checkpoint_prefix(step)))
        except Refused:
            if not overwrite:
                raise
            store.rm(storage.CHECKPOINTS, recursive=True)
            log.warning(
                "spec.output.overwrite: deleted the checkpoints of another spec under %s",
                storage.display_uri(store.uri_for(storage.CHECKPOINTS)),
            )
            return


def check_checkpoint(manifest: dict[str, Any] | None, digest: str, uri: str) -> None:
    recorded = (manifest or {}).get(DIGEST_KEY)
    if recorded is not None and recorded != digest:
        raise Refused(
            f"spec.output.uri: the checkpoint {storage.display_uri(uri)} was written by a different spec (model, data, "
            "method or hyperparameters changed since it was saved), so training cannot resume from it. Change "
            f"spec.output.uri, or delete the checkpoints under {storage.display_uri(storage.safe_join(store_root(uri), storage.CHECKPOINTS))} "
            "to train this spec from the start."
        )


def store_root(checkpoint_uri: str) -> str:
    """The output URI a checkpoint URI (`<output>/checkpoints/step-N`) lies under."""
    return checkpoint_uri.rstrip("/").rsplit("/", 2)[0]


def remove_result(store: storage.Store) -> None:
    """Delete a finished output for spec.output.overwrite: the checkpoints first (the result still
    stands if this stops half-way, and a rerun deletes again), then manifest.json (from then on
    readers see no result), then everything else the result wrote."""
    store.rm(storage.CHECKPOINTS, recursive=True)
    store.rm(storage.MANIFEST)
    for key in store.ls(""):
        store.rm(key, recursive=True)


def finished_summary(store: storage.Store, manifest: dict[str, Any]) -> dict[str, Any]:
    """The summary the finished run returned, rebuilt from its manifest: the recorded summary plus
    the manifest's digest and the adapter's size, as `run` reports them."""
    summary = TrainerSummary.model_validate(manifest[SUMMARY_KEY])
    sha = hashlib.sha256(store.read_bytes(storage.MANIFEST)).hexdigest()
    if summary.adapter is not None:
        summary.adapter.sha256 = sha
        summary.adapter.bytes = sum(
            f["bytes"] for k, f in manifest["files"].items() if k.startswith(storage.ADAPTER + "/")
        )
    return summary.wire()


def reached_end(checkpoint: Path) -> bool:
    """Whether a checkpoint already holds the last step of its training (its trainer_state's
    global_step ≥ max_steps, which the training digest fixes): resuming it must not train a step
    past the end (transformers' loop runs one before it checks), only evaluate and commit."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        return int(state["global_step"]) >= int(state["max_steps"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_final_checkpoint(trainer: Any, checkpoint: Path) -> None:
    """The trained weights and the Trainer's state (step count, loss log) of a finished checkpoint,
    without entering the training loop."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE))


def kept_result_message(result_dir: Path, committed: list[dict[str, Any]]) -> str:
    """Where the trained result still is after its commit failed: the local copy, and the newest
    checkpoint this run committed (a rerun of the same spec resumes from it)."""
    text = f"The trained result is kept at {result_dir} (in this container until it exits)"
    if committed:
        last = committed[-1]
        text += (
            f"; the checkpoint of step {last['step']} stays committed at {storage.display_uri(last['uri'])} and a "
            "rerun of this spec resumes from it, only evaluating and committing"
        )
    return text + "."


def check_dataset(spec: Any) -> None:
    """Read the first byte of each dataset file: a missing file or bucket and denied credentials
    are Refused (naming the field) and a failing store a retriable StorageError, before the full
    read and long before the model loads. Content problems are data.validate's."""
    import fsspec
    from kubetune.trainer import data

    for param, uri in (
        ("spec.dataset.train", spec.dataset.train),
        ("spec.dataset.validation", spec.dataset.validation),
    ):
        if not uri:
            continue
        where = storage.display_uri(uri)
        try:
            path = data.resolve(uri)
        except ValueError:
            continue  # data.validate words it (FILE:0)
        try:
            with fsspec.open(path, "rb") as f:
                f.read(1)
        except IsADirectoryError:
            raise Refused(f"{param}: {where} is a directory; point it at a .jsonl file", param, "InvalidData") from None
        except Exception as exc:
            kind = storage._triage(exc)
            detail = storage._redact(f"{type(exc).__name__}: {exc}")
            if kind == "transient":
                raise storage.StorageError(
                    f"{param}: reading {where} failed ({detail}): the object store is failing or "
                    "unreachable; the job retries"
                ) from None
            if kind in ("access", "credentials"):
                raise Refused(
                    f"{param}: reading {where}: access denied or invalid credentials ({detail}). Check the "
                    "credentials in the Secret named by spec.output.credentialsSecret and that they may read "
                    "the dataset",
                    param,
                    "StorageError",
                ) from None
            if kind in ("not_found", "no_bucket"):
                raise Refused(
                    f"{param}: {where} does not exist ({detail}); check the path, the bucket name and the URI scheme",
                    param,
                    "InvalidData",
                ) from None
            raise Refused(
                f"{param}: cannot read {where} ({detail}); check the URI, network access and the storage credentials",
                param,
                "StorageError",
            ) from None
