"""Object storage for checkpoints and results: any fsspec URL, with commits that readers can trust.

The trainer writes to whatever `spec.output.uri` names (s3://, gs://, file://, a plain path,
pvc://claim/path) and must survive what object stores do: 503 SlowDown, connection resets,
processes killed half-way through an upload, two jobs pointed at the same output, and
bytes that rot. So:

* a directory exists for readers only once its `manifest.json` (sha256 + size of every file)
  is written, last, with a conditional create (S3 `IfNoneMatch="*"`, a hard link locally);
* readers verify what the manifest promises and skip (and report) what does not verify;
* transient errors are retried with exponential backoff and jitter here, in one place
  (botocore's and s3fs's own retries are switched off so that attempts do not multiply);
* user-caused errors (a bad key, denied access, a missing bucket, a lost commit race) raise
  PermanentStorageError at once, with a message that names the URI and what to do and never
  carries a secret value.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kubetune.trainer import filemodes

log = logging.getLogger(__name__)

T = TypeVar("T")
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
ALLOWED_PREFIX_ENV = "KUBETUNE_ALLOWED_OUTPUT_PREFIX"
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
_CHUNK = 4 << 20
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LOCAL_SCHEMES = ("", "file", "local", "pvc")


class StorageError(Exception):
    """Storage failed in a way that retrying later may fix (the job restarts from a checkpoint)."""


class PermanentStorageError(StorageError):
    """Storage refused because of something the user controls: retrying cannot help."""


class ObjectNotFound(PermanentStorageError):
    """The key does not exist."""


class CommitConflict(PermanentStorageError):
    """Another writer committed the same manifest first (T6)."""


# ------------------------------------------------------------------------------- keys and URIs


def _check_key(key: str) -> list[str]:
    """The segments of a relative object key, or PermanentStorageError naming the key."""

    def refuse(why: str) -> PermanentStorageError:
        return PermanentStorageError(
            f"refusing object key {key!r}: {why}; keys must be relative paths of plain names separated by single '/'"
        )

    if not isinstance(key, str) or key == "":
        raise refuse("it is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise refuse("it contains a NUL or control character")
    if "\\" in key:
        raise refuse("it contains a backslash")
    if key.startswith("/"):
        raise refuse("it is absolute")
    segments = key.split("/")
    if "" in segments:
        raise refuse("it has an empty segment ('//' or a trailing '/')")
    if any(s in (".", "..") for s in segments):
        raise refuse("it has a '.' or '..' segment")
    return segments


def safe_join(base_uri: str, *parts: str) -> str:
    """`base_uri/part/...`, refusing any part that could name something outside `base_uri`."""
    segments = [s for p in parts for s in _check_key(p)]
    if not segments:
        return base_uri
    joined = base_uri.rstrip("/") + "/" + "/".join(segments)
    base_path = urlsplit(base_uri).path.rstrip("/")
    if not posixpath.normpath(urlsplit(joined).path).startswith(base_path + "/"):
        raise PermanentStorageError(
            f"refusing object key {'/'.join(parts)!r}: it resolves outside {display_uri(base_uri)}"
        )
    return joined


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV) or "/mnt/pvc")


def local_path(uri: str) -> Path | None:
    """The local path behind a file://, pvc:// or plain-path URI; None for remote stores."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""  # "C:" is no scheme
    if scheme not in _LOCAL_SCHEMES:
        return None
    if scheme == "pvc":
        rest = (parts.netloc + parts.path).strip("/")
        return Path(safe_join(str(pvc_root()), rest)) if rest else pvc_root()
    if scheme in ("file", "local"):
        return Path(parts.netloc + parts.path if parts.netloc not in ("", "localhost") else parts.path)
    return Path(uri).expanduser().absolute()


def _canonical(uri: str) -> str:
    path = local_path(uri)
    if path is not None:
        return "file://" + os.path.normpath(os.path.realpath(path))
    parts = urlsplit(uri)
    scheme = {"gcs": "gs", "s3a": "s3"}.get(parts.scheme.lower(), parts.scheme.lower())
    return f"{scheme}://{parts.netloc}{posixpath.normpath('/' + parts.path.lstrip('/'))}".rstrip("/")


