"""Model sources: turn `spec.model.source` into a local directory that is safe to load.

A model directory is untrusted input. Pickle weights (`*.bin`, `*.pt`) run code when loaded and
`auto_map` / `*.py` files make transformers import code shipped with the model, so a directory is
checked before anything reads it (T9): safetensors only, and remote code only when the user
set `spec.model.trustRemoteCode`. Remote directories (s3://, gs://, …) are downloaded once into
a cache keyed by the URI and reused; hf:// goes through huggingface_hub with file patterns that
never fetch pickles or code, and says how to mirror the model when the hub is unreachable (most
clusters have no route to it).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetune.trainer import builtin
from kubetune.trainer.storage import (
    MANIFEST,
    PermanentStorageError,
    StorageError,
    Store,
    display_uri,
    download_verified,
    local_path,
    read_manifest,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
COMPLETE_MARKER = ".complete"
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class ModelSourceError(PermanentStorageError):
    """The model cannot be obtained or is refused; retrying cannot help (permanent exit code)."""


def load_pretrained_kwargs(trust_remote_code: bool) -> dict[str, Any]:
    """Keyword arguments for every `from_pretrained` call on a model directory."""
    return {"use_safetensors": True, "trust_remote_code": bool(trust_remote_code)}


def default_cache_dir() -> Path:
    return builtin.cache_root().parent / "models"


def resolve_model(source: Any, cache_dir: Path | None = None, storage_options: dict | None = None) -> Path:
    """The local directory of a model source (a ModelSource or a URI string), checked by T9 rules."""
    uri = getattr(source, "source", source)
    trust = bool(getattr(source, "trust_remote_code", False))
    if not isinstance(uri, str) or not uri:
        raise ModelSourceError(f"spec.model.source must be a URI string, got {uri!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme == "builtin":
        name = uri[len("builtin://") :].strip("/")
        try:
            path = builtin.ensure(name)
        except KeyError:
            known = ", ".join(f"builtin://{n}" for n in builtin.BUILTIN_MODELS)
            raise ModelSourceError(f"spec.model.source {uri!r}: no such built-in model; known: {known}") from None
    elif scheme == "hf":
        path = _from_hub(uri, cache)
    elif scheme in ("", "file", "local", "pvc"):
        mounted = local_path(uri)
        if mounted is None or not mounted.is_dir():
            raise ModelSourceError(
                f"spec.model.source {display_uri(uri)}: {mounted} is not a directory (is the volume mounted?)"
            )
        path = mounted
    else:
        path = _from_store(uri, cache, storage_options)
    check_model_dir(path, trust)
    return path


TOKENIZER_PATTERNS = ("*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt")
"""The files a tokenizer is made of: never weights."""


def load_tokenizer(source: Any, cache_dir: Path | None = None, storage_options: dict | None = None) -> Any:
    """The model's tokenizer, for checking data on a laptop: only tokenizer files are fetched (no
    weights), and code shipped with the model is never run, whatever spec.model.trustRemoteCode
    says (remote code runs only in the trainer pod). Raises ModelSourceError saying why not."""
    from transformers import AutoTokenizer

    uri = getattr(source, "source", source)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme == "builtin":
        path = resolve_model(uri, cache)
    elif scheme in ("", "file", "local", "pvc"):
        local = local_path(uri)
        if local is None or not local.is_dir():
            raise ModelSourceError(
                f"{display_uri(uri)}: {local} is not a directory here (a volume only the pod mounts?)"
            )
        path = local
    elif scheme == "hf":
        path = _from_hub(uri, cache, TOKENIZER_PATTERNS)
    else:
        path = _from_store(uri, cache / "tokenizers", storage_options, TOKENIZER_PATTERNS)
    code = sorted(p.name for p in path.iterdir() if p.suffix == ".py")
    for name in ("tokenizer_config.json", "config.json"):
        try:
            config = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and "auto_map" in config:
            code.append(f"{name}: auto_map")
    if code:
        raise ModelSourceError(
            f"the tokenizer of {display_uri(uri)} needs code shipped with the model ({', '.join(code)}); "
            "validation never runs it (the trainer pod does, with spec.model.trustRemoteCode: true)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:
        raise ModelSourceError(
            f"the tokenizer of {display_uri(uri)} could not be loaded: {type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}"
        ) from None


# ------------------------------------------------------------------------------------- fetchers


def _from_hub(uri: str, cache: Path, patterns: Any = None) -> Path:
    rest = uri[len("hf://") :].strip("/")
    repo_id, _, revision = rest.partition("@")
    if not _HF_REPO.match(repo_id) or "@" in revision:
        raise ModelSourceError(f"spec.model.source {uri!r}: expected hf://org/name or hf://org/name@revision")
    try:
        from huggingface_hub import errors, snapshot_download
    except ImportError:  # pragma: no cover - the trainer image ships it with transformers
        raise ModelSourceError("hf:// sources need huggingface_hub in the trainer image") from None
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                allow_patterns=list(patterns or HF_ALLOW_PATTERNS),
                cache_dir=str(cache / "hf"),
            )
        )
    except errors.GatedRepoError:
        raise ModelSourceError(
            f"spec.model.source {uri}: the repository is gated; accept its license on the Hub and give the job "
            "an HF_TOKEN through a Secret, or mirror the model to s3:// or a PVC"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelSourceError(
            f"spec.model.source {uri}: repository {repo_id!r} not found (or private: give the job an HF_TOKEN "
            "through a Secret)"
        ) from None
    except errors.RevisionNotFoundError:
        raise ModelSourceError(f"spec.model.source {uri}: revision {revision!r} not found in {repo_id}") from None
    except Exception as exc:
        raise ModelSourceError(
            f"spec.model.source {uri}: the Hugging Face Hub is unreachable from this pod ({type(exc).__name__}). "
            "Mirror the model (its *.safetensors, config and tokenizer files) to s3://, gs:// or a PVC and point "
            "spec.model.source at it"
        ) from None


def _from_store(uri: str, cache: Path, storage_options: dict | None, patterns: Any = None) -> Path:
    """Download a remote directory once into `cache/remote/<sha256(uri)>`; later calls reuse it.
    With `patterns` (fnmatch on the file name), only those files."""
    target = cache / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:32]
    if (target / COMPLETE_MARKER).exists():
        return target
    store = Store(uri, storage_options)
    listing = store.find("")
    if not listing:
        raise ModelSourceError(f"spec.model.source {display_uri(uri)}: nothing there (an empty or missing directory)")
    has_safetensors = any(k.endswith(".safetensors") for k in listing)
    if MANIFEST in listing:  # committed by kubetune: download what it lists, verified
        files = read_manifest(store, "")["files"]
    else:
        files = {k: None for k in listing}
    # Pickles next to safetensors are never loaded: do not spend the bandwidth.
    wanted = {k: v for k, v in files.items() if not (has_safetensors and k.endswith(PICKLE_SUFFIXES))}
    if patterns:
        wanted = {k: v for k, v in wanted.items() if any(fnmatch.fnmatch(k.rsplit("/", 1)[-1], p) for p in patterns)}
    cache.joinpath("remote").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if all(v is not None for v in wanted.values()):
            reason = download_verified(store, "", wanted, staging / "d")
            if reason is not None:
                raise ModelSourceError(f"spec.model.source {display_uri(uri)} does not match its manifest: {reason}")
            if MANIFEST in listing:
                store.get_file(MANIFEST, staging / "d" / MANIFEST)
        else:
            for key in wanted:
                store.get_file(key, staging / "d" / key)
        (staging / "d" / COMPLETE_MARKER).write_text(json.dumps({"uri": display_uri(uri)}))
        shutil.rmtree(target, ignore_errors=True)  # a partial copy from a killed process
        try:
            os.replace(staging / "d", target)
        except OSError:
            if not (target / COMPLETE_MARKER).exists():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------- the checks


def check_model_dir(path: Path, trust_remote_code: bool) -> None:
    """Refuse pickle-only weights, and remote code unless spec.model.trustRemoteCode (T9)."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()]
    names = [p.relative_to(path).as_posix() for p in files]
    safetensors = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not safetensors:
        if pickles:
            raise ModelSourceError(
                f"{path}: only pickle weights ({', '.join(sorted(pickles)[:3])}); pickle weights are not loaded because "
                "they can run code: convert to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)`)"
            )
        raise ModelSourceError(f"{path}: no *.safetensors weights found; kubetune loads models from safetensors only")
    config = path / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"{path}: no config.json; is spec.model.source the model's top directory?")
    if trust_remote_code:
        return
    code = sorted(n for n in names if n.endswith(".py"))
    if code:
        raise ModelSourceError(
            f"{path}: contains Python files ({', '.join(code[:3])}) that transformers may import; set "
            "spec.model.trustRemoteCode: true only if you trust this model's code"
        )
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8")) if (path / name).is_file() else {}
        except (ValueError, OSError) as exc:
            raise ModelSourceError(f"{path / name}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise ModelSourceError(
                f"{path / name}: has auto_map, i.e. it loads code shipped with the model; set "
                "spec.model.trustRemoteCode: true only if you trust this model's code"
            )


