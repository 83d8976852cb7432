"""The serving objects of spec.serving (issue 20) against the schemas that will judge them.

Golden YAML of each engine's objects (tests/data/serving/golden/, KUBETUNE_UPDATE_GOLDEN=1
rewrites them), each validated against KServe's own CRD schema (vendored under
tests/data/serving/, see its README) with openapi-schema-validator and unknown-field pruning as
the API server does it, or against Kubernetes' schema (kubernetes-validate) for the Deployment
and Service. Then readiness parsing, and the vllmEndpoint registration against a small aiohttp
server answering as vLLM does.
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubetune.api import FineTuneJob, parse_manifest
from kubetune.api.manifest import load_yaml
from kubetune.operator import serving
from kubetune.operator.settings import OperatorSettings

from tests.chart import pss
from tests.crd_offline import _openapi, _prune_nulls, _unknown_fields
from tests.manifests import assert_golden, assert_valid

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "serving"
GOLDEN = DATA / "golden"
EXAMPLES = ROOT / "examples" / "serving"
UID = "5f0c6a52-8a3e-4d2b-9c1e-0d4f3b7a9e21"
SETTINGS = OperatorSettings(trainer_image="ghcr.io/kubetune/trainer:0.1.0")
STATUS = {"phase": "Succeeded", "adapter": {"uri": "s3://models/out/adapter", "mergedUri": "s3://models/out/merged"}}
CRDS = {
    serving.LLMISVC[2]: DATA / "llminferenceservices.serving.kserve.io.v1alpha1.json",
    serving.ISVC[2]: DATA / "inferenceservices.serving.kserve.io.v1beta1.json",
}


def ftj(example: str, model_source: str | None = None, **serving_changes: Any) -> FineTuneJob:
    doc = load_yaml((EXAMPLES / example).read_text())
    doc["metadata"]["namespace"] = "ml"
    if model_source is not None:
        doc["spec"]["model"]["source"] = model_source
    doc["spec"]["serving"].update(serving_changes)
    job, problems = parse_manifest(doc)
    assert job is not None, problems
    return job


def render(case: str) -> list[dict[str, Any]]:
    example, kind = CASES[case]
    return list(serving.plan(ftj(example, MODEL_SOURCES.get(case)), UID, STATUS, SETTINGS, kind).objects)


CASES: dict[str, tuple[str, tuple[str, str, str] | None]] = {
    "kserve-llminferenceservice": ("kserve.yaml", serving.LLMISVC),
    "kserve-inferenceservice": ("kserve.yaml", serving.ISVC),
    "vllm": ("vllm.yaml", None),
    "vllm-merged-dora": ("dora-merged.yaml", None),
    "vllm-s3-base": ("vllm.yaml", None),
}
MODEL_SOURCES = {"vllm-s3-base": "s3://models/base/qwen2.5-1.5b-instruct"}
"""spec.model.source of a case, where it is not its example's."""


