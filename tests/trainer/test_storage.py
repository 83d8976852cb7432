"""Object storage: commits, verification, retries and key safety (RELIABILITY.md T2, T4, T5, T6, T8).

S3 rows run against moto's server (tests/fixtures/s3.py) with faults injected server-side;
the local rows against file:// temp dirs and memory://.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from kubetune.trainer import storage
from kubetune.trainer.storage import (
    CommitConflict,
    PermanentStorageError,
    StorageError,
    Store,
    build_files_map,
    check_within,
    commit_checkpoint,
    commit_result,
    file_digest,
    latest_valid_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    safe_join,
    upload_dir,
    verify,
)

from tests.fixtures.s3 import s3_bucket, s3_client, s3_faults, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def make_checkpoint(root: Path, step: int) -> Path:
    """A small checkpoint directory whose bytes depend on the step."""
    d = root / f"local-step-{step}"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(4096) + step.to_bytes(4, "big"))
    (d / "optimizer.pt").write_bytes(os.urandom(2048))
    (d / "sub" / "trainer_state.json").write_text(json.dumps({"step": step}))
    (d / "file..txt").write_text("dots are fine")
    return d


def same_tree(a: Path, b: Path) -> bool:
    return build_files_map(a) == build_files_map(b)


@pytest.fixture
def s3_store(s3_bucket: str) -> Store:
    return Store(f"{s3_bucket}/run", retries=3, backoff=0)


@pytest.fixture(params=["file", "memory", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return Store(f"file://{tmp_path}/out", backoff=0)
    if request.param == "memory":
        return Store(f"memory://kubetune-{uuid.uuid4().hex[:8]}/out", backoff=0)
    return request.getfixturevalue("s3_store")


# ---------------------------------------------------------------------------- the Store itself


def test_store_round_trip(any_store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    any_store.put_file(src, "a/b/src.bin")
    any_store.put_bytes("a/c.txt", b"hello")
    assert any_store.read_bytes("a/c.txt") == b"hello"
    assert any_store.exists("a/b/src.bin") and not any_store.exists("a/nope")
    assert any_store.ls("a") == ["a/b", "a/c.txt"]
    assert any_store.find("a") == {"a/b/src.bin": 1000, "a/c.txt": 5}
    any_store.get_file("a/b/src.bin", tmp_path / "dl" / "got.bin")
    assert (tmp_path / "dl" / "got.bin").read_bytes() == b"x" * 1000
    assert any_store.sha256("a/b/src.bin") == file_digest(src)
    any_store.rm("a/b", recursive=True)
    assert any_store.find("a") == {"a/c.txt": 5}
    assert any_store.ls("nothing-here") == []
    with pytest.raises(storage.ObjectNotFound):
        any_store.read_bytes("a/missing")


def test_upload_dir_writes_manifest_last_and_verifies(any_store: Store, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 7)
    manifest = upload_dir(local, any_store, "x", {"step": 7})
    assert manifest["files"] == build_files_map(local) and manifest["step"] == 7 and manifest["createdAt"]
    assert json.loads(any_store.read_bytes("x/manifest.json")) == manifest
    assert verify(any_store, "x") == (True, "ok")
    assert verify(any_store, "y")[0] is False


def test_commit_checkpoint_is_idempotent_for_a_committed_step(s3_store: Store, tmp_path: Path, s3_faults) -> None:
    uri = commit_checkpoint(s3_store, make_checkpoint(tmp_path, 5), 5, {"loss": 1.5})
    assert uri == f"{s3_store.uri}/checkpoints/step-5"
    s3_faults.clear()
    assert commit_checkpoint(s3_store, make_checkpoint(tmp_path / "again", 5), 5) == uri
    assert s3_faults.count("PutObject") == 0
    assert json.loads(s3_store.read_bytes("checkpoints/step-5/manifest.json"))["loss"] == 1.5


# ----------------------------------------------------------------------- T2: death mid-upload

_DIE_MID_UPLOAD = textwrap.dedent(
    """
    import os, sys
    from kubetune.trainer import storage

    uri, local = sys.argv[1], sys.argv[2]
    store = storage.Store(uri, retries=0)
    real_put, done = storage.Store.put_file, []

    def put_file(self, src, key):
        if len(done) == 2:
            # part 1 of a multipart upload of the next file goes up, then the process dies
            f = self.fs.open(self._path(key), "wb", block_size=5 * 2**20)
            f.write(os.urandom(6 * 2**20))
            f.flush()
            os._exit(137)
        real_put(self, src, key)
        done.append(key)

    storage.Store.put_file = put_file
    storage.commit_checkpoint(store, local, 20, parallel=1)
    """
)


def test_t2_process_dies_mid_checkpoint_upload(s3_store: Store, s3_client, tmp_path: Path) -> None:
    first = make_checkpoint(tmp_path, 10)
    commit_checkpoint(s3_store, first, 10)
    second = make_checkpoint(tmp_path, 20)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO / "api"), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-c", _DIE_MID_UPLOAD, s3_store.uri, str(second)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 137, proc.stderr
    # The process got as far as part 1 of a multipart upload, and some files are there ...
    bucket = s3_store.root.split("/")[0]
    uploads = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"].rsplit("/", 1)[-1] for u in uploads if "step-20" in u["Key"]]
    assert len(s3_store.find("checkpoints/step-20")) == 2
    # ... but without its manifest the checkpoint does not exist, and resume takes step 10.
    assert not s3_store.exists("checkpoints/step-20/manifest.json")
    assert list_checkpoints(s3_store) == [10]
    found = latest_valid_checkpoint(s3_store, tmp_path / "cache")
    assert found and found.step == 10 and found.skipped == []
    assert same_tree(found.path, first)
    assert verify(s3_store, "checkpoints/step-10") == (True, "ok")


# ------------------------------------------------------------------------- T4: flaky storage


@pytest.mark.parametrize("kind", ["503", "500", "reset"])
def test_t4_transient_errors_are_retried(kind: str, s3_store: Store, s3_faults, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 1)
    with s3_faults.inject(kind, op="PutObject", times=2) as put_fault:
        commit_checkpoint(s3_store, local, 1, parallel=1)
    assert put_fault.fired == 2
    with s3_faults.inject(kind, op="GetObject", times=2) as get_fault:
        found = latest_valid_checkpoint(s3_store, tmp_path / "cache", parallel=1)
    assert get_fault.fired == 2
    assert found.step == 1 and same_tree(found.path, local)
    assert verify(s3_store, "checkpoints/step-1") == (True, "ok")


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_t4_persistent_failure_gives_a_clear_error_and_nothing_partial(
    kind: str,
    s3_store: Store,
    s3_faults,
    tmp_path: Path,
) -> None:
    with s3_faults.inject(kind, op="PutObject", key="sub/trainer_state.json", times=10_000):
        with pytest.raises(StorageError) as err:
            commit_checkpoint(s3_store, make_checkpoint(tmp_path, 3), 3, parallel=1)
    assert not isinstance(err.value, PermanentStorageError)  # retriable: the Job restarts
    message = str(err.value)
    assert "put_file" in message and "checkpoints/step-3/sub/trainer_state.json" in message
    assert "after 4 attempts" in message and s3_store.uri in message
    assert not s3_store.exists("checkpoints/step-3/manifest.json")
    assert list_checkpoints(s3_store) == []
    assert verify(s3_store, "checkpoints/step-3") == (False, "no manifest.json: the directory was never committed")


def test_t4_lost_response_on_the_manifest_is_not_a_conflict(s3_store: Store, s3_faults, tmp_path: Path) -> None:
    # The manifest PUT reaches S3 but its answer is lost: the retry gets 412 for our own bytes.
    with s3_faults.inject("lost", op="PutObject", key="manifest.json", times=1) as fault:
        commit_checkpoint(s3_store, make_checkpoint(tmp_path, 4), 4)
    assert fault.fired == 1
    assert list_checkpoints(s3_store) == [4]


def test_t4_access_denied_is_permanent_and_not_retried(s3_bucket: str, s3_faults, caplog) -> None:
    canary = "CANARY-s3cr3t-value-1234"
    store = Store(f"{s3_bucket}/run", {"key": "AKIAEXAMPLECANARY", "secret": canary}, retries=3, backoff=0)
    with s3_faults.inject("503", op="PutObject", times=1), s3_faults.inject("403", op="PutObject", times=100):
        with pytest.raises(PermanentStorageError) as err:
            store.put_bytes("x", b"1")
    assert s3_faults.count("PutObject") == 2  # one 503 retried, then 403: no more attempts
    assert "credentials" in str(err.value) and "spec.output.credentialsSecret" in str(err.value)
    assert canary not in str(err.value) and canary not in caplog.text


def test_t4_missing_bucket_is_permanent(s3_server, s3_faults) -> None:
    store = Store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", retries=3, backoff=0)
    with pytest.raises(PermanentStorageError, match="bucket does not exist"):
        store.put_bytes("x", b"1")
    assert s3_faults.count("PutObject") == 1


# ------------------------------------------------------------------------- T5: bit rot


def _tamper(s3_client, store: Store, key: str, how: str) -> None:
    bucket, _, prefix = store.root.partition("/")
    full = f"{prefix}/{key}"
    data = bytearray(s3_client.get_object(Bucket=bucket, Key=full)["Body"].read())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-1]
    s3_client.put_object(Bucket=bucket, Key=full, Body=bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_t5_corrupt_checkpoint_is_skipped(how: str, s3_store: Store, s3_client, tmp_path: Path, caplog) -> None:
    first = make_checkpoint(tmp_path, 10)
    commit_checkpoint(s3_store, first, 10)
    commit_checkpoint(s3_store, make_checkpoint(tmp_path, 20), 20)
    _tamper(s3_client, s3_store, "checkpoints/step-20/adapter_model.safetensors", how)

    ok, reason = verify(s3_store, "checkpoints/step-20")
    assert not ok and "adapter_model.safetensors" in reason
    assert ("sha256 mismatch" if how == "flip" else "bytes") in reason

    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="kubetune.trainer.storage"):
        found = latest_valid_checkpoint(s3_store, cache)
    assert found.step == 10 and same_tree(found.path, first)
    assert [step for step, _ in found.skipped] == [20] and "adapter_model.safetensors" in found.skipped[0][1]
    assert "step-20" in caplog.text and "skipping" in caplog.text
    assert not (cache / "step-20").exists()  # the corrupt checkpoint never reaches the trainer
    assert [p.name for p in cache.iterdir()] == ["step-10"]


def test_t5_nothing_valid_returns_falsy_with_the_skipped(s3_store: Store, s3_client, tmp_path: Path) -> None:
    commit_checkpoint(s3_store, make_checkpoint(tmp_path, 1), 1)
    _tamper(s3_client, s3_store, "checkpoints/step-1/optimizer.pt", "flip")
    found = latest_valid_checkpoint(s3_store, tmp_path / "cache")
    assert not found and found.path is None and [s for s, _ in found.skipped] == [1]
    assert not latest_valid_checkpoint(Store(str(tmp_path / "empty")), tmp_path / "cache2")


# ---------------------------------------------------------------------- T6: two writers


def test_t6_second_put_if_absent_loses(any_store: Store) -> None:
    any_store.put_if_absent("out/manifest.json", b'{"writer": 1}')
    with pytest.raises(PermanentStorageError, match="another writer committed out/manifest.json first"):
        any_store.put_if_absent("out/manifest.json", b'{"writer": 2}')
    assert any_store.read_bytes("out/manifest.json") == b'{"writer": 1}'


def test_t6_second_result_commit_fails_before_touching_the_first(s3_store: Store, s3_faults, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", 1)
    manifest = commit_result(s3_store, a, {"baseModel": "builtin://tiny-llama", "method": "lora"})
    assert set(manifest["files"]) == {f"adapter/{k}" for k in build_files_map(a)}
    assert manifest["baseModel"] == "builtin://tiny-llama"
    s3_faults.clear()
    with pytest.raises(CommitConflict) as err:
        commit_result(s3_store, make_checkpoint(tmp_path / "b", 2), {"method": "lora"})
    assert "spec.output.uri" in str(err.value)
    assert s3_faults.count("PutObject") == 0  # the loser wrote nothing
    assert json.loads(s3_store.read_bytes("manifest.json")) == manifest
    assert verify(s3_store, "") == (True, "ok")


# ------------------------------------------------------------------------------ T8: keys


BAD_KEYS = ["../x", "/abs", "a//b", "a/../../b", "a/..", ".", "./a", "a/", "", "a\\b", "a\x00b", "a\nb", "..\\x"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_t8_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(PermanentStorageError, match="refusing object key"):
        safe_join("s3://bucket/prefix", key)


@pytest.mark.parametrize("key", ["file..txt", "..file", "a/b...c", "step-1/model.safetensors"])
def test_t8_good_keys_are_joined(key: str) -> None:
    assert safe_join("s3://bucket/prefix/", key) == f"s3://bucket/prefix/{key}"
    assert safe_join("/data/out", "a", key) == f"/data/out/a/{key}"


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../../b"])
def test_t8_store_writes_nothing_outside(key: str, tmp_path: Path, s3_store: Store, s3_faults) -> None:
    local = Store(str(tmp_path / "out"))
    local.put_bytes("ok", b"1")
    before = _tree(tmp_path)
    s3_faults.clear()
    for store in (local, s3_store):
        for call in (
            lambda: store.put_bytes(key, b"evil"),
            lambda: store.put_if_absent(key, b"evil"),
            lambda: store.put_file(tmp_path / "out" / "ok", key),
            lambda: store.rm(key, recursive=True),
            lambda: store.read_bytes(key),
            lambda: store.get_file(key, tmp_path / "dl"),
        ):
            with pytest.raises(PermanentStorageError, match="refusing object key"):
                call()
    assert _tree(tmp_path) == before
    assert s3_faults.requests == []  # refused before any request


def test_t8_malicious_manifest_paths_are_refused(s3_store: Store, tmp_path: Path) -> None:
    commit_checkpoint(s3_store, make_checkpoint(tmp_path, 1), 1)
    evil = {"files": {"../../../escape.txt": {"sha256": "0" * 64, "bytes": 1}}, "createdAt": "now"}
    s3_store.put_bytes("checkpoints/step-2/manifest.json", json.dumps(evil).encode())
    before = _tree(tmp_path)
    found = latest_valid_checkpoint(s3_store, tmp_path / "cache" / "deep")
    assert found.step == 1 and [s for s, _ in found.skipped] == [2]
    assert "refusing object key" in found.skipped[0][1]
    assert {p for p in _tree(tmp_path) - before if not p.startswith("cache")} == set()


def test_t8_output_outside_allowed_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBETUNE_ALLOWED_OUTPUT_PREFIX", f"s3://team-a/runs/, {tmp_path}/allowed")
    check_within("s3://team-a/runs/job-1")
    check_within("s3://team-a/runs")
    check_within(f"file://{tmp_path}/allowed/job")
    (tmp_path / "allowed").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "allowed" / "link").symlink_to(tmp_path / "outside")
    for uri in [
        "s3://team-a/runs-evil/x",
        "s3://team-a/runs/../other",
        "s3://team-b/runs/x",
        "gs://team-a/runs/x",
        f"{tmp_path}/outside/job",
        f"{tmp_path}/allowed/link/job",
        f"{tmp_path}/allowed/../outside",
    ]:
        with pytest.raises(PermanentStorageError, match="spec.output.uri"):
            check_within(uri)
    assert list((tmp_path / "outside").iterdir()) == []
    monkeypatch.delenv("KUBETUNE_ALLOWED_OUTPUT_PREFIX")
    check_within("s3://anything/at/all")


def test_t8_pvc_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    assert storage.local_path("pvc://claim/runs/a") == tmp_path / "claim" / "runs" / "a"
    with pytest.raises(PermanentStorageError):
        storage.local_path("pvc://claim/../../etc")
    store = Store("pvc://claim/runs")
    store.put_bytes("x.txt", b"1")
    assert (tmp_path / "claim" / "runs" / "x.txt").read_bytes() == b"1"
    assert store.uri_for("x.txt") == "pvc://claim/runs/x.txt"


# ------------------------------------------------------------------------------- pruning


def test_prune_keeps_the_newest_committed(s3_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (10, 20, 30, 40, 50):
        commit_checkpoint(s3_store, make_checkpoint(tmp_path, step), step)
    s3_store.put_bytes("checkpoints/step-15/adapter_model.safetensors", b"orphan")  # died mid-upload
    s3_store.put_bytes("checkpoints/step-60/adapter_model.safetensors", b"in progress")
    s3_store.put_bytes("checkpoints/notes/readme.txt", b"not ours")
    calls: list[str] = []
    real_rm = Store.rm
    monkeypatch.setattr(
        Store, "rm", lambda self, key, recursive=False: (calls.append(key), real_rm(self, key, recursive))[1]
    )

    assert prune_checkpoints(s3_store, keep=2) == [10, 15, 20, 30]
    assert list_checkpoints(s3_store) == [40, 50]
    steps_left = sorted(k.rsplit("/", 1)[-1] for k in s3_store.ls("checkpoints"))
    assert steps_left == ["notes", "step-40", "step-50", "step-60"]
    assert all(verify(s3_store, f"checkpoints/step-{s}") == (True, "ok") for s in (40, 50))
    # the manifest goes first: a checkpoint deleted half-way is invisible, not corrupt
    assert calls.index("checkpoints/step-10/manifest.json") < calls.index("checkpoints/step-10")
    assert prune_checkpoints(s3_store, keep=2) == []
