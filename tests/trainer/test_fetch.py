"""`python -m kubetune.trainer fetch`: what the vLLM serving pods' init containers run.

Committed results are built with the storage helpers (no training): the adapter under the output
root's manifest, the merged copy under merged/manifest.json. Every file is verified (sha256, size)
before DEST is filled; user errors exit with PERMANENT_EXIT_CODE and one line naming the URI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kubetune.api.contract import PERMANENT_EXIT_CODE
from kubetune.trainer import fetch, storage
from kubetune.trainer.__main__ import main

ADAPTER_FILES = {
    "adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
    "adapter_model.safetensors": b"\x00" * 64,
    "tokenizer_config.json": b"{}",
}
MERGED_FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x01" * 128, "tokenizer.json": b"{}"}


def write(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def committed(tmp_path: Path, merged: bool = False) -> Path:
    """A result as the trainer commits it: <out>/adapter/... + <out>/manifest.json (+ merged/)."""
    out = tmp_path / "out"
    store = storage.Store(out.as_uri(), backoff=0)
    storage.commit_result(store, write(tmp_path / "local-adapter", ADAPTER_FILES), {"baseModel": "hf://org/base"})
    if merged:
        storage.upload_dir(write(tmp_path / "local-merged", MERGED_FILES), store, "merged", {"mergedFrom": "adapter"})
    return out


def contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_adapter_fetch_places_the_verified_files_directly_in_dest(tmp_path: Path) -> None:
    out = committed(tmp_path)
    dest = tmp_path / "models" / "bot"
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "fetch", "--uri", f"{out.as_uri()}/adapter", "--dest", str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert contents(dest) == ADAPTER_FILES  # adapter_config.json at DEST/, no adapter/ level, no manifest
    assert "3 files verified" in proc.stdout
    assert [p.name for p in dest.parent.iterdir()] == ["bot"]  # no staging left behind
    # a restarted init container: the verified copy is kept
    assert main(["fetch", "--uri", f"{out.as_uri()}/adapter/", "--dest", str(dest)]) == 0


def test_the_output_root_or_a_plain_path_fetch_the_adapter(tmp_path: Path) -> None:
    out = committed(tmp_path)
    assert main(["fetch", "--uri", out.as_uri(), "--dest", str(tmp_path / "a")]) == 0
    assert contents(tmp_path / "a") == ADAPTER_FILES
    assert main(["fetch", "--uri", str(out / "adapter"), "--dest", str(tmp_path / "b")]) == 0
    assert contents(tmp_path / "b") == ADAPTER_FILES


def test_merged_fetch_uses_merged_manifest(tmp_path: Path) -> None:
    out = committed(tmp_path, merged=True)
    dest = tmp_path / "models" / "bot"
    assert main(["fetch", "--uri", f"{out.as_uri()}/merged", "--dest", str(dest)]) == 0
    assert contents(dest) == MERGED_FILES
    # what merged/manifest.json lists is what is fetched: a stray file is not
    (out / "merged" / "stray.bin").write_bytes(b"x")
    assert main(["fetch", "--uri", f"{out.as_uri()}/merged", "--dest", str(tmp_path / "again")]) == 0
    assert contents(tmp_path / "again") == MERGED_FILES


@pytest.mark.parametrize("which", ["adapter", "merged"])
def test_a_tampered_file_is_a_permanent_error_naming_it(
    tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = committed(tmp_path, merged=True)
    name = "adapter_model.safetensors" if which == "adapter" else "model.safetensors"
    target = out / which / name
    target.write_bytes(b"\x07" * len(target.read_bytes()))  # same size, other bytes
    dest = tmp_path / "dest"
    assert main(["fetch", "--uri", f"{out.as_uri()}/{which}", "--dest", str(dest)]) == PERMANENT_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "sha256 mismatch" in err and f"{out}/{which}" in err
    assert not dest.exists()


def test_a_missing_file_or_manifest_is_a_permanent_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = committed(tmp_path)
    (out / "adapter" / "tokenizer_config.json").unlink()
    assert main(["fetch", "--uri", f"{out.as_uri()}/adapter", "--dest", str(tmp_path / "d")]) == PERMANENT_EXIT_CODE
    assert "tokenizer_config.json" in capsys.readouterr().err

    uncommitted = write(tmp_path / "uncommitted" / "adapter", ADAPTER_FILES)  # files, but no manifest.json
    assert main(["fetch", "--uri", uncommitted.as_uri(), "--dest", str(tmp_path / "e")]) == PERMANENT_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no manifest.json" in err and str(uncommitted) in err
    assert not (tmp_path / "e").exists()


def test_a_bad_uri_is_a_permanent_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["fetch", "--uri", "nosuchproto://bucket/out/adapter", "--dest", str(tmp_path / "d")])
        == PERMANENT_EXIT_CODE
    )
    assert "nosuchproto://bucket/out/adapter" in capsys.readouterr().err


def test_a_store_failure_is_retriable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = committed(tmp_path)

    def fail(self: storage.Store, key: str, local: object) -> None:
        raise storage.StorageError(f"get_file {key} failed after 6 attempts: connection reset")

    monkeypatch.setattr(storage.Store, "get_file", fail)
    assert main(["fetch", "--uri", f"{out.as_uri()}/adapter", "--dest", str(tmp_path / "d")]) == 1


def test_uri_and_model_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        main(["fetch", "--uri", "s3://b/out/adapter", "--model", "s3://b/base", "--dest", "/tmp/x"])
    with pytest.raises(SystemExit):
        main(["fetch", "--dest", "/tmp/x"])


def test_model_fetch_copies_a_local_directory(tmp_path: Path) -> None:
    source = write(tmp_path / "base", MERGED_FILES)
    dest = tmp_path / "models" / "base"
    assert main(["fetch", "--model", str(source), "--dest", str(dest)]) == 0
    assert {k: v for k, v in contents(dest).items() if k != fetch.MARKER} == MERGED_FILES
    assert contents(source) == MERGED_FILES  # copied, not moved
    assert sorted(p.name for p in dest.parent.iterdir()) == ["base"]


def test_model_fetch_downloads_a_store_and_checks_it_as_the_trainer_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"memory://kubetune-{uuid.uuid4().hex[:8]}/base"
    storage.upload_dir(write(tmp_path / "local", MERGED_FILES), storage.Store(uri, backoff=0), "", {})
    dest = tmp_path / "models" / "base"
    assert main(["fetch", "--model", uri, "--dest", str(dest)]) == 0
    got = contents(dest)
    assert {k: got[k] for k in MERGED_FILES} == MERGED_FILES and json.loads(got[fetch.MARKER])["source"] == uri
    assert sorted(p.name for p in dest.parent.iterdir()) == ["base"]  # the download cache is gone
    assert main(["fetch", "--model", uri, "--dest", str(dest)]) == 0  # restarted: kept

    pickles = write(tmp_path / "pickles", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    assert main(["fetch", "--model", str(pickles), "--dest", str(tmp_path / "p")]) == PERMANENT_EXIT_CODE
    assert "pickle" in capsys.readouterr().err
    code = write(tmp_path / "code", {**MERGED_FILES, "modeling_x.py": b""})
    assert main(["fetch", "--model", str(code), "--dest", str(tmp_path / "c")]) == PERMANENT_EXIT_CODE
    assert "trustRemoteCode" in capsys.readouterr().err
    assert main(["fetch", "--model", str(code), "--dest", str(tmp_path / "c"), "--trust-remote-code"]) == 0


def test_model_fetch_of_a_missing_source_is_permanent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"memory://kubetune-{uuid.uuid4().hex[:8]}/nothing"
    assert main(["fetch", "--model", missing, "--dest", str(tmp_path / "d")]) == PERMANENT_EXIT_CODE
    assert missing in capsys.readouterr().err
    assert main(["fetch", "--model", "builtin://no-such", "--dest", str(tmp_path / "d")]) == PERMANENT_EXIT_CODE
    assert "builtin://no-such" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")
