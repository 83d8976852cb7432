"""Credentials in a URI are refused by the models and by the CRD alike, and never repeated (RELIABILITY O17).

`tests/api/test_invalid_manifests.py` has a row per refused form at its field; here the same rule
is checked on both sides for URIs that must stay valid (a revision after `@`, a port, an IPv6
host, `@` inside an object key), and the refusal's message is checked not to echo the secret.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api import parse_manifest
from kubetune.api.types import CREDENTIALS_IN_URI, cel_string, has_credentials

from tests.api.test_invalid_manifests import CANONICAL
from tests.crd_offline import validate as crd_validate

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

REFUSED = [
    f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/path",
    "s3://AKIAIOSFODNN7EXAMPLE:abc+def=@bucket/path",
    "s3://TOKEN@bucket/path",
    "gs://user:pa/ss@b/data.jsonl",
    "gcs://user:secret@b/data.jsonl",
    "S3://KEY:SECRET@bucket/upper-case-scheme",
    "https://user:password@data.example.com/train.jsonl",
    "https://user:pa/ss@data.example.com/train.jsonl",
    "http://token@data.example.com/train.jsonl",
    "https://u:p@[::1]:8443/train.jsonl",
    "hf://hf_abcdefghijklmnopqrstuvwxyz0123@org/name",
    "hf://user:tok/en@org/name",
    "ftp://user:pass@host/x",
]
ACCEPTED = [
    "hf://mistralai/Mistral-7B-v0.1@main",
    "hf://org/name@0123456789abcdef",
    "s3://bucket/models/llama@v2/adapter",
    "s3://bucket/a:b/c",
    "gs://bucket/path/train.jsonl",
    "https://data.example.com:8443/train.jsonl",
    "https://data.example.com/train.jsonl?version=2",
    "https://[::1]:8443/train.jsonl",
    "https://[2001:db8::1]/train.jsonl",
    "file:///data/train.jsonl",
    "pvc://claim/dir/train.jsonl",
    "data/train.jsonl",
]


@pytest.mark.parametrize("uri", REFUSED)
def test_python_rule_refuses(uri: str) -> None:
    assert has_credentials(uri)


@pytest.mark.parametrize("uri", ACCEPTED)
def test_python_rule_accepts(uri: str) -> None:
    assert not has_credentials(uri)


def _crd() -> dict[str, Any]:
    return yaml.safe_load(Path("crds/finetunejobs.kubetune.io.yaml").read_text())


def _with_train(uri: str) -> dict[str, Any]:
    manifest = copy.deepcopy(CANONICAL)
    manifest["spec"]["dataset"]["train"] = uri
    return manifest


@pytest.mark.parametrize(
    "uri",
    [
        u
        for u in REFUSED + ACCEPTED
        if u.split("://")[0] in ("s3", "gs", "gcs", "file", "pvc", "http", "https") or "://" not in u
    ],
)
def test_models_and_crd_agree(uri: str) -> None:
    """dataset.train takes every data scheme: the models and the offline CRD answer alike."""
    manifest = _with_train(uri)
    job, problems = parse_manifest(manifest)
    errors = crd_validate(_crd(), manifest)
    refused = uri in REFUSED
    assert (job is None) == refused, problems
    assert bool([e for e in errors if e.path.startswith("spec.dataset.train")]) == refused, errors


def test_refusal_names_the_fix_and_hides_the_secret() -> None:
    job, problems = parse_manifest(_with_train(f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/path"))
    assert job is None
    text = "; ".join(str(p) for p in problems)
    assert "spec.dataset.train" in text and "spec.output.credentialsSecret" in text
    assert SECRET not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    crd_text = "; ".join(str(e) for e in crd_validate(_crd(), _with_train(f"s3://K:{SECRET}@bucket/path")))
    assert "spec.output.credentialsSecret" in crd_text and SECRET not in crd_text


def test_an_unknown_scheme_with_userinfo_is_not_echoed() -> None:
    job, problems = parse_manifest(_with_train("ftp://user:pa/ss@host/x"))
    assert job is None and "pa/ss" not in "; ".join(str(p) for p in problems)


def test_cel_literal_has_no_regex_escape_cel_lacks() -> None:
    """The rule's only backslash is `\\x5b`, which CEL and RE2 both read as '['."""
    literal = cel_string(CREDENTIALS_IN_URI)
    assert literal.count("\\") == 2 and "\\\\x5b" in literal
