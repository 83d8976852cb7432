"""The trainer's summary lists the checkpoints storage still holds after pruning, so that
status.checkpoints never names one the trainer deleted."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.contract import TrainerSummary
from kubetune.trainer import storage
from kubetune.trainer.run import kept_checkpoints


def test_the_summary_lists_the_checkpoints_kept_after_pruning(tmp_path: Path) -> None:
    store = storage.Store((tmp_path / "out").as_uri())
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "state.bin").write_bytes(b"x")
    committed = []
    for step in (2, 4, 6, 8):  # step 2 was committed by an earlier pod: no details known here
        uri = storage.commit_checkpoint(store, local, step)
        if step > 2:
            committed.append({"step": step, "uri": uri, "loss": 1.0 / step, "time": "2025-03-01T10:00:00Z"})
        storage.prune_checkpoints(store, 3)
    kept = kept_checkpoints(store, committed, keep=3)
    assert [c["step"] for c in kept] == [4, 6, 8] == storage.list_checkpoints(store)
    assert kept[0]["loss"] == 0.25 and kept[-1]["uri"] == store.uri_for(storage.checkpoint_prefix(8))
    assert TrainerSummary(status="succeeded", checkpoints=kept).wire()["checkpoints"] == kept
    # a first run that kept them all, with keep above the status limit: the newest 20 at most
    assert [c["step"] for c in kept_checkpoints(store, committed, keep=100)] == [4, 6, 8]
    # listing storage fails: this run's own commits, newest `keep`
    broken = storage.Store((tmp_path / "out").as_uri())
    broken.ls = lambda prefix="": (_ for _ in ()).throw(storage.StorageError("unreachable"))  # type: ignore[method-assign]
    assert [c["step"] for c in kept_checkpoints(broken, committed, keep=2)] == [6, 8]
