"""Proof against a real kube-apiserver that the CRD does what the README says.

kubectl apply of the CRD and of every example, the printer columns of ``kubectl get``,
``kubectl explain`` showing the models' descriptions, schema validation refusing invalid
manifests at the right field, a status written through the status subresource coming back
unpruned (every field of FineTuneJobStatus), and a watch resumed from a resourceVersion.

The server is kube-apiserver v1.20.2 (or whatever ``KUBEBUILDER_ASSETS`` holds) and the client
is the machine's kubectl (1.32 here). 1.20 has no CEL, so the CRD is installed with every
``x-kubernetes-validations`` stripped (the offline tests in tests/api cover those rules).
"""

from __future__ import annotations

import enum
import http.client
import itertools
import json
import re
import ssl
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api import GROUP, PLURAL, VERSION, FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.manifest import load_yaml as load_manifest_yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tests.api.test_invalid_manifests import CANONICAL, CASES, mutate
from tests.crd_offline import validate as crd_offline_validate
from tests.k8s_harness import ApiServer, _strip_key, api_request, kubectl

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CRD_FILE = REPO / "crds" / f"{PLURAL}.{GROUP}.yaml"
CEL = "x-kubernetes-validations"


# ----------------------------------------------------------------------------------- helpers


def _ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test apiserver's certificate is self-signed
    return ctx


def request(
    api: ApiServer,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any]]:
    """One HTTP call to the apiserver with the admin token; (status code, JSON body)."""
    return api_request(api.url, api.token, method, path, body, content_type)


def ftj_path(namespace: str, name: str = "", sub: str = "") -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def server_minor(api: ApiServer) -> int:
    _, info = request(api, "GET", "/version")
    return int(re.match(r"\d+", info["minor"]).group())  # type: ignore[union-attr]


def get_json(api: ApiServer, *args: str) -> dict[str, Any]:
    return json.loads(kubectl(api.kubeconfig, "get", "-o", "json", *args).stdout)