def check_within(uri: str, allowed_prefix: str | None = None) -> None:
    """Refuse `uri` unless it lies under the operator-configured prefix (comma-separated list).

    `allowed_prefix` defaults to $KUBETUNE_ALLOWED_OUTPUT_PREFIX; unset or empty allows all.
    """
    allowed = os.environ.get(ALLOWED_PREFIX_ENV, "") if allowed_prefix is None else allowed_prefix
    prefixes = [p.strip() for p in allowed.split(",") if p.strip()]
    if not prefixes:
        return
    if ".." in urlsplit(uri).path.split("/"):
        raise PermanentStorageError(f"spec.output.uri {display_uri(uri)} contains a '..' segment: write a plain path")
    target = _canonical(uri)
    for prefix in prefixes:
        base = _canonical(prefix)
        if target == base or target.startswith(base.rstrip("/") + "/"):
            return
    raise PermanentStorageError(
        f"spec.output.uri {display_uri(uri)} is outside the allowed output prefix "
        f"{', '.join(display_uri(p) for p in prefixes)} set by the platform operator "
        f"({ALLOWED_PREFIX_ENV}): choose an output under it"
    )


def display_uri(uri: str) -> str:
    """A URI fit for messages: no user:password@, no query string (signed URLs carry secrets)."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path


_SIGNED_QUERY = re.compile(r"(?i)([?&](?:x-amz-[a-z-]+|x-goog-[a-z-]+|signature|awsaccesskeyid|sig|token)=)[^&\s'\"]*")
_SECRET_OPTION = re.compile(r"(?i)(secret|token|password|credential|key)")


def _redact(text: str, extra_secrets: tuple[str, ...] | list[str] = ()) -> str:
    text = _SIGNED_QUERY.sub(r"\1***", text)
    secrets = [v for k, v in os.environ.items() if _SECRET_OPTION.search(k) and len(v) >= 6]
    for secret in sorted({*secrets, *extra_secrets}, key=len, reverse=True):
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    return text[:400]


# ---------------------------------------------------------------------------- error triage


def _status_and_code(exc: BaseException) -> tuple[int | None, str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status, str(response.get("Error", {}).get("Code", ""))
    for attr in ("status", "code", "status_code"):  # gcsfs HttpError, aiohttp, httpx
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, type(exc).__name__
    return None, ""


_TRANSIENT_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "OperationAborted",
    "XAmzContentSHA256Mismatch",
}
_ACCESS_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AccountProblem",
    "InvalidSecurity",
    "Forbidden",
    "Unauthorized",
}
_TRANSIENT_NAMES = {
    "ConnectionClosedError",
    "EndpointConnectionError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ServerDisconnectedError",
    "ClientConnectorError",
    "ClientOSError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "IncompleteRead",
    "ResponseParserError",
    "FSTimeoutError",
    "ConnectError",
    "ReadTimeout",
    "RemoteProtocolError",
    "ProxyConnectionError",
    "HTTPClientError",
}
_CREDENTIAL_NAMES = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "DefaultCredentialsError",
    "RefreshError",
}


def _triage(exc: BaseException) -> str:
    """One of: transient, access, no_bucket, not_found, exists, credentials, other."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in {id(c) for c in chain} and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:  # the most specific evidence: an HTTP status or a service error code
        status, code = _status_and_code(e)
        if code == "NoSuchBucket":
            return "no_bucket"
        if code == "PreconditionFailed" or status == 412:
            return "exists"
        if code in _ACCESS_CODES or status in (401, 403):
            return "access"
        if code in ("NoSuchKey", "NotFound") or status == 404:
            return "not_found"
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status in (408, 429))):
            return "transient"
        if status is not None and 400 <= status < 500:
            return "other"
    for e in chain:
        names = {t.__name__ for t in type(e).__mro__}
        if names & _CREDENTIAL_NAMES:
            return "credentials"
        if names & _TRANSIENT_NAMES or isinstance(e, (ConnectionError, TimeoutError)):
            return "transient"
        if isinstance(e, FileExistsError):
            return "exists"
        if isinstance(e, PermissionError):
            return "access"
        if isinstance(e, FileNotFoundError):
            return "not_found"
        if "SlowDown" in str(e) or "reduce your request rate" in str(e):
            return "transient"
    return "other"