# ------------------------------------------------------------------------------- the context


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""config.json keys that hold a model's context length, in the order transformers' families use them
(Llama/Qwen/Mistral/Gemma/Phi/NeoX/OPT/Falcon; GPT-2; Bloom-likes; ChatGLM; GPT-J-likes)."""


def context_length(config: dict[str, Any]) -> tuple[int, str] | None:
    """(the longest sequence the model takes, the config key it comes from), or None when the
    config does not say. A RoPE scaling factor extends max_position_embeddings when that is still
    the original context (Qwen's yarn); Llama 3.1 and Phi-3 already give the extended one."""
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
                factor = rope.get("factor") if isinstance(rope, dict) else None
                original = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
                kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
                if (
                    key == "max_position_embeddings"
                    and isinstance(factor, (int, float))
                    and factor > 1
                    and kind in ("linear", "dynamic", "yarn")
                    and (original is None or original >= value)
                ):
                    return int(value * factor), f"{key} × rope_scaling.factor"
                return value, key
    return None


def context_problem(config: dict[str, Any], max_seq_length: int) -> str | None:
    """Why spec.dataset.maxSeqLength cannot be used with this model config, or None."""
    found = context_length(config)
    if found is None or max_seq_length <= found[0]:
        return None
    limit, key = found
    return (
        f"spec.dataset.maxSeqLength {max_seq_length} is longer than the model's context of {limit} tokens "
        f"(config.json {key}); set spec.dataset.maxSeqLength to {limit} or less"
    )


def read_config(path: Path) -> dict[str, Any]:
    """A model directory's config.json ({} when absent or unreadable: other checks say why)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def missing_local_model(spec: Any) -> str | None:
    """A plain-path or file:// model source that is no directory on this machine, as a message
    naming the field; None otherwise. pvc:// is a volume only the trainer pod mounts, and remote
    sources are checked by whoever fetches them."""
    uri = spec.model.source
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme not in ("", "file", "local"):
        return None
    path = local_path(uri)
    if path is None or path.is_dir():
        return None
    return (
        f"spec.model.source: {uri}: no such directory here; give the directory holding config.json and the "
        "safetensors weights (a volume only the trainer pod mounts is pvc://<claim>/<path>)"
    )


def context_problem_for(spec: Any, fetch: bool = False, cache_dir: Path | None = None) -> str | None:
    """The maxSeqLength-vs-context problem of a job, checked before any weight is read: built-in
    and local models read their config.json in place; remote ones (hf://, s3://, …) only with
    `fetch`, which downloads the tokenizer files (config.json among them, never weights). None
    when fine or when the config cannot be had here (the trainer checks again before loading)."""
    uri = spec.model.source
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        if scheme == "builtin":
            config: dict[str, Any] = {"max_position_embeddings": builtin.MAX_POSITIONS}
        elif scheme in ("", "file", "local", "pvc"):
            path = local_path(uri)
            config = read_config(path) if path is not None else {}
        elif not fetch:
            return None
        elif scheme == "hf":
            config = read_config(_from_hub(uri, cache, TOKENIZER_PATTERNS))
        else:
            config = read_config(_from_store(uri, cache / "tokenizers", None, TOKENIZER_PATTERNS))
    except (StorageError, OSError):  # unreachable here: the trainer checks again before loading
        return None
    return context_problem(config, spec.dataset.max_seq_length)