def kserve_schema(kind: str) -> dict[str, Any]:
    crd = json.loads(CRDS[kind].read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def kserve_errors(obj: dict[str, Any]) -> list[str]:
    schema = kserve_schema(obj["kind"])
    data = _prune_nulls(schema, obj)
    found: list[Any] = []
    _unknown_fields(schema, data, "", found)
    found += _openapi(schema, data)
    if obj["kind"] == serving.LLMISVC[2]:  # adapters are schemaless upstream (a recursive type): each is a model spec
        model = schema["properties"]["spec"]["properties"]["model"]
        for adapter in (obj["spec"]["model"].get("lora") or {}).get("adapters") or []:
            _unknown_fields(model, adapter, ".spec.model.lora.adapters[]", found)
            found += _openapi(model, adapter)
    return [str(e) for e in found]


def check_schema(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith(serving.GROUP):
        assert kserve_errors(obj) == []
        return
    assert_valid(obj)


# ------------------------------------------------------------------------------ golden


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    assert_golden(render(case), GOLDEN / f"{case}.yaml", "tests/operator/test_serving.py")


def test_no_stale_golden_files() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.yaml")) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_objects_pass_the_upstream_schema(case: str) -> None:
    for obj in render(case):
        check_schema(obj)


def test_the_schema_check_catches_a_misplaced_field() -> None:
    (isvc,) = render("kserve-inferenceservice")
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["model"]["loraModules"] = ["x"]  # no such field upstream
    broken["spec"]["predictor"]["minReplicas"] = "one"
    errors = kserve_errors(broken)
    assert any("loraModules" in e for e in errors) and any("minReplicas" in e for e in errors)


# ------------------------------------------------------------------------------ what is built


def test_llminferenceservice_serves_the_adapter_on_the_base() -> None:
    (obj,) = render("kserve-llminferenceservice")
    model = obj["spec"]["model"]
    assert model["uri"] == "s3://models/mistral-7b-v0.1"  # spec.serving.kserve.baseModelUri
    assert model["lora"]["adapters"] == [{"name": "support-bot", "uri": "s3://models/out/adapter"}]
    assert obj["spec"]["template"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    ref = obj["metadata"]["ownerReferences"][0]
    assert ref["uid"] == UID and ref["controller"] is True and ref["blockOwnerDeletion"] is True


def test_inferenceservice_puts_base_and_adapter_under_one_parent() -> None:
    (obj,) = render("kserve-inferenceservice")
    predictor = obj["spec"]["predictor"]
    paths = [s["mountPath"] for s in predictor["storageUris"]]
    assert all(p.startswith(serving.ISVC_ROOT + "/") for p in paths)
    assert "storageUri" not in predictor["model"]  # KServe refuses storageUri together with storageUris
    assert "--enable-lora" in predictor["model"]["args"]
    assert f"support-bot={paths[1]}" in predictor["model"]["args"]


def test_hf_base_uri_is_spelled_as_kserve_reads_it() -> None:
    job = ftj("kserve.yaml", kserve={"gpus": 0})
    assert serving.base_uri(job) == "hf://mistralai/Mistral-7B-v0.1"
    assert serving.kserve_uri("hf://org/name@abc123", "f") == "hf://org/name:abc123"
    with pytest.raises(serving.ServingError, match="spec.serving.kserve.baseModelUri"):
        serving.kserve_uri("file:///models/base", "spec.model.source")
    with pytest.raises(serving.ServingError, match="spec.output.uri"):
        serving.kserve_uri("file:///out/adapter", "status.adapter.uri")


def test_vllm_deployment_fetches_then_serves_under_restricted_pss() -> None:
    deployment, service = render("vllm")
    pod = deployment["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]  # an hf:// base: vLLM pulls it itself
    assert fetch["image"] == SETTINGS.trainer_image
    assert fetch["command"] == [
        "python",
        "-m",
        "kubetune.trainer",
        "fetch",
        "--uri",
        "s3://models/out/adapter",
        "--dest",
        "/models/support-bot-vllm",
    ]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in fetch["env"] if "valueFrom" in e} == {"s3-credentials"}
    (server,) = pod["containers"]
    assert server["image"] == SETTINGS.serving_vllm_image
    command = server["command"]
    assert command[:3] == ["vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct"]
    assert "--lora-modules" in command and "support-bot-vllm=/models/support-bot-vllm" in command
    assert command[command.index("--max-lora-rank") + 1] == "16" and command[-1] == "--max-model-len=8192"
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert pod["automountServiceAccountToken"] is False
    assert "ownerReferences" not in deployment["metadata"]  # retain: true
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert serving.service_url(ftj("vllm.yaml")) == "http://support-bot-vllm-serve.ml.svc:8000/v1"


def test_merged_adaptations_serve_the_merged_model() -> None:
    deployment, _service = render("vllm-merged-dora")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:5] == ["vllm", "serve", "/models/support-bot-dora", "--served-model-name", "support-bot-dora"]
    assert "--enable-lora" not in command
    fetch = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert fetch["command"][-4:] == ["--uri", "s3://models/out/merged", "--dest", "/models/support-bot-dora"]
    assert len(deployment["spec"]["template"]["spec"]["initContainers"]) == 1  # a merged model needs no base
    assert serving.initial_status(ftj("dora-merged.yaml"), "Deployment")["merged"] is True


def test_vllm_pods_pass_the_restricted_profile() -> None:
    for case in ("vllm", "vllm-merged-dora", "vllm-s3-base"):
        deployment = render(case)[0]
        template = deployment["spec"]["template"]
        problems = pss.restricted_violations(template)
        assert not problems, problems


def test_nothing_to_serve_is_a_clear_error() -> None:
    with pytest.raises(serving.ServingError, match="status.adapter.mergedUri"):
        serving.plan(ftj("dora-merged.yaml"), UID, {"adapter": {"uri": "s3://x/adapter"}}, SETTINGS)
    with pytest.raises(serving.ServingError, match="install KServe"):
        serving.plan(ftj("kserve.yaml"), UID, STATUS, SETTINGS, None)


def test_kserve_kind_from_discovery() -> None:
    llm = {"resources": [{"name": "llminferenceservices"}, {"name": "llminferenceservices/status"}]}
    isvc = {"resources": [{"name": "inferenceservices"}]}
    assert serving.kserve_kind({"v1alpha1": llm, "v1beta1": isvc}) == serving.LLMISVC
    assert (
        serving.kserve_kind({"v1alpha1": {"resources": [{"name": "inferencegraphs"}]}, "v1beta1": isvc}) == serving.ISVC
    )
    assert serving.kserve_kind({"v1alpha1": None, "v1beta1": None}) is None


# ------------------------------------------------------------------------------ readiness


def test_kserve_readiness_reads_the_ready_condition() -> None:
    obj = {
        "kind": "LLMInferenceService",
        "metadata": {"name": "x"},
        "status": {
            "conditions": [
                {"type": "PresetsCombined", "status": "True"},
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "MinimumReplicasUnavailable",
                    "message": "0/1 replicas ready",
                },
            ]
        },
    }
    assert serving.readiness(obj) == (False, "0/1 replicas ready")
    obj["status"]["conditions"][1] = {"type": "Ready", "status": "True"}
    obj["status"]["url"] = "http://x.ml.example.com"
    assert serving.readiness(obj) == (True, None)
    assert serving.url_of(obj) == "http://x.ml.example.com/v1"
    isvc = {"kind": "InferenceService", "status": {"url": "http://y.ml.example.com/"}}
    assert serving.url_of(isvc) == "http://y.ml.example.com/openai/v1"
    assert serving.readiness({"kind": "InferenceService", "metadata": {"name": "y"}, "status": {}}) == (
        False,
        "InferenceService y is not Ready yet",
    )
    assert serving.readiness(None)[0] is False


def test_deployment_readiness_counts_available_replicas() -> None:
    obj = {
        "kind": "Deployment",
        "spec": {"replicas": 2},
        "status": {
            "availableReplicas": 1,
            "conditions": [
                {"type": "Available", "status": "False", "message": "Deployment does not have minimum availability."}
            ],
        },
    }
    ready, why = serving.readiness(obj)
    assert not ready and why.startswith("1 of 2 vLLM replicas available: Deployment does not have minimum")
    obj["status"] = {"availableReplicas": 2, "conditions": [{"type": "Available", "status": "True"}]}
    assert serving.readiness(obj) == (True, None)
    assert serving.readiness({"kind": "Deployment", "spec": {"replicas": 0}, "status": {}})[1].startswith(
        "spec.serving.vllm.replicas is 0"
    )


# ------------------------------------------------------------------------------ vllmEndpoint


def test_load_request_uses_adapter_path_or_the_adapter_uri() -> None:
    url, body = serving.load_request(ftj("vllm-endpoint.yaml"), STATUS)
    assert url == "http://vllm.serving.svc:8000/v1/load_lora_adapter"
    assert body == {"lora_name": "support-bot-endpoint", "lora_path": "/models/adapters/support-bot/adapter"}
    job = ftj("vllm-endpoint.yaml")
    job.spec.serving.vllm_endpoint.adapter_path = None  # type: ignore[union-attr]
    assert serving.load_request(job, STATUS)[1]["lora_path"] == "s3://models/out/adapter"


@pytest.fixture
async def vllm_server() -> Any:
    """A stand-in for vLLM's load_lora_adapter: answers as vLLM 0.11 does (plain-text 200, JSON errors)."""
    seen: list[tuple[dict[str, Any], str | None]] = []

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((body, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != "Bearer sekret":
            return web.json_response({"error": "Unauthorized"}, status=401)
        if body["lora_name"] == "loaded":
            return web.json_response(
                {
                    "error": {
                        "message": "The lora adapter 'loaded' has already been loaded.",
                        "type": "InvalidUserInput",
                        "code": 400,
                    }
                },
                status=400,
            )
        if body["lora_name"] == "bad":
            return web.json_response(
                {"error": {"message": "No adapter found for /nope", "type": "NotFoundError", "code": 400}}, status=400
            )
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    app = web.Application()
    app.router.add_post("/v1/load_lora_adapter", load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_register_adapter_outcomes(vllm_server: Any) -> None:
    base, seen = vllm_server
    url = base + "/v1/load_lora_adapter"
    assert await serving.register_adapter(url, {"lora_name": "m", "lora_path": "/a"}, "sekret") == (True, None)
    assert seen[-1] == ({"lora_name": "m", "lora_path": "/a"}, "Bearer sekret")
    assert await serving.register_adapter(url, {"lora_name": "loaded", "lora_path": "/a"}, "sekret") == (True, None)
    ok, why = await serving.register_adapter(url, {"lora_name": "bad", "lora_path": "/nope"}, "sekret")
    assert not ok and "No adapter found for /nope" in why and "spec.serving.vllmEndpoint.adapterPath" in why
    ok, why = await serving.register_adapter(url, {"lora_name": "m", "lora_path": "/a"}, None)
    assert not ok and "HTTP 401" in why and "spec.serving.vllmEndpoint.apiKeySecret" in why


async def test_register_adapter_connection_refused_is_retriable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(serving.EndpointUnreachable, match="no answer"):
        await serving.register_adapter(
            f"http://127.0.0.1:{port}/v1/load_lora_adapter", {"lora_name": "m", "lora_path": "/a"}, None
        )


def test_a_result_on_a_pvc_is_copied_from_the_claim_mounted_read_only() -> None:
    job = ftj("vllm.yaml")
    deployment = serving.vllm_deployment(job, UID, {"adapter": {"uri": "pvc://models/adapters/run1/adapter"}}, SETTINGS)
    check_schema(deployment)
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    fetch = pod["initContainers"][0]
    assert fetch["command"][-4:] == [
        "--uri",
        "pvc://models/adapters/run1/adapter",
        "--dest",
        "/models/support-bot-vllm",
    ]
    assert {"name": "KUBETUNE_PVC_ROOT", "value": "/mnt/pvc"} in fetch["env"]  # where the trainer reads pvc:// from
    assert {"name": "output", "mountPath": "/mnt/pvc/models", "readOnly": True} in fetch["volumeMounts"]
    with pytest.raises(serving.ServingError, match="spec.output.uri"):
        serving.vllm_deployment(job, UID, {"adapter": {"uri": "file:///tmp/out/adapter"}}, SETTINGS)


def test_a_base_not_on_the_hub_is_fetched_by_a_second_init_container() -> None:
    deployment, _service = render("vllm-s3-base")
    pod = deployment["spec"]["template"]["spec"]
    fetch, base = pod["initContainers"]
    assert fetch["command"][-4:] == ["--uri", "s3://models/out/adapter", "--dest", "/models/support-bot-vllm"]
    assert base["name"] == "fetch-base" and base["image"] == SETTINGS.trainer_image
    assert base["command"] == [
        "python",
        "-m",
        "kubetune.trainer",
        "fetch",
        "--model",
        "s3://models/base/qwen2.5-1.5b-instruct",
        "--dest",
        "/models/base",
    ]
    assert base["env"] == fetch["env"] and base["securityContext"] == fetch["securityContext"]
    command = pod["containers"][0]["command"]
    assert command[:5] == ["vllm", "serve", "/models/base", "--served-model-name", "qwen2.5-1.5b-instruct"]
    assert "support-bot-vllm=/models/support-bot-vllm" in command


def test_a_base_on_another_pvc_is_mounted_for_the_base_fetch_only() -> None:
    job = ftj("vllm.yaml", "pvc://bases/qwen")
    deployment = serving.vllm_deployment(job, UID, {"adapter": {"uri": "pvc://models/run1/adapter"}}, SETTINGS)
    check_schema(deployment)
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "bases", "readOnly": True}} in pod["volumes"]
    fetch, base = pod["initContainers"]
    assert base["command"][-4:] == ["--model", "pvc://bases/qwen", "--dest", "/models/base"]
    assert {"name": "model", "mountPath": "/mnt/pvc/bases", "readOnly": True} in base["volumeMounts"]
    assert all(m["name"] != "model" for m in fetch["volumeMounts"])
    # the same claim for both: one volume
    same = serving.vllm_deployment(
        ftj("vllm.yaml", "pvc://models/bases/qwen"), UID, {"adapter": {"uri": "pvc://models/run1/adapter"}}, SETTINGS
    )
    assert [v["name"] for v in same["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v] == [
        "output"
    ]
    assert not pss.restricted_violations(same["spec"]["template"])


@pytest.mark.parametrize(
    "source, says",
    [
        ("builtin://tiny-llama", "vLLM does not serve"),
        ("/models/qwen", "a path on the trainer's disk"),
        ("file:///models/qwen", "a path on the trainer's disk"),
    ],
)
def test_a_base_no_serving_pod_can_read_is_refused(source: str, says: str) -> None:
    with pytest.raises(serving.ServingError, match=f"spec.model.source is .*{says}"):
        serving.vllm_deployment(ftj("vllm.yaml", source), UID, STATUS, SETTINGS)


def test_a_served_name_that_clashes_with_the_base_directory_is_refused() -> None:
    with pytest.raises(serving.ServingError, match="spec.serving.modelName"):
        serving.vllm_deployment(ftj("vllm.yaml", "s3://models/base", modelName="base"), UID, STATUS, SETTINGS)