# ----------------------------------------------------------------------------------- the store


class Store:
    """One fsspec filesystem rooted at a URI; every key is checked, every call triaged/retried."""

    def __init__(self, uri: str, storage_options: dict | None = None, retries: int = 5, backoff: float = 0.5):
        self.uri, self.retries, self.backoff = uri, retries, backoff
        options = dict(storage_options or {})
        self._secrets = [str(v) for k, v in options.items() if _SECRET_OPTION.search(k) and isinstance(v, str)]
        path = local_path(uri)
        import fsspec

        if path is not None:
            from fsspec.implementations.local import LocalFileSystem

            self.fs, root = LocalFileSystem(auto_mkdir=True), str(path)
        else:
            protocol = urlsplit(uri).scheme.lower()
            if protocol in ("s3", "s3a"):
                # Our loop below is the only retry layer; a fresh instance so that later writes
                # by other writers are never hidden by a cached listing.
                config = {**options.pop("config_kwargs", {})}
                config.setdefault("retries", {"total_max_attempts": 1})
                options = {"skip_instance_cache": True, "use_listings_cache": False, **options, "config_kwargs": config}
            self.fs, root = fsspec.core.url_to_fs(uri, **options)
            if "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
                self.fs.retries = 1
        self.root = self.fs._strip_protocol(root).rstrip("/") or self.fs._strip_protocol(root)
        self.local = path is not None

    def __repr__(self) -> str:
        return f"Store({display_uri(self.uri)!r})"

    # ------------------------------------------------------------------ plumbing
    def uri_for(self, key: str = "") -> str:
        return safe_join(self.uri, key) if key else self.uri

    def _path(self, key: str) -> str:
        return self.root + "/" + "/".join(_check_key(key)) if key else self.root

    def _key(self, path: str) -> str:
        path = self.fs._strip_protocol(path).rstrip("/")
        return path[len(self.root) :].lstrip("/") if path.startswith(self.root) else path

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        where = display_uri(self.uri_for(key)) if key else display_uri(self.uri)
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:
                kind = _triage(exc)
                detail = _redact(f"{type(exc).__name__}: {exc}", self._secrets)
                if kind == "transient" and attempt < self.retries:
                    delay = min(30.0, self.backoff * 2**attempt)
                    delay = random.uniform(delay / 2, delay)
                    log.warning(
                        "%s %s failed (%s); retry %d/%d in %.2fs", op, where, detail, attempt + 1, self.retries, delay
                    )
                    time.sleep(delay)
                    continue
                raise self._error(op, key, where, kind, detail, attempt + 1) from exc
        raise AssertionError("unreachable")

    def _error(self, op: str, key: str, where: str, kind: str, detail: str, attempts: int) -> StorageError:
        if kind == "transient":
            return StorageError(
                f"{op} {where} failed after {attempts} attempts (last error: {detail}): the object store is "
                "failing or unreachable; check its endpoint and health. The job retries from its last committed checkpoint."
            )
        if kind in ("access", "credentials"):
            return PermanentStorageError(
                f"{op} {where}: access denied or invalid credentials ({detail}). Check the credentials in the Secret "
                "named by spec.output.credentialsSecret and that they may read, write and delete under this prefix."
            )
        if kind == "no_bucket":
            return PermanentStorageError(
                f"{op} {where}: the bucket does not exist ({detail}). Create it or fix the URI."
            )
        if kind == "not_found":
            return ObjectNotFound(f"{op} {where}: no such object ({detail}).")
        if kind == "exists":
            return CommitConflict(
                f"another writer committed {key or where} first at {display_uri(self.uri)}: two jobs write to the same "
                "output. Give this job its own spec.output.uri."
            )
        return StorageError(f"{op} {where} failed: {detail}")

    # ------------------------------------------------------------------ operations
    def put_file(self, local: str | os.PathLike, key: str) -> None:
        path = self._path(key)
        self._call("put_file", key, lambda: self.fs.put_file(os.fspath(local), path))

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._call("put_bytes", key, lambda: self.fs.pipe_file(path, data))

    def get_file(self, key: str, local: str | os.PathLike) -> None:
        path, local = self._path(key), Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")

        def get() -> None:
            try:
                self.fs.get_file(path, str(partial))
                os.replace(partial, local)
            finally:
                partial.unlink(missing_ok=True)

        self._call("get_file", key, get)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        return self._call("read", key, lambda: self.fs.cat_file(path))

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return self._call("exists", key, lambda: bool(self.fs.exists(path)))

    def ls(self, prefix: str = "") -> list[str]:
        """Keys of the immediate children (files and directories) of `prefix`; [] if none."""
        path = self._path(prefix)

        def ls() -> list[str]:
            try:
                return sorted(self._key(e) for e in self.fs.ls(path, detail=False) if self._key(e) != prefix)
            except FileNotFoundError:
                return []

        return self._call("ls", prefix, ls)

    def find(self, prefix: str = "") -> dict[str, int]:
        """Every file key under `prefix` (recursively) with its size; {} if none."""
        path = self._path(prefix)

        def find() -> dict[str, int]:
            try:
                found = self.fs.find(path, detail=True)
            except FileNotFoundError:
                return {}
            return {self._key(p): int(i.get("size") or 0) for p, i in found.items() if i.get("type") != "directory"}

        return self._call("find", prefix, find)

    def rm(self, prefix: str, recursive: bool = False) -> None:
        """Delete a key (or, recursive, everything under it); missing keys are not an error."""
        path = self._path(prefix)

        def rm() -> None:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._call("delete", prefix, rm)

    def sha256(self, key: str) -> tuple[str, int]:
        """Streaming sha256 and size of a stored object (never held in memory whole)."""
        path = self._path(key)

        def digest() -> tuple[str, int]:
            h, size = hashlib.sha256(), 0
            with self.fs.open(path, "rb", block_size=_CHUNK) as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            return h.hexdigest(), size

        return self._call("read", key, digest)

    def put_if_absent(self, key: str, data: bytes) -> None:
        """Create `key` only if nothing is there: CommitConflict when another writer was first."""
        path = self._path(key)

        def create() -> None:
            try:
                if self.local:
                    _link_create(Path(path), data)
                else:
                    self.fs.pipe_file(path, data, mode="create")
            except Exception as exc:
                # A retried create (ours, or the HTTP client's own resend) may find the object
                # that our attempt with the lost response wrote: the same bytes are a success.
                if _triage(exc) == "exists" and self.fs.cat_file(path) == data:
                    return
                raise

        self._call("commit", key, create)


