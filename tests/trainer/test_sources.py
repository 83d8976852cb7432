"""Model sources: builtin://, paths, pvc://, s3:// (cached), hf:// without a hub, and T9 refusals."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from kubetune.api.estimate import BUILTIN_PARAMETERS, BUILTIN_SHAPES
from kubetune.api.spec import ModelSource
from kubetune.trainer.builtin import BUILTIN_MODELS, byte_tokenizer
from kubetune.trainer.sources import (
    COMPLETE_MARKER,
    ModelSourceError,
    check_model_dir,
    load_pretrained_kwargs,
    resolve_model,
)
from kubetune.trainer.storage import PermanentStorageError, Store, build_files_map, upload_dir

from tests.fixtures.s3 import s3_bucket, s3_client, s3_faults, s3_server  # noqa: F401


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin://tiny-llama, generated into a private KUBETUNE_CACHE (no user cache touched)."""
    old = os.environ.get("KUBETUNE_CACHE")
    os.environ["KUBETUNE_CACHE"] = str(tmp_path_factory.mktemp("kubetune-cache"))
    try:
        yield resolve_model("builtin://tiny-llama")
    finally:
        if old is None:
            os.environ.pop("KUBETUNE_CACHE", None)
        else:
            os.environ["KUBETUNE_CACHE"] = old


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ local sources


