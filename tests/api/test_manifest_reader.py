"""Reading manifest YAML as kubectl does, and bounded (RELIABILITY I1).

Each hostile input once gave a traceback or ran unbounded (a billion-laughs file took 58 s and
3.1 GB); each now gives one line naming the file and line, in bounded time and memory.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from kubetune.api.manifest import MAX_MANIFEST_BYTES, ManifestError, load_documents
from kubetune.api.resource import parse_manifest

from tests.api.test_invalid_manifests import CANONICAL

LAUGHS = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    if i
    else "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(10)
)  # 10**9 leaves once expanded, 600 bytes written

HOSTILE = {
    "billion-laughs": (LAUGHS, ":6:", "aliases are expanded"),  # l5 = 9**6 leaves: past 100,000
    "recursive-alias": ("a: &a [1, *a]\n", ":1:", "recursive alias"),
    "deep-nesting": ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", ":1:", "nested deeper than 100 levels"),
    "deep-blocks": ("".join(" " * i + f"k{i}:\n" for i in range(300)), ":", "nested deeper than 100 levels"),
    "deep-but-readable": ("a: " + "[" * 150 + "]" * 150 + "\n", ":1:", "nested deeper than 100 levels"),
    "python-tag": (
        "a: !!python/object/apply:os.system [echo hi]\n",
        ":1:",
        "!!python/object/apply:os.system is not allowed",
    ),
    "timestamp-tag": ("a: !!timestamp 2024-01-01\n", ":1:", "!!timestamp is not allowed"),
    "binary-tag": ("a: !!binary aGk=\n", ":1:", "!!binary is not allowed"),
    "duplicate-key": (
        "spec:\n  model: {source: a}\n  model: {source: b}\n",
        ":3:",
        "duplicate key 'model' (first on line 2)",
    ),
    "complex-key": ("? [a, b]\n: c\n", ":1:", "a key must be a plain string"),
}


@pytest.mark.parametrize(("text", "where", "message"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_yaml_is_refused_with_file_and_line(text: str, where: str, message: str) -> None:
    tracemalloc.start()
    start = time.monotonic()
    with pytest.raises(ManifestError) as err:
        load_documents("job.yaml", text)
    seconds = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(err.value).startswith(f"job.yaml{where}"), str(err.value)
    assert message in str(err.value), str(err.value)
    assert seconds < 5 and peak < 200 * 2**20, (seconds, peak)


def test_oversized_file_is_refused_unread() -> None:
    with pytest.raises(ManifestError, match="the API server's request limit"):
        load_documents("big.yaml", "a: " + "x" * MAX_MANIFEST_BYTES)


def test_scalars_mean_what_kubectl_sends() -> None:
    """kubectl converts YAML to JSON: keys become strings, dates and base-60 numbers stay strings,
    YAML 1.2 floats are numbers, merge keys work."""
    (doc,) = load_documents(
        "x.yaml",
        "1: a\ntrue: b\nd: 2024-01-01\nt: 12:30:00\nf: 2e-4\nh: 0x1F\nbase: &b {x: 1, y: 2}\nm: {<<: *b, y: 3}\n",
    )
    assert doc.data == {
        "1": "a",
        "true": "b",
        "d": "2024-01-01",
        "t": "12:30:00",
        "f": 2e-4,
        "h": 31,
        "base": {"x": 1, "y": 2},
        "m": {"x": 1, "y": 3},
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (".inf", "must be a finite number, not inf"),
        ("-.inf", "must be a finite number, not -inf"),
        (".nan", "must be a finite number, not nan"),
        ("1e400", "must be a finite number, not inf"),
        ("99999999999999999999", "is outside the 64-bit integer range the API server accepts"),
    ],
)
def test_numbers_json_cannot_carry_are_refused_at_their_path(value: str, message: str) -> None:
    text = yaml.safe_dump(CANONICAL).replace("maxRetries", "x") + ""
    (doc,) = load_documents(
        "job.yaml", text.replace("  hyperparameters:\n", f"  activeDeadlineSeconds: {value}\n  hyperparameters:\n")
    )
    job, problems = parse_manifest(doc.data)
    assert job is None and [str(p) for p in problems] == [f"spec.activeDeadlineSeconds: {message}"]


def test_explicit_null_is_pruned_like_the_api_server_does() -> None:
    """A declared field set to null is dropped by the API server (no field of ours is nullable)."""
    (doc,) = load_documents(
        "job.yaml", yaml.safe_dump({**CANONICAL, "spec": {**CANONICAL["spec"], "suspend": None, "image": None}})
    )
    job, problems = parse_manifest(doc.data)
    assert problems == [] and job is not None and job.spec.suspend is False and job.spec.image is None


def test_cli_never_shows_a_traceback(tmp_path: Path) -> None:
    files = []
    for name, (text, _, _) in HOSTILE.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(text)
        files.append(str(f))
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", *files], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    assert len(out.stdout.strip().splitlines()) == len(files)  # one line each
    assert time.monotonic() - start < 60