def _link_create(path: Path, data: bytes) -> None:
    """Atomic, exclusive create on a local/NFS volume: write a temp file, hard-link it in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        filemodes.as_created(tmp, fd)  # mkstemp's 0600 is for the temp name, not the result
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails with FileExistsError if someone was first
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            with open(path, "xb") as f:  # volumes without hard links
                f.write(data)
    finally:
        os.unlink(tmp)


# ------------------------------------------------------------------------------------ manifests


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def build_files_map(local_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    root = Path(local_dir)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            _check_key(rel)
            digest, size = file_digest(p)
            files[rel] = {"sha256": digest, "bytes": size}
    return files


def _commit(store: Store, uploads: dict[str, Path], files: dict, manifest_key: str, extra: dict, parallel: int) -> dict:
    if "files" in extra or "createdAt" in extra:
        raise ValueError("manifest_extra may not set 'files' or 'createdAt'")
    # Checked before the first byte goes up, so that a second job never overwrites the files
    # a committed manifest describes; put_if_absent below settles a true race.
    if store.exists(manifest_key):
        raise CommitConflict(
            f"{display_uri(store.uri_for(manifest_key))} already exists: another job committed to this output. "
            "Give this job its own spec.output.uri."
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for future in [pool.submit(store.put_file, local, key) for key, local in uploads.items()]:
            future.result()
    manifest = {"files": files, **extra, "createdAt": _now()}
    store.put_if_absent(manifest_key, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def upload_dir(
    local_dir: str | os.PathLike, store: Store, prefix: str, manifest_extra: dict, *, parallel: int = 4
) -> dict:
    """Upload every file of `local_dir` under `prefix/`, then `prefix/manifest.json`, last."""
    files = build_files_map(local_dir)
    if MANIFEST in files:
        raise ValueError(f"{local_dir} already holds a {MANIFEST}; it is written by the upload")
    key = (lambda rel: f"{prefix}/{rel}") if prefix else (lambda rel: rel)
    uploads = {key(rel): Path(local_dir, rel) for rel in files}
    return _commit(store, uploads, files, key(MANIFEST), dict(manifest_extra), parallel)


def read_manifest(store: Store, prefix: str) -> dict:
    """The manifest of a committed directory; ObjectNotFound if there is none."""
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    raw = store.read_bytes(key)
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        for rel, entry in files.items():
            _check_key(rel)
            int(entry["bytes"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError, PermanentStorageError) as exc:
        raise PermanentStorageError(f"{display_uri(store.uri_for(key))} is not a valid manifest ({exc})") from None
    return manifest


def verify(store: Store, prefix: str, *, hashes: bool = True) -> tuple[bool, str]:
    """Whether every file the manifest lists is there with its size and (hashes=True) sha256."""
    ok, reason, _ = _verify(store, prefix, hashes)
    return ok, reason


def _verify(store: Store, prefix: str, hashes: bool) -> tuple[bool, str, dict | None]:
    try:
        manifest = read_manifest(store, prefix)
    except ObjectNotFound:
        return False, "no manifest.json: the directory was never committed", None
    except PermanentStorageError as exc:
        if _triage(exc.__cause__ or exc) in ("access", "no_bucket"):
            raise
        return False, str(exc), None
    sizes = store.find(prefix)
    base = f"{prefix}/" if prefix else ""
    for rel, entry in sorted(manifest["files"].items()):
        if base + rel not in sizes:
            return False, f"{rel} is missing", manifest
        if sizes[base + rel] != entry["bytes"]:
            return False, f"{rel} has {sizes[base + rel]} bytes, the manifest says {entry['bytes']}", manifest
        if hashes:
            digest, _ = store.sha256(base + rel)
            if digest != entry["sha256"]:
                return (
                    False,
                    f"{rel}: sha256 mismatch (stored {digest[:12]}…, manifest {entry['sha256'][:12]}…)",
                    manifest,
                )
    return True, "ok", manifest


def _verify_local(directory: Path, files: dict) -> str | None:
    for rel, entry in sorted(files.items()):
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        digest, size = file_digest(p)
        if size != entry["bytes"] or digest != entry["sha256"]:
            return f"{rel}: sha256 mismatch (got {digest[:12]}…, manifest {entry['sha256'][:12]}…)"
    return None


def download_verified(store: Store, prefix: str, files: dict, target: Path, parallel: int = 4) -> str | None:
    """Download the manifest's files into `target` (atomically); a reason string if they do not verify."""
    if target.is_dir() and _verify_local(target, files) is None:
        return None  # already here (a restarted container on the same node)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        base = f"{prefix}/" if prefix else ""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            for f in [pool.submit(store.get_file, base + rel, staging / rel) for rel in files]:
                f.result()
        if (reason := _verify_local(staging, files)) is not None:
            return reason
        shutil.rmtree(target, ignore_errors=True)
        filemodes.as_created(staging)  # mkdtemp's 0700 would hide it from other users (a serving container)
        os.replace(staging, target)
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------- checkpoints


