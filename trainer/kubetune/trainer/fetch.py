"""`python -m kubetune.trainer fetch`: copy a committed result or a base model to a local directory.

What the vLLM serving pod's init containers run (operator/kubetune/operator/serving.py):

* `fetch --uri <output>/adapter --dest DIR`: the adapter of a committed result. The output root's
  manifest.json lists the files under `adapter/`; they land directly in DIR (DIR/adapter_config.json).
* `fetch --uri <output>/merged --dest DIR`: a directory committed with its own manifest.json
  (the merged model written for serving), its files directly in DIR.
* `fetch --model SOURCE --dest DIR`: a base model from any source `sources.resolve_model` reads
  (s3://, gs://, pvc://, hf://, builtin://, a local directory), checked by the same rules (T9).

Every file of a committed directory is verified against its manifest (sha256 and size) before DIR
is replaced (atomically); a DIR that already verifies is kept (a restarted init container).
Exit codes: 0, PERMANENT_EXIT_CODE for what retrying cannot fix (no manifest, a checksum mismatch,
a bad URI, denied access), 1 for the rest (the object store failing or unreachable).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from kubetune.api.contract import PERMANENT_EXIT_CODE
from kubetune.trainer import filemodes, storage

log = logging.getLogger("kubetune.trainer.fetch")
MARKER = ".kubetune-fetched.json"
"""Written into DEST by `--model` fetches once complete: a restarted container skips the download."""


class FetchError(storage.PermanentStorageError):
    """What was asked for cannot be fetched; retrying cannot help."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kubetune.trainer fetch",
        description="Copy a committed result (verified against its manifest) or a base model to DEST.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--uri", help="a committed result directory: <output>/adapter or <output>/merged")
    what.add_argument(
        "--model", help="a base model source: s3://, gs://, pvc://, hf://, builtin:// or a local directory"
    )
    p.add_argument("--dest", required=True, help="the local directory to fill (replaced)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="with --model: accept code shipped with the model (spec.model.trustRemoteCode)",
    )
    return p.parse_args(argv)


def fetch_result(uri: str, dest: Path, storage_options: dict | None = None) -> int:
    """Download the committed directory `uri` into `dest`, verified; the number of files."""
    uri = uri.rstrip("/")
    shown = storage.display_uri(uri)
    store, prefix, files = _committed(uri, storage_options)
    if not files:
        raise FetchError(f"{shown}: its manifest.json lists no files; nothing to serve. Re-run the job")
    reason = storage.download_verified(store, prefix, files, dest)
    if reason is not None:
        raise FetchError(
            f"{shown} does not match its manifest.json ({reason}): the result is damaged or was changed "
            f"after training; restore it or re-run the job (check with: kubetune verify {shown})"
        )
    return len(files)


def _committed(uri: str, storage_options: dict | None) -> tuple[storage.Store, str, dict]:
    """(the store holding the manifest, the key prefix of the files, {relative name: entry})."""
    shown = storage.display_uri(uri)
    store = _open(uri, storage_options)
    if store.exists(storage.MANIFEST):  # <output>/merged (or the output root itself)
        files = storage.read_manifest(store, "")["files"]
        adapter = storage.ADAPTER + "/"
        if files and all(k.startswith(adapter) for k in files):  # the user named the output root
            return store, storage.ADAPTER, {k[len(adapter) :]: v for k, v in files.items()}
        return store, "", files
    parent, _, leaf = uri.rpartition("/")
    if leaf == storage.ADAPTER and parent and not parent.endswith(":/"):
        root = _open(parent, storage_options)
        if root.exists(storage.MANIFEST):  # <output>/adapter: the output root's manifest lists adapter/...
            files = storage.read_manifest(root, "")["files"]
            adapter = storage.ADAPTER + "/"
            return root, storage.ADAPTER, {k[len(adapter) :]: v for k, v in files.items() if k.startswith(adapter)}
    raise FetchError(
        f"{shown}: no manifest.json there (nor at {storage.display_uri(parent)}/manifest.json for an "
        "adapter): it is not a committed kubetune result. Point at status.adapter.uri or "
        "status.adapter.mergedUri of a Succeeded FineTuneJob (the trainer writes manifest.json last)"
    )


def _open(uri: str, storage_options: dict | None) -> storage.Store:
    try:
        return storage.Store(uri, storage_options)
    except (ValueError, ImportError) as err:  # fsspec: an unknown protocol, or its package is not installed
        raise FetchError(
            f"{storage.display_uri(uri)}: not a location the trainer image can read ({err}); use s3://, gs:// or pvc://"
        ) from None


def fetch_model(source: str, dest: Path, trust_remote_code: bool = False, storage_options: dict | None = None) -> Path:
    """Put the model at `source` into `dest` (downloaded and checked as the trainer does)."""
    from kubetune.trainer import sources

    marker = dest / MARKER
    try:
        if json.loads(marker.read_text()).get("source") == storage.display_uri(source):
            return dest  # a restarted container: already here
    except (OSError, ValueError, AttributeError):
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=f".{dest.name}-cache-", dir=dest.parent))
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        path = sources.resolve_model(_ModelSource(source, trust_remote_code), cache, storage_options)
        os.rmdir(staging)  # filled by a rename or a copy below
        if path.resolve().is_relative_to(cache.resolve()) and not path.is_symlink() and not _has_symlinks(path):
            os.replace(path, staging)  # downloaded into our cache: move, do not copy
            (staging / sources.COMPLETE_MARKER).unlink(missing_ok=True)
        else:  # a mounted directory, a built-in model, or the hub's cache (symlinks into blobs)
            shutil.copytree(path, staging, symlinks=False)
        (staging / MARKER).write_text(json.dumps({"source": storage.display_uri(source)}))
        shutil.rmtree(dest, ignore_errors=True)
        filemodes.as_created(staging)  # mkdtemp's 0700 would hide it from the serving container's user
        os.replace(staging, dest)
        return dest
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


class _ModelSource:
    """The two fields of spec.model that resolve_model reads."""

    def __init__(self, source: str, trust_remote_code: bool) -> None:
        self.source, self.trust_remote_code = source, trust_remote_code


def _has_symlinks(path: Path) -> bool:
    return any(p.is_symlink() for p in path.rglob("*"))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    dest = Path(args.dest)
    what = args.uri or args.model
    try:
        if args.uri:
            count = fetch_result(args.uri, dest)
            print(
                f"fetched {storage.display_uri(args.uri)} into {dest}: {count} files verified against manifest.json",
                flush=True,
            )
        else:
            fetch_model(args.model, dest, args.trust_remote_code)
            print(f"fetched {storage.display_uri(args.model)} into {dest}", flush=True)
        return 0
    except storage.PermanentStorageError as err:
        print(f"fetch {storage.display_uri(what)}: {_one_line(err)}", file=sys.stderr, flush=True)
        return PERMANENT_EXIT_CODE
    except storage.StorageError as err:
        print(
            f"fetch {storage.display_uri(what)} failed, retrying may help: {_one_line(err)}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except Exception as err:
        traceback.print_exc()
        print(
            f"fetch {storage.display_uri(what)} failed: {type(err).__name__}: {_one_line(err)}",
            file=sys.stderr,
            flush=True,
        )
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
