"""The images cannot be built here (no Docker), so their Dockerfiles are read and held to what runs them.

The operator image's ENTRYPOINT must be the command the chart runs; the trainer image must run
`python -m kubetune.trainer` and have `torchrun` on the same PATH, because the operator's Job
overrides the command with one or the other (kubetune.operator.builders). Both run as the
numeric non-root uid the pod security contexts name, install only their own extra (which must
exist in pyproject.toml) from a base pinned to a version, and point HOME/TMPDIR/caches at the
emptyDirs the pods mount. .dockerignore keeps the venv, tests and VCS data out of the context.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from fnmatch import fnmatch
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser
from kubetune.api import parse_manifest
from kubetune.api.manifest import load_documents
from kubetune.operator import builders
from kubetune.operator.settings import OperatorSettings

from tests.chart.render import ROOT, one, scenario

EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
UID = "5f0c6a52-8a3e-4d2b-9c1e-0d4f3b7a9e21"


def parse(component: str) -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / component / "Dockerfile"))


def final_stage(df: DockerfileParser) -> list[dict[str, Any]]:
    """Instructions after the last FROM: what the image actually runs with."""
    starts = [i for i, ins in enumerate(df.structure) if ins["instruction"] == "FROM"]
    return df.structure[starts[-1] :]


def instruction(df: DockerfileParser, name: str) -> str:
    (value,) = [ins["value"] for ins in final_stage(df) if ins["instruction"] == name]
    return value


def installed_extras(df: DockerfileParser) -> set[str]:
    runs = " ".join(ins["value"] for ins in df.structure if ins["instruction"] == "RUN")
    return {extra for group in re.findall(r'pip install [^&]*"\.\[([a-z,]+)\]"', runs) for extra in group.split(",")}


def trainer_job_for(example: str, **resources: Any) -> dict[str, Any]:
    (doc,) = load_documents(ROOT / "examples" / example)
    data = copy.deepcopy(doc.data)
    data["metadata"]["namespace"] = "default"
    data["spec"].setdefault("resources", {}).update(resources)
    ftj, problems = parse_manifest(data)
    assert ftj is not None, problems
    return builders.trainer_job(ftj, UID, OperatorSettings())


def test_operator_entrypoint_is_what_the_chart_runs() -> None:
    df = parse("operator")
    entrypoint = json.loads(instruction(df, "ENTRYPOINT"))
    (container,) = one(scenario("defaults"), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert entrypoint == container["command"] == ["python", "-m", "kubetune.operator"]


def test_trainer_entrypoint_is_what_the_operator_runs() -> None:
    df = parse("trainer")
    entrypoint = json.loads(instruction(df, "ENTRYPOINT"))
    assert entrypoint == ["python", "-m", "kubetune.trainer"]
    single = trainer_job_for("quickstart.yaml")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert single[:3] == entrypoint
    multi = trainer_job_for("multi-gpu.yaml")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert multi[0] == "torchrun" and multi[multi.index("-m") :][:2] == ["-m", "kubetune.trainer"]
    # torchrun comes with torch: torch must be installed into the venv that PATH finds first.
    venv_bin = df.envs["PATH"].split(":")[0]
    assert venv_bin == "/opt/kubetune/bin"
    runs = " ".join(ins["value"] for ins in df.structure if ins["instruction"] == "RUN")
    assert f'{venv_bin}/pip install "torch==' in runs
    assert any(
        ins["instruction"] == "COPY" and ins["value"].startswith("--from=build /opt/kubetune")
        for ins in final_stage(df)
    )


@pytest.mark.parametrize(
    ("component", "extra", "base"),
    [
        # Pinned by digest, the tag beside it (issue 16): a re-pushed tag cannot change the image.
        # The operator image also runs `kubetune api` (the chart's gateway Deployment).
        ("operator", "operator,gateway", r"^python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}$"),
        ("trainer", "trainer", r"^nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+@sha256:[0-9a-f]{64}$"),
    ],
)
def test_base_user_and_extras(component: str, extra: str, base: str) -> None:
    df = parse(component)
    assert df.parent_images and all(re.match(base, image) for image in df.parent_images), df.parent_images
    user = instruction(df, "USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} must be numeric for runAsNonRoot"
    uid = int(user.split(":")[0])
    assert uid != 0 and uid == builders.UID
    assert installed_extras(df) == set(extra.split(",")) and set(extra.split(",")) <= set(EXTRAS)


def test_operator_uid_is_the_charts() -> None:
    pod = one(scenario("defaults"), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(instruction(parse("operator"), "USER").split(":")[0])


def test_trainer_image_writes_only_where_the_pod_mounts_emptydirs() -> None:
    env = parse("trainer").envs
    job = trainer_job_for("lora.yaml")
    container = job["spec"]["template"]["spec"]["containers"][0]
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for name in ("HOME", "TMPDIR", "HF_HOME", "KUBETUNE_CACHE"):
        assert env[name] == pod_env[name], name
        assert env[name] in mounts, f"{name}={env[name]} is not an emptyDir mount"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # the root filesystem is read-only


# --------------------------------------------------------------------------- .dockerignore


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is out when it or a parent directory matches; the last match wins.
    (fnmatch's `*` also crosses `/`, which is close enough for these patterns; `**/x` also
    matches `x` at the top, as in Docker.)"""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in patterns:
        negate, pattern = raw.startswith("!"), raw.lstrip("!").strip("/")
        candidates = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        if any(fnmatch(prefix, c) for prefix in prefixes for c in candidates):
            result = not negate
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/config",
        "tests/chart/test_render.py",
        "kubetune-output/quickstart/manifest.json",
        "operator/kubetune/operator/__pycache__/handlers.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache",
        "benchmarks/RESULTS.md",
        "charts/kubetune/values.yaml",
        "trainer/kubetune/trainer/methods/.ruff_cache/CACHEDIR.TAG",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert ignored(path, dockerignore())


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = dockerignore()
    copied = {
        src
        for component in ("operator", "trainer")
        for ins in parse(component).structure
        if ins["instruction"] == "COPY" and not ins["value"].startswith("--from")
        for src in shlex.split(ins["value"])[:-1]
    }
    assert copied == {"pyproject.toml", "constraints.txt", "README.md", "api", "operator", "trainer"}
    for path in (
        "pyproject.toml",
        "README.md",
        "api/kubetune/api/spec.py",
        "operator/kubetune/operator/handlers.py",
        "trainer/kubetune/trainer/run.py",
        "api/kubetune/cli.py",
    ):
        assert not ignored(path, patterns), path