def checkpoint_prefix(step: int) -> str:
    return f"{CHECKPOINTS}/step-{int(step)}"


def commit_checkpoint(
    store: Store, local_dir: str | os.PathLike, step: int, extra: dict | None = None, *, parallel: int = 4
) -> str:
    """Upload a checkpoint and commit it with its manifest; returns its URI.

    Committing a step that is already committed returns its URI untouched: a restarted pod that
    saves the step it resumed from (e.g. on SIGTERM) must not fail.
    """
    prefix = checkpoint_prefix(step)
    if store.exists(f"{prefix}/{MANIFEST}"):
        log.warning("checkpoint %s is already committed; keeping it", display_uri(store.uri_for(prefix)))
        return store.uri_for(prefix)
    upload_dir(local_dir, store, prefix, {"step": int(step), **(extra or {})}, parallel=parallel)
    return store.uri_for(prefix)


def _step_dirs(store: Store) -> dict[int, str]:
    dirs = {}
    for key in store.ls(CHECKPOINTS):
        m = _STEP_DIR.match(key.rsplit("/", 1)[-1])
        if m:
            dirs[int(m.group(1))] = key
    return dirs


def list_checkpoints(store: Store) -> list[int]:
    """Steps of the committed checkpoints (those with a manifest), oldest first."""
    return sorted(step for step in _step_dirs(store) if store.exists(f"{checkpoint_prefix(step)}/{MANIFEST}"))


