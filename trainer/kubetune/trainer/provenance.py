"""What a result was made from, so it stands alone: the base model's name and resolved revision or
digest, the datasets' URIs and digests, for the manifest; the adapter's `base_model_name_or_path`.

peft writes the directory the base was loaded from into `adapter_config.json`, which for anything
but a local model is kubetune's download cache, a path that exists nowhere else. The source is
written instead: the Hub id for hf:// (with the resolved commit as `revision`, which peft's
AutoPeftModel passes on when it loads the base), a local path as a path, and any other URI
(s3://, gs://, pvc://, builtin://) as it is: peft cannot open those itself, so load the base
from it (`python -m kubetune.trainer fetch --model URI`, or kubetune's `sources.resolve_model`)
and give that model to `PeftModel.from_pretrained`.

Digests are computed on a background thread while the model trains (hashing a large base takes
a while): what `base.sha256` covers is named in `base.digestOf`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetune.trainer.storage import MANIFEST, display_uri, local_path

CHUNK = 1 << 22
_WEIGHTS_DIGEST = "config.json and *.safetensors: sha256 of their sha256sum lines (sorted by path)"


def base_model_name(source: str) -> str:
    """What `base_model_name_or_path` should say for a model source (see the module docstring)."""
    scheme = urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme == "hf":
        return source[len("hf://") :].strip("/").partition("@")[0]
    if scheme in ("", "file", "local"):
        path = local_path(source)
        return str(path) if path is not None else source
    return display_uri(source)


def fix_adapter_config(directory: Path, source: str, revision: str | None) -> None:
    """Point a saved peft adapter at its base's source (no-op for full weights)."""
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_model_name(source)
    if revision is not None:
        config["revision"] = revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_record(source: str, model_dir: Path) -> dict[str, Any]:
    """The base model's provenance: source, name, and the resolved Hub commit, or a digest."""
    model_dir = Path(model_dir)
    out: dict[str, Any] = {"source": display_uri(source), "name": base_model_name(source)}
    scheme = urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme == "hf":
        # snapshot_download returns …/snapshots/<commit sha>: the revision that was fetched.
        if re.fullmatch(r"[0-9a-f]{40}", model_dir.name):
            out["revision"] = model_dir.name
        out["requestedRevision"] = source.partition("@")[2] or "main"
        return out
    if (model_dir / MANIFEST).is_file():  # a kubetune output: its manifest lists every file's sha256
        out["sha256"], out["digestOf"] = _sha256_file(model_dir / MANIFEST), MANIFEST
        return out
    files = sorted(
        p for p in model_dir.rglob("*") if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors")
    )
    lines = "".join(f"{_sha256_file(p)}  {p.relative_to(model_dir).as_posix()}\n" for p in files)
    out["sha256"], out["digestOf"] = hashlib.sha256(lines.encode()).hexdigest(), _WEIGHTS_DIGEST
    return out


def dataset_records(dataset: Any, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Each dataset file's URI, size and sha256 (of the bytes as stored, compressed or not)."""
    import fsspec
    from kubetune.trainer import data

    out = []
    for role, uri in (("train", dataset.train), ("validation", dataset.validation)):
        if not uri:
            continue
        h, size = hashlib.sha256(), 0
        with fsspec.open(data.resolve(uri), "rb", **(storage_options or {})) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        out.append({"role": role, "uri": display_uri(uri), "sha256": h.hexdigest(), "bytes": size})
    return out


class Provenance:
    """Starts hashing at construction (a background thread); `record()` waits for the result."""

    def __init__(self, source: str, model_dir: Path, dataset: Any) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-provenance")
        self._model = self._pool.submit(model_record, source, model_dir)
        self._data = self._pool.submit(dataset_records, dataset)
        self._pool.shutdown(wait=False)

    @staticmethod
    def _result(future: concurrent.futures.Future, fallback: Any) -> Any:
        try:
            return future.result()
        except Exception as err:
            return fallback(f"{type(err).__name__}: {str(err)[:200]}")

    @property
    def revision(self) -> str | None:
        return self._result(self._model, lambda e: {}).get("revision")

    def record(self) -> dict[str, Any]:
        """The manifest's `base` and `datasets` entries."""
        return {
            "base": self._result(self._model, lambda e: {"error": e}),
            "datasets": self._result(self._data, lambda e: [{"error": e}]),
        }