def test_builtin(tiny_dir: Path) -> None:
    assert (tiny_dir / "config.json").is_file() and list(tiny_dir.glob("*.safetensors"))
    assert (tiny_dir / "tokenizer.json").is_file()
    assert resolve_model(ModelSource(source="builtin://tiny-llama")) == tiny_dir
    with pytest.raises(ModelSourceError, match="builtin://tiny-llama"):
        resolve_model("builtin://no-such-model")


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_parameter_counts_are_the_operators(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator sizes pods from kubetune.api.estimate.BUILTIN_PARAMETERS (it cannot import
    the trainer): the counts must be those of the models the trainer builds."""
    from safetensors import safe_open

    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    directory = resolve_model(ModelSource(source=f"builtin://{name}"))
    total = 0
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            total += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())  # noqa: SIM118 -- safe_open has no __iter__
    assert BUILTIN_PARAMETERS[f"builtin://{name}"] == total


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_shapes_are_the_operators(name: str) -> None:
    """The operator sizes CPU pods from kubetune.api.estimate.BUILTIN_SHAPES: the trainer's shapes."""
    hidden, layers, heads, _kv_heads, _inter = BUILTIN_MODELS[name]
    assert BUILTIN_SHAPES[f"builtin://{name}"] == (hidden, layers, heads, len(byte_tokenizer()))


def test_local_path_file_uri_and_pvc(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = copy_model(tiny_dir, tmp_path / "models" / "tiny")
    assert resolve_model(str(model)) == model
    assert resolve_model(f"file://{model}") == model
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    assert resolve_model("pvc://models/tiny") == model
    with pytest.raises(ModelSourceError, match="not a directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(PermanentStorageError):
        resolve_model("pvc://models/../../etc")


# ---------------------------------------------------------------------------------- s3 sources


def test_s3_download_is_verified_and_cached(tiny_dir: Path, s3_bucket: str, s3_faults, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/models/tiny"
    upload_dir(tiny_dir, Store(uri), "", {"kind": "model mirror"})
    cache = tmp_path / "cache"
    path = resolve_model(uri, cache_dir=cache)
    assert path.is_relative_to(cache) and (path / COMPLETE_MARKER).is_file()
    local = build_files_map(tiny_dir)
    got = {k: v for k, v in build_files_map(path).items() if k not in (COMPLETE_MARKER, "manifest.json")}
    assert got == local

    s3_faults.clear()
    assert resolve_model(uri, cache_dir=cache) == path
    assert s3_faults.requests == []  # the second resolve never touched S3


def test_s3_plain_mirror_without_manifest(tiny_dir: Path, s3_bucket: str, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/mirror/tiny"
    store = Store(uri)
    for rel in build_files_map(tiny_dir):
        store.put_file(tiny_dir / rel, rel)
    store.put_bytes("pytorch_model.bin", b"never downloaded next to safetensors")
    path = resolve_model(uri, cache_dir=tmp_path / "cache")
    assert (path / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    assert not (path / "pytorch_model.bin").exists()


def test_s3_corrupt_download_is_refused_and_not_cached(
    tiny_dir: Path, s3_bucket: str, s3_client, tmp_path: Path
) -> None:
    uri = f"{s3_bucket}/models/tiny"
    upload_dir(tiny_dir, Store(uri), "", {})
    bucket = s3_bucket.removeprefix("s3://")
    key = "models/tiny/config.json"
    data = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3_client.put_object(Bucket=bucket, Key=key, Body=data.replace(b"{", b"[", 1))
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve_model(uri, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "remote").iterdir())


def test_s3_missing_model(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="nothing there"):
        resolve_model(f"{s3_bucket}/nope", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------- hf://


def test_hf_unreachable_says_mirror_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelSourceError) as err:
        resolve_model("hf://some-org/some-model@main", cache_dir=tmp_path)
    message = str(err.value)
    assert "unreachable" in message and "Mirror" in message and "s3://" in message and "spec.model.source" in message


def test_hf_refused_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ModelSourceError, match="unreachable"):
        resolve_model("hf://org/name", cache_dir=tmp_path)


@pytest.mark.parametrize("uri", ["hf://", "hf://a/b/c", "hf://org/name@rev@x", "hf://../x"])
def test_hf_bad_uri(uri: str, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="hf://org/name"):
        resolve_model(uri, cache_dir=tmp_path)


# ------------------------------------------------------------------------------- T9: refusals


class _WritesSentinel:
    """Unpickling this object creates a file: what a malicious pytorch_model.bin does."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_t9_pickle_only_model_is_refused_and_never_unpickled(tiny_dir: Path, tmp_path: Path) -> None:
    # The payload has teeth: unpickling one creates its file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_WritesSentinel(probe))).close()
    assert probe.exists()

    sentinel = tmp_path / "SENTINEL"
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(tiny_dir / "config.json", model / "config.json")
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesSentinel(sentinel)))
    with pytest.raises(ModelSourceError, match="pickle weights are not loaded.*convert to safetensors"):
        resolve_model(str(model))
    with pytest.raises(ModelSourceError, match="pytorch_model.bin"):
        check_model_dir(model, trust_remote_code=True)  # trusting code does not admit pickles
    # Even a caller that skipped the check does not unpickle with our from_pretrained kwargs.
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):  # no safetensors file: transformers refuses, the .bin stays closed
        AutoModelForCausalLM.from_pretrained(model, **load_pretrained_kwargs(False))
    assert not sentinel.exists()


def test_t9_remote_code_needs_trust(tiny_dir: Path, tmp_path: Path) -> None:
    with_map = copy_model(tiny_dir, tmp_path / "auto_map")
    config = json.loads((with_map / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (with_map / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=r"auto_map.*spec\.model\.trustRemoteCode"):
        resolve_model(str(with_map))
    assert resolve_model(ModelSource(source=str(with_map), trust_remote_code=True)) == with_map

    with_code = copy_model(tiny_dir, tmp_path / "py")
    (with_code / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ModelSourceError, match=r"modeling_evil\.py.*spec\.model\.trustRemoteCode"):
        resolve_model(ModelSource(source=str(with_code)))
    check_model_dir(with_code, trust_remote_code=True)

    tok_map = copy_model(tiny_dir, tmp_path / "tok")
    tok_config = json.loads((tok_map / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tok.Evil", None]}
    (tok_map / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ModelSourceError, match="tokenizer_config.json"):
        check_model_dir(tok_map, trust_remote_code=False)


def test_t9_no_weights_or_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no \\*.safetensors"):
        check_model_dir(tmp_path / "empty", False)
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="config.json"):
        check_model_dir(tmp_path / "noconfig", False)


def test_load_pretrained_kwargs() -> None:
    assert load_pretrained_kwargs(False) == {"use_safetensors": True, "trust_remote_code": False}
    assert load_pretrained_kwargs(True)["trust_remote_code"] is True