@dataclass
class ResumePoint:
    """Where to resume: the newest checkpoint that verified, and the ones skipped on the way.

    Falsy when nothing verified; `skipped` is filled either way so that the trainer can raise the
    CheckpointCorrupt condition.
    """

    step: int | None = None
    path: Path | None = None
    uri: str | None = None
    manifest: dict | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.step is not None


def latest_valid_checkpoint(store: Store, local_cache_dir: str | os.PathLike, *, parallel: int = 4) -> ResumePoint:
    """Download the newest checkpoint that verifies (remotely: sizes; after download: sha256)."""
    result = ResumePoint()
    for step in reversed(list_checkpoints(store)):
        prefix = checkpoint_prefix(step)
        ok, reason, manifest = _verify(store, prefix, hashes=False)
        target = Path(local_cache_dir) / f"step-{step}"
        if ok and manifest is not None:
            reason = download_verified(store, prefix, manifest["files"], target, parallel) or "ok"
            ok = reason == "ok"
        if ok:
            result.step, result.path, result.uri, result.manifest = step, target, store.uri_for(prefix), manifest
            return result
        log.warning("checkpoint %s does not verify (%s): skipping it", display_uri(store.uri_for(prefix)), reason)
        result.skipped.append((step, reason))
    return result


def prune_checkpoints(store: Store, keep: int) -> list[int]:
    """Delete all but the newest `keep` committed checkpoints, and older uncommitted leftovers.

    The manifest goes first, so a checkpoint deleted half-way is invisible rather than corrupt.
    Directories newer than the newest commit may be an upload in progress and are left alone.
    """
    keep = max(1, int(keep))
    dirs = _step_dirs(store)
    committed = list_checkpoints(store)
    deleted = []
    for step in committed[:-keep]:
        store.rm(f"{checkpoint_prefix(step)}/{MANIFEST}")
        store.rm(checkpoint_prefix(step), recursive=True)
        deleted.append(step)
    newest = committed[-1] if committed else None
    for step in sorted(dirs):
        if newest is not None and step < newest and step not in committed:
            store.rm(checkpoint_prefix(step), recursive=True)
            deleted.append(step)
    return sorted(deleted)


# ---------------------------------------------------------------------------------- the result


def commit_result(store: Store, local_dir: str | os.PathLike, manifest_extra: dict, *, parallel: int = 4) -> dict:
    """Upload the adapter to `<output>/adapter/` and commit `<output>/manifest.json` (once, T6)."""
    files = {f"{ADAPTER}/{rel}": entry for rel, entry in build_files_map(local_dir).items()}
    uploads = {key: Path(local_dir, key[len(ADAPTER) + 1 :]) for key in files}
    return _commit(store, uploads, files, MANIFEST, dict(manifest_extra), parallel)