def create(api: ApiServer, namespace: str, obj: dict[str, Any]) -> None:
    kubectl(api.kubeconfig, "apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def parse_table(text: str) -> list[dict[str, str]]:
    """kubectl's table output → one dict per row, cut at the header's column offsets
    (so empty cells, e.g. PHASE of a job without status, stay in their column)."""
    header, *rows = text.rstrip("\n").split("\n")
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    out = []
    for row in rows:
        cells = [row[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        out.append(dict(zip(names, cells)))
    return out


def manifest_named(name: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The canonical manifest (tests/api/test_invalid_manifests.py), renamed and mutated."""
    obj = mutate(CANONICAL, changes or {})
    obj["metadata"]["name"] = name
    return obj


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / X | None → X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def field_description(model: type[BaseModel], dotted_wire_path: str) -> str:
    """The description of a field given by its wire path, e.g. "method.adaptation"."""
    *parents, leaf = dotted_wire_path.split(".")
    for part in parents:
        info = next(f for n, f in model.model_fields.items() if (f.alias or n) == part)
        model = _unwrap(info.annotation)
    info = next(f for n, f in model.model_fields.items() if (f.alias or n) == leaf)
    assert info.description
    return info.description


def squash(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------- a status with every field set (generic)


def _bounds(info: FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for meta in info.metadata:
        for key in ("ge", "gt", "le", "lt", "max_length", "pattern"):
            value = getattr(meta, key, None)
            if value is not None:
                out[key] = value
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if extra.get("format"):
        out["format"] = extra["format"]
    return out


def _sample(name: str, info: FieldInfo, annotation: Any, variant: int) -> Any:
    """A valid, non-default value for one field; values differ from field to field (a counter)
    and ``variant`` makes list items differ."""
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    b = _bounds(info)
    n = next(_counter)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return [_sample(name, FieldInfo(), item, v) for v in (0, 1)]
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        assert key_type is str, (name, annotation)
        return {f"{name}{k}": _sample(name, FieldInfo(), value_type, v) for v, k in enumerate("AB")}
    if annotation is typing.Any:  # x-kubernetes-preserve-unknown-fields (status.kopf): nested JSON of any shape
        return {"nested": {"list": [1, "two", {"three": 3.5}], "flag": True, "n": n}}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return full_instance(annotation, variant)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        members = list(annotation)
        return members[(n + 1) % len(members)]
    if annotation is bool:
        return not info.get_default(call_default_factory=True)
    if annotation is int:
        lo = b.get("ge", b.get("gt", -1) + 1)
        hi = b.get("le", b.get("lt", 2**62) - 1)
        return min(lo + 2**33 + n, hi)  # > 2^32: int64 survives the round trip
    if annotation is float:
        lo = b.get("ge", b.get("gt", 0.0))
        hi = b.get("le", b.get("lt", lo + 10.0))
        return lo + (hi - lo) * (n % 62 + 1) / 64  # strictly inside the bounds, exact in binary
    if annotation is str:
        if b.get("format") == "date-time":
            return f"2024-05-01T12:{n // 60 % 60:02d}:{n % 60:02d}Z"
        if "pattern" in b:
            for candidate in ("False", "True", "0123456789abcdef" * 4):
                if re.match(b["pattern"], candidate):
                    return candidate
            raise NotImplementedError(f"no sample for {name} matching {b['pattern']!r}: extend _sample")
        slug = name.replace("_", "-")
        value = f"{slug}-{n}" if "uri" not in name else f"s3://kubetune-test/{slug}/{n}"
        return value[: b.get("max_length", len(value))]
    raise NotImplementedError(f"no sample for field {name}: {annotation!r}: extend _sample")


_counter = itertools.count(1)


def full_instance(model: type[BaseModel], variant: int = 0) -> Any:
    """An instance of ``model`` with every field (recursively) set to a non-default value."""
    values = {name: _sample(name, info, info.annotation, variant) for name, info in model.model_fields.items()}
    return model.model_validate(values)


def assert_every_field_set(obj: BaseModel, path: str = "status") -> None:
    for name, info in type(obj).model_fields.items():
        value = getattr(obj, name)
        assert value is not None and value != info.get_default(call_default_factory=True), f"{path}.{name}"
        items = value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]
        assert items, f"{path}.{name} is empty"
        for item in items:
            if isinstance(item, BaseModel):
                assert_every_field_set(item, f"{path}.{name}")


# -------------------------------------------------------------------------------------- tests


def test_apply_crds_and_examples(apiserver: ApiServer, namespace: str, tmp_path: Path) -> None:
    # The CRD exactly as the harness installs it (CEL stripped): applying it again is a no-op.
    stripped = tmp_path / "crds"
    stripped.mkdir()
    crd = yaml.safe_load(CRD_FILE.read_text())
    (stripped / CRD_FILE.name).write_text(yaml.safe_dump(_strip_key(crd, CEL)))
    out = kubectl(apiserver.kubeconfig, "apply", "-f", str(stripped)).stdout
    assert re.search(rf"customresourcedefinition\S*/{re.escape(CRD_FILE.stem)} (unchanged|configured)", out), out

    # The committed file, CEL included.
    if server_minor(apiserver) >= 25:  # CEL and server-side field validation exist
        out = kubectl(apiserver.kubeconfig, "apply", "--dry-run=server", "-f", str(CRD_FILE.parent)).stdout
        assert "(server dry run)" in out
    else:
        # 1.20 has neither CEL nor server-side field validation. kubectl 1.32 then validates
        # client-side against the server's OpenAPI, which does not know x-kubernetes-validations:
        failed = kubectl(apiserver.kubeconfig, "apply", "--dry-run=server", "-f", str(CRD_FILE.parent), check=False)
        assert failed.returncode != 0 and f'unknown field "{CEL}"' in failed.stderr
        # Without client-side validation the server accepts the file, and silently drops the
        # rules (1.20's JSON decoding ignores unknown fields) -- hence the stripped install.
        dry = kubectl(
            apiserver.kubeconfig,
            "apply",
            "--dry-run=server",
            "--validate=false",
            "-o",
            "json",
            "-f",
            str(CRD_FILE.parent),
        )
        assert CEL in json.dumps(crd["spec"]) and CEL not in json.dumps(json.loads(dry.stdout)["spec"])

    # Every example, with the real command. Examples without metadata.namespace go to the test
    # namespace (the kubeconfig's default namespace); namespaces they name must exist.
    kubeconfig = tmp_path / "kubeconfig"
    config = json.loads(Path(apiserver.kubeconfig).read_text())
    config["contexts"][0]["context"]["namespace"] = namespace
    kubeconfig.write_text(json.dumps(config))
    expected: dict[str, set[str]] = {}
    for f in EXAMPLES:
        meta = yaml.safe_load(f.read_text())["metadata"]
        expected.setdefault(meta.get("namespace", namespace), set()).add(meta["name"])
    for ns in expected.keys() - {namespace}:
        kubectl(apiserver.kubeconfig, "create", "namespace", ns, check=False)  # kept: session-wide
    applied = kubectl(kubeconfig, "apply", "-f", str(REPO / "examples"))
    assert len(applied.stdout.strip().splitlines()) == len(EXAMPLES), applied.stdout

    # kubectl get: the printer columns, one row per example.
    table = kubectl(apiserver.kubeconfig, "get", "ftj", "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "METHOD", "MODEL", "PROGRESS", "LOSS", "ETA", "AGE"]
    rows = parse_table(table)
    assert {r["NAME"] for r in rows} == expected[namespace] and len(rows) == len(expected[namespace])
    for ns, names in expected.items():
        got = {r["NAME"] for r in parse_table(kubectl(apiserver.kubeconfig, "get", "ftj", "-n", ns).stdout)}
        assert names <= got
    for f in EXAMPLES:
        doc = load_manifest_yaml(f.read_text())
        if doc["metadata"].get("namespace", namespace) == namespace:
            row = next(r for r in rows if r["NAME"] == doc["metadata"]["name"])
            assert row["METHOD"] == doc["spec"]["method"]["adaptation"]
            assert row["MODEL"] == doc["spec"]["model"]["source"]
            assert row["PHASE"] == row["PROGRESS"] == row["LOSS"] == ""  # no status yet

    # The status columns read the right status fields.
    status = {
        "phase": "Running",
        "progress": {"percent": 42.5, "etaSeconds": 3900, "eta": "1h05m"},
        "jobName": "support-bot-train",
        "reason": "TrainingStarted",
        "metrics": {"trainLoss": 1.25, "evalLoss": 1.5, "baseEvalLoss": 2.25},
        "serving": {"engine": "vllm", "url": "http://sb.ns.svc:8000/v1", "ready": False},
    }
    kubectl(
        apiserver.kubeconfig,
        "patch",
        "ftj",
        "support-bot",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    wide = kubectl(apiserver.kubeconfig, "get", "ftj", "-n", namespace, "-o", "wide").stdout
    assert wide.split("\n")[0].split() == [
        "NAME",
        "PHASE",
        "METHOD",
        "MODEL",
        "PROGRESS",
        "LOSS",
        "ETA",
        "EVAL",
        "BASE",
        "REASON",
        "JOB",
        "SERVING",
        "AGE",
    ]
    row = next(r for r in parse_table(wide) if r["NAME"] == "support-bot")
    assert {
        k: row[k] for k in ("PHASE", "METHOD", "PROGRESS", "LOSS", "ETA", "EVAL", "BASE", "REASON", "JOB", "SERVING")
    } == {
        "PHASE": "Running",
        "METHOD": "lora",
        "PROGRESS": "42.5",
        "LOSS": "1.25",
        "ETA": "1h05m",
        "EVAL": "1.5",
        "BASE": "2.25",
        "REASON": "TrainingStarted",
        "JOB": "support-bot-train",
        "SERVING": "http://sb.ns.svc:8000/v1",
    }


def test_explain(apiserver: ApiServer) -> None:
    # The CRD's OpenAPI is published a moment after it is Established: retry briefly.
    import time

    deadline = time.monotonic() + 30
    while True:
        explain = kubectl(apiserver.kubeconfig, "explain", "finetunejob.spec.method", check=False)
        if explain.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert explain.returncode == 0, explain.stderr
    assert squash(field_description(FineTuneJobSpec, "method.adaptation")) in squash(explain.stdout)
    assert re.search(r"^\s+adaptation\s+<string> -required-", explain.stdout, re.M), explain.stdout

    lr = kubectl(apiserver.kubeconfig, "explain", "finetunejob.spec.hyperparameters.learningRate")
    assert squash(field_description(FineTuneJobSpec, "hyperparameters.learningRate")) in squash(lr.stdout)


@pytest.mark.parametrize("case_id", ["lora-rank-zero", "adaptation-typo"])
def test_invalid_manifest_rejected_by_kubectl_apply(apiserver: ApiServer, namespace: str, case_id: str) -> None:
    _, changes, path = next(c for c in CASES if c[0] == case_id)
    obj = manifest_named(case_id, changes)
    # --validate=false: kubectl's own client-side checks stay out; the server decides.
    run = kubectl(
        apiserver.kubeconfig,
        "apply",
        "--validate=false",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(obj),
        check=False,
    )
    assert run.returncode != 0
    assert f'FineTuneJob "{case_id}" is invalid: {path}: ' in run.stderr, run.stderr
    assert get_json(apiserver, "ftj", "-n", namespace)["items"] == []


def test_server_and_offline_validator_agree(apiserver: ApiServer, namespace: str) -> None:
    """Every invalid fixture: the real server refuses exactly what the offline validator
    refuses with the CRD's OpenAPI schema alone (CEL stripped, unknown fields aside: the server
    prunes those), at the same field path."""
    crd = _strip_key(yaml.safe_load(CRD_FILE.read_text()), CEL)
    no_index = re.compile(r"\[\d+\]")  # 1.20 writes spec.method.objectives.type for ...[0].type
    disagreements = []
    for case_id, changes, _path in CASES:
        obj = manifest_named(case_id, changes)
        offline = {no_index.sub("", e.path) for e in crd_offline_validate(crd, obj) if e.message != "unknown field"}
        code, body = request(apiserver, "POST", ftj_path(namespace) + "?dryRun=All", obj)
        server = {no_index.sub("", c.get("field", "")) for c in body.get("details", {}).get("causes", [])}
        if code == 201:
            server = set()
        elif code != 422:
            pytest.fail(f"{case_id}: unexpected {code}: {body}")
        if offline != server:
            disagreements.append(f"{case_id}: offline {sorted(offline)} server {sorted(server)}")
    assert disagreements == []


def test_status_round_trip(apiserver: ApiServer, namespace: str) -> None:
    """A status with every field of FineTuneJobStatus set survives the status subresource:
    nothing is pruned (a field missing from the CRD's status schema would be)."""
    status = full_instance(FineTuneJobStatus)
    assert_every_field_set(status)
    wire = status.wire()
    condition = wire["conditions"][0]
    assert set(condition) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    assert {"estimatedUSD", "energyKWh"} <= set(wire["cost"]) and wire["metrics"]["objectives"]
    assert len(wire["checkpoints"]) == 2

    # Create: a status sent along is dropped (status subresource enabled).
    create(apiserver, namespace, {**manifest_named("full-status"), "status": wire})
    created = get_json(apiserver, "ftj", "full-status", "-n", namespace)
    assert "status" not in created and created["metadata"]["generation"] == 1

    patched = kubectl(
        apiserver.kubeconfig,
        "patch",
        "ftj",
        "full-status",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": wire}),
        "-o",
        "json",
    )
    assert json.loads(patched.stdout)["status"] == wire
    got = get_json(apiserver, "ftj", "full-status", "-n", namespace)
    assert got["status"] == wire
    assert FineTuneJobStatus.model_validate(got["status"]).wire() == wire
    assert got["metadata"]["generation"] == 1  # a status write does not bump the generation

    # The main endpoint ignores status (and the status endpoint ignores everything else).
    bogus = {"phase": "Failed", "retries": 99, "jobName": "overwritten"}
    code, _ = request(
        apiserver,
        "PATCH",
        ftj_path(namespace, "full-status"),
        {"metadata": {"labels": {"touched": "yes"}}, "status": bogus},
        content_type="application/merge-patch+json",
    )
    assert code == 200
    got = get_json(apiserver, "ftj", "full-status", "-n", namespace)
    assert got["metadata"]["labels"] == {"touched": "yes"} and got["status"] == wire
    code, _ = request(
        apiserver,
        "PATCH",
        ftj_path(namespace, "full-status", "status"),
        {"metadata": {"labels": {"touched": "via-status"}}, "spec": {"suspend": True}},
        content_type="application/merge-patch+json",
    )
    assert code == 200
    got = get_json(apiserver, "ftj", "full-status", "-n", namespace)
    assert got["metadata"]["labels"] == {"touched": "yes"} and "suspend" not in got["spec"]

    # A status field unknown to the schema is pruned: what the round trip above would catch.
    code, body = request(
        apiserver,
        "PATCH",
        ftj_path(namespace, "full-status", "status"),
        {"status": {"notInSchema": 1, "progress": {"alsoNot": 2}}},
        content_type="application/merge-patch+json",
    )
    assert code == 200 and body["status"] == wire


def test_watch_from_resource_version(apiserver: ApiServer, namespace: str) -> None:
    create(apiserver, namespace, manifest_named("a"))
    code, listing = request(apiserver, "GET", ftj_path(namespace))
    assert code == 200 and [o["metadata"]["name"] for o in listing["items"]] == ["a"]
    rv = listing["metadata"]["resourceVersion"]
    create(apiserver, namespace, manifest_named("b"))
    create(apiserver, namespace, manifest_named("c"))
    kubectl(apiserver.kubeconfig, "label", "ftj", "b", "-n", namespace, "step=updated")

    url = urllib.parse.urlsplit(apiserver.url)
    conn = http.client.HTTPSConnection(url.hostname or "127.0.0.1", url.port, context=_ssl(), timeout=10)
    events: list[tuple[str, str]] = []
    try:
        conn.request(
            "GET",
            ftj_path(namespace) + f"?watch=1&resourceVersion={rv}&timeoutSeconds=5",
            headers={"Authorization": f"Bearer {apiserver.token}"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        while len(events) < 3:
            line = resp.readline()
            if not line:
                break
            event = json.loads(line)
            events.append((event["type"], event["object"]["metadata"]["name"]))
        # Nothing else is pending: a further event would arrive at once; wait briefly for one.
        assert conn.sock is not None
        conn.sock.settimeout(0.5)
        try:
            extra = resp.readline()
        except TimeoutError:
            extra = b""
        assert not extra.strip(), extra
    finally:
        conn.close()
    # A, created before the list's resourceVersion, is not replayed.
    assert events == [("ADDED", "b"), ("ADDED", "c"), ("MODIFIED", "b")]
