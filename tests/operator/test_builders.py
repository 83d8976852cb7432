"""Golden tests of the operator's child builders (DESIGN style 2; RELIABILITY O4, O10, O13).

Each golden case renders the children of an example manifest with a fixed owner uid and a fixed
`OperatorSettings`, and compares them with `tests/data/golden/<case>.yaml`. After an intended
change to a builder, rewrite the golden files and review their diff:

    KUBETUNE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/operator/test_builders.py -p no:cacheprovider

Every built-in object (Job, Service) must also pass the Kubernetes 1.30 OpenAPI schema in
strict mode (kubernetes-validate); the Volcano PodGroup, a CRD, is checked structurally. The
remaining tests pin the promises the goldens alone would not explain: child names (O13), the
pod failure policy (O4), credentials only through secretKeyRef (O10), the spec round trip and
the restricted Pod Security profile.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api import FineTuneJob, parse_manifest
from kubetune.api.contract import PERMANENT_EXIT_CODE
from kubetune.api.manifest import load_documents
from kubetune.operator import builders, names, reconcile
from kubetune.operator.builders import (
    CREDENTIAL_KEYS,
    headless_service,
    pod_resources,
    podgroup,
    trainer_job,
    validation_job,
)
from kubetune.operator.names import child_name, label_value
from kubetune.operator.settings import OperatorSettings

from tests.crd_offline import validate as crd_validate
from tests.manifests import assert_golden, assert_valid

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
UID = "5f0c6a52-8a3e-4d2b-9c1e-0d4f3b7a9e21"
SETTINGS = OperatorSettings(trainer_image="ghcr.io/kubetune/trainer:0.1.0")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Builder = Callable[[FineTuneJob, str, OperatorSettings], dict[str, Any]]
CASES: dict[str, tuple[str, list[Builder]]] = {
    "lora-train": ("lora.yaml", [trainer_job]),
    "lora-validate": ("lora.yaml", [validation_job]),
    "multi-gpu-train": ("multi-gpu.yaml", [trainer_job]),
    "multi-node-volcano": ("multi-node-volcano.yaml", [trainer_job, headless_service, podgroup]),
    "queued-kueue-train": ("queued-kueue.yaml", [trainer_job]),
    "pod-overrides-train": ("pod-overrides.yaml", [trainer_job]),
    "pod-overrides-validate": ("pod-overrides.yaml", [validation_job]),
}
# Cases that render their example with more in it: the trainer golden of pod-overrides shows every
# kind of volume and a multi-node Job (kubetune's rendezvous variables before the user's).
EXTRA_VOLUMES = [
    {"name": "client-cert", "secret": {"secretName": "s3-client-cert", "defaultMode": 0o440}},
    {"name": "compile-cache", "emptyDir": {"sizeLimit": "20Gi"}},
    {"name": "shared-datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
]
CASE_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "pod-overrides-train": lambda spec: (
        spec["podOverrides"]["volumes"].extend(EXTRA_VOLUMES),
        spec["podOverrides"]["volumeMounts"].extend(
            [
                {"name": "client-cert", "mountPath": "/etc/ssl/client", "readOnly": True},
                {"name": "compile-cache", "mountPath": "/var/cache/compile"},
                {"name": "shared-datasets", "mountPath": "/datasets", "readOnly": True, "subPath": "support"},
            ]
        ),
        spec.setdefault("resources", {}).update(nodes=2),
    ),
}


def manifest(example: str, **spec_changes: Any) -> dict[str, Any]:
    """An example as a dict, in namespace `default` unless it names one."""
    (doc,) = load_documents(EXAMPLES / example)
    data = copy.deepcopy(doc.data)
    data["metadata"].setdefault("namespace", "default")
    data["spec"].update(spec_changes)
    return data


def parse(data: dict[str, Any]) -> FineTuneJob:
    ftj, problems = parse_manifest(data)
    assert ftj is not None, problems
    return ftj


def render(case: str) -> list[dict[str, Any]]:
    example, build = CASES[case]
    data = manifest(example)
    CASE_CHANGES.get(case, lambda spec: None)(data["spec"])
    ftj = parse(data)
    return [b(ftj, UID, SETTINGS) for b in build]


def all_rendered() -> Iterator[dict[str, Any]]:
    for case in CASES:
        yield from render(case)


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in all_rendered():
        if obj["kind"] == "Job":
            yield obj["metadata"]["name"], obj["spec"]["template"]


def check_schema(obj: dict[str, Any]) -> None:
    if obj["kind"] == "PodGroup":
        assert obj["apiVersion"] == "scheduling.volcano.sh/v1beta1"
        assert isinstance(obj["spec"]["minMember"], int) and obj["spec"]["minMember"] >= 1
        assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
        return
    assert_valid(obj)


# ------------------------------------------------------------------------------ golden


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    assert_golden(render(case), GOLDEN / f"{case}.yaml", "tests/operator/test_builders.py")


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_objects_pass_the_kubernetes_schema(case: str) -> None:
    for obj in render(case):
        check_schema(obj)


def test_builders_are_deterministic_and_do_not_share_state() -> None:
    first = list(all_rendered())
    first[0]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    assert list(all_rendered())[1:] == first[1:]
    assert next(all_rendered())["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


# ------------------------------------------------------------------------------ names (O13)


def test_o13_long_names_are_short_stable_distinct_labels() -> None:
    prefix = "a" * 50
    a = prefix + "-" + "x" * 202
    b = prefix + "-" + "y" * 202
    dotted = prefix + "." + "x" * 202
    assert len(a) == len(b) == len(dotted) == 253
    for suffix in ("train", "validate"):
        names = [child_name(n, suffix) for n in (a, b, dotted)]
        assert len(set(names)) == 3
        assert names == [child_name(n, suffix) for n in (a, b, dotted)]
        for name in names:
            assert len(name) <= 63 and DNS1035.match(name), name
            assert len(f"{name}-511") <= 63  # Indexed Job hostnames <job>-<index>
    assert parse({**manifest("lora.yaml"), "metadata": {"name": a, "namespace": "default"}})
    assert len(label_value(a)) <= 63 and label_value(a) != label_value(b)


def test_short_names_stay_readable_and_odd_ones_become_valid_labels() -> None:
    assert child_name("support-bot", "train") == "support-bot-train"
    assert child_name("support-bot", "validate") == "support-bot-validate"
    for odd in ("8b-llama", "team.a.bot", "team-a-bot"):
        assert DNS1035.match(child_name(odd, "train"))
    # "team.a.bot" is not renamed into "team-a-bot"'s child.
    assert child_name("team.a.bot", "train") != child_name("team-a-bot", "train")


# -------------------------------------------------------------------------- job contract (O4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_o4_failure_policy_retries_and_deadline(case: str) -> None:
    example, _ = CASES[case]
    ftj = parse(manifest(example))
    for job in (o for o in render(case) if o["kind"] == "Job"):
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        fail, ignore = spec["podFailurePolicy"]["rules"]
        assert fail["action"] == "FailJob"
        assert fail["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [PERMANENT_EXIT_CODE]}
        assert spec["template"]["spec"]["containers"][0]["name"] == "trainer"
        assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        if job["metadata"]["labels"]["kubetune.io/role"] == "train":
            assert spec["backoffLimit"] == ftj.spec.max_retries
            assert spec.get("activeDeadlineSeconds") == ftj.spec.active_deadline_seconds
        else:
            assert spec["backoffLimit"] == 0
            assert spec["activeDeadlineSeconds"] == SETTINGS.validation_deadline_seconds
        assert job["metadata"]["ownerReferences"] == [builders.owner_reference(ftj, UID)]


def test_spec_configmap_parses_back_into_the_same_job() -> None:
    """The pods read the spec from an immutable ConfigMap named after the frozen spec's digest,
    which the pod template carries: an edit of a frozen field is a new ConfigMap, a change of
    suspend or scheduling is not."""
    for example in ("lora.yaml", "multi-node-volcano.yaml", "quickstart.yaml", "distillation.yaml"):
        ftj = parse(manifest(example))
        cm = builders.spec_configmap(ftj, UID)
        check_schema(cm)
        assert cm["immutable"] is True and cm["metadata"]["ownerReferences"] == [builders.owner_reference(ftj, UID)]
        for job in (trainer_job(ftj, UID, SETTINGS), validation_job(ftj, UID, SETTINGS)):
            template = job["spec"]["template"]
            assert template["metadata"]["annotations"]["kubetune.io/spec-sha256"] == builders.spec_digest(ftj)
            (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "spec"]
            assert volume["configMap"]["name"] == cm["metadata"]["name"]
            back = parse(json.loads(cm["data"][volume["configMap"]["items"][0]["key"]]))
            assert back.spec == ftj.spec
            assert (back.metadata.name, back.metadata.namespace, back.metadata.uid) == (
                ftj.metadata.name,
                ftj.metadata.namespace,
                UID,
            )
            container = job["spec"]["template"]["spec"]["containers"][0]
            assert "/etc/kubetune/spec.json" in container["command"]


# ------------------------------------------------------------------------ credentials (O10)


def walk(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


def test_o10_credentials_only_through_secret_key_refs(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "CANARY-not-a-real-secret-7d41"
    for key in CREDENTIAL_KEYS:
        monkeypatch.setenv(key, canary)
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", canary)
    ftj = parse(manifest("multi-node-volcano.yaml"))
    objs = [b(ftj, UID, SETTINGS) for b in (trainer_job, validation_job, headless_service, podgroup)]
    assert canary not in json.dumps(objs)
    assert "envFrom" not in {k for k, _ in walk(objs)}
    for template in (o["spec"]["template"] for o in objs if o["kind"] == "Job"):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for key in CREDENTIAL_KEYS:
            assert env[key] == {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": "gcs-writer", "key": key, "optional": True}},
            }
    lora = trainer_job(parse(manifest("lora.yaml")), UID, SETTINGS)
    assert "secretKeyRef" not in json.dumps(lora)


# --------------------------------------------------------------------- pod security (PSS)

RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.mark.parametrize(("name", "template"), list(pod_templates()), ids=[n for n, _ in pod_templates()])
def test_every_pod_template_meets_restricted_pod_security(name: str, template: dict[str, Any]) -> None:
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert not sc.get("privileged")
        assert container["terminationMessagePolicy"] == "File"
        assert not any("hostPort" in p for p in container.get("ports", []))


# ------------------------------------------------------------------ shapes and precedence


def test_multi_node_rendezvous_points_at_index_zero_of_the_service() -> None:
    ftj = parse(manifest("multi-node-volcano.yaml"))
    job, svc, group = (b(ftj, UID, SETTINGS) for b in (trainer_job, headless_service, podgroup))
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    name = job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{svc['metadata']['name']}"
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(
        "['batch.kubernetes.io/job-completion-index']"
    )
    assert (
        job["spec"]["template"]["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == group["metadata"]["name"]
    )
    assert group["spec"]["minMember"] == 2 and group["spec"]["minResources"] == {"nvidia.com/gpu": "16"}


@pytest.mark.parametrize("kueue", [True, False])
def test_queue_name_with_volcano_goes_to_kueue_unless_kueue_is_off(kueue: bool) -> None:
    settings = OperatorSettings(kueue=kueue)
    data = manifest("multi-node-volcano.yaml")
    data["spec"]["scheduling"]["queueName"] = "research"
    ftj = parse(data)
    job, group = trainer_job(ftj, UID, settings), podgroup(ftj, UID, settings)
    assert (job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == "research") is kueue
    assert job["spec"]["suspend"] is kueue
    assert group["spec"].get("queue") == (None if kueue else "research")


def test_suspend_and_cpu_only_and_pvc_sources() -> None:
    data = manifest("quickstart.yaml", suspend=True)
    data["spec"]["model"] = {"source": "pvc://models/tiny"}
    data["spec"]["output"] = {"uri": "pvc://outputs/quickstart"}
    ftj = parse(data)
    job = trainer_job(ftj, UID, SETTINGS)
    check_schema(job)
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["suspend"] is True
    assert pod["containers"][0]["command"][:2] == ["python", "-m"]
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
    assert "dshm" not in {v["name"] for v in pod["volumes"]}
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"models": True, "outputs": False}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/pvc/models", "/mnt/pvc/outputs"} <= mounts
    validate = validation_job(ftj, UID, SETTINGS)
    assert all(
        v["persistentVolumeClaim"]["readOnly"]
        for v in validate["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    )


def test_settings_from_env_reads_kubetune_variables() -> None:
    settings = OperatorSettings.from_env(
        {
            "KUBETUNE_TRAINER_IMAGE": "registry.local/trainer@sha256:abc",
            "KUBETUNE_GPU_PRICE_PER_HOUR_USD": "3.5",
            "KUBETUNE_KUEUE": "false",
            "KUBETUNE_NAMESPACES": "team-a, team-b",
            "KUBETUNE_ALLOWED_OUTPUT_PREFIX": "",
            "UNRELATED": "x",
        }
    )
    assert settings.trainer_image == "registry.local/trainer@sha256:abc"
    assert settings.gpu_price_per_hour_usd == 3.5 and settings.kueue is False
    assert settings.namespaces == ("team-a", "team-b") and settings.allowed_output_prefix is None
    assert OperatorSettings.from_env({}) == OperatorSettings()
    with pytest.raises(ValueError, match="KUBETUNE_PEERING"):
        OperatorSettings.from_env({"KUBETUNE_PEERING": "maybe"})


def test_cpu_only_jobs_fit_a_small_node_and_builtin_models_are_sized() -> None:
    """The quickstart (a 107k-parameter CPU job) used to ask for 4 CPUs and 24 GiB: no scheduler
    on a small node would place it. A CPU-only job asks for 1 CPU and memory from its size."""
    resources = pod_resources(parse(manifest("quickstart.yaml")))
    assert resources["requests"] == {"cpu": "1", "memory": "2Gi"} and resources["limits"] == {"memory": "2Gi"}
    gpu = pod_resources(parse(manifest("lora.yaml")))
    assert gpu["requests"]["cpu"] == "4" and gpu["requests"]["nvidia.com/gpu"] == "1"
    unknown = parse(manifest("quickstart.yaml"))
    unknown.spec.model.source = "s3://models/custom"
    assert pod_resources(unknown)["requests"]["memory"] == "20Gi"  # unknown size: 16 GiB + the 4 GiB base


def test_host_network_setting() -> None:
    ftj = parse(manifest("quickstart.yaml"))
    assert "hostNetwork" not in trainer_job(ftj, UID, SETTINGS)["spec"]["template"]["spec"]
    on = OperatorSettings(host_network=True)
    for job in (trainer_job(ftj, UID, on), validation_job(ftj, UID, on)):
        pod = job["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        check_schema(job)
    assert OperatorSettings.from_env(
        {"KUBETUNE_HOST_NETWORK": "true", "KUBETUNE_HEALTH_PORT": "18080"}
    ) == OperatorSettings(host_network=True, health_port=18080)


# ------------------------------------------------------------------ spec.podOverrides


def test_pod_overrides_reach_the_trainer_and_the_validation_pods() -> None:
    """Pull secrets, ServiceAccount and RuntimeClass let the validation pod start at all; labels,
    annotations, variables and volumes are the same on both. kubetune's own keys stay and come
    first, the pods still get no API token."""
    ftj = parse(manifest("pod-overrides.yaml"))
    overrides = ftj.spec.pod_overrides
    assert overrides is not None
    for job in (trainer_job(ftj, UID, SETTINGS), validation_job(ftj, UID, SETTINGS)):
        check_schema(job)
        meta, pod = job["spec"]["template"]["metadata"], job["spec"]["template"]["spec"]
        role = job["metadata"]["labels"]["kubetune.io/role"]
        assert list(meta["labels"].items())[:5] == list(builders.labels(ftj, role).items())
        assert meta["labels"] | overrides.labels == meta["labels"]
        assert next(iter(meta["annotations"])) == "kubetune.io/spec-sha256"
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
        assert pod["serviceAccountName"] == "s3-reader-writer" and pod["automountServiceAccountToken"] is False
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["imagePullSecrets"] == [{"name": "registry-example-com"}]
        env = pod["containers"][0]["env"]
        assert [e["name"] for e in env[-len(overrides.env) :]] == [e.name for e in overrides.env]
        assert env[0]["name"] == "KUBETUNE_TERMINATION_PATH"
        assert pod["volumes"][-1] == {
            "name": "company-ca",
            "configMap": {"name": "company-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        }
        assert pod["containers"][0]["volumeMounts"][-1] == {
            "name": "company-ca",
            "mountPath": "/etc/ssl/company",
            "readOnly": True,
        }
    plain = trainer_job(parse(manifest("lora.yaml")), UID, SETTINGS)["spec"]["template"]["spec"]
    assert plain["serviceAccountName"] == SETTINGS.trainer_service_account
    assert not {"runtimeClassName", "imagePullSecrets"} & set(plain)


def test_every_name_kubetune_uses_is_refused_in_pod_overrides() -> None:
    """kubetune.api.pod lists what the builders use (the API cannot import the operator); each
    variable, volume, mount path and pod key the builders emit must be refused, by the models and
    by the CRD, or a user could shadow it."""
    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "finetunejobs.kubetune.io.yaml").read_text())
    settings = OperatorSettings(allowed_output_prefix="s3://models/")
    env, volumes, paths, keys = (
        set(),
        set(),
        set(),
        {
            "batch.kubernetes.io/job-name",
            "batch.kubernetes.io/controller-uid",
            "job-name",
            "controller-uid",
            "batch.kubernetes.io/job-completion-index",
        },
    )
    pvc = manifest("multi-node-volcano.yaml", model={"source": "pvc://models/base"})
    for ftj in (parse(pvc), parse(manifest("lora.yaml"))):
        for job in (trainer_job(ftj, UID, settings), validation_job(ftj, UID, settings)):
            template = job["spec"]["template"]
            keys |= set(template["metadata"]["labels"]) | set(template["metadata"]["annotations"])
            env |= {e["name"] for e in template["spec"]["containers"][0]["env"]}
            volumes |= {v["name"] for v in template["spec"]["volumes"]}
            paths |= {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
    paths.add(builders.DEFAULT_TERMINATION_PATH)
    assert (
        {"NODE_RANK", "KUBETUNE_ALLOWED_OUTPUT_PREFIX", "HF_TOKEN"} <= env
        and "pvc-0" in volumes
        and "/mnt/pvc/models" in paths
    )
    tries = (
        [{"env": [{"name": n, "value": "x"}]} for n in env]
        + [{"volumes": [{"name": n, "emptyDir": {}}]} for n in volumes]
        + [{"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": p}]} for p in paths]
        + [{"labels": {k: "x"}} for k in keys]
        + [{"annotations": {k: "x"}} for k in keys]
    )
    for overrides in tries:
        data = manifest("multi-node-volcano.yaml", podOverrides=overrides)  # it has a credentialsSecret
        job, _ = parse_manifest(data)
        assert job is None, overrides
        assert crd_validate(crd, data), overrides


def test_pod_overrides_are_not_searched_for_pvc_uris() -> None:
    data = manifest(
        "lora.yaml", podOverrides={"env": [{"name": "NOTE", "value": "pvc://scratch/x"}], "labels": {"source": "pvc"}}
    )
    pod = trainer_job(parse(data), UID, SETTINGS)["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_credentials_come_from_the_secret_or_from_pod_overrides_not_both() -> None:
    """Without credentialsSecret, a credential variable may come from any Secret key."""
    hf_token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}
    job = trainer_job(parse(manifest("lora.yaml", podOverrides={"env": [hf_token]})), UID, SETTINGS)
    assert job["spec"]["template"]["spec"]["containers"][0]["env"][-1] == hf_token
    ftj, problems = parse_manifest(manifest("multi-node-volcano.yaml", podOverrides={"env": [hf_token]}))
    assert ftj is None and [p.path for p in problems] == ["spec.podOverrides"]
    assert "HF_TOKEN" in problems[0].message


def test_spec_digest_ignores_what_may_change_after_start() -> None:
    ftj = parse(manifest("lora.yaml"))
    suspended = parse(
        manifest("lora.yaml") | {"spec": {**manifest("lora.yaml")["spec"], "suspend": True, "cancel": True}}
    )
    edited = manifest("lora.yaml")
    edited["spec"]["hyperparameters"] = {**edited["spec"].get("hyperparameters", {}), "epochs": 7}
    assert builders.spec_configmap_name(suspended) == builders.spec_configmap_name(ftj)
    assert builders.spec_configmap_name(parse(edited)) != builders.spec_configmap_name(ftj)
    # the digest builders write is the one reconcile compares (one name, kubetune.operator.names)
    annotated = builders.spec_configmap(ftj, UID)["metadata"]["annotations"]
    assert annotated == {names.SPEC_DIGEST_ANNOTATION: reconcile.spec_digest(ftj.spec.wire())}


def test_the_judge_key_reaches_only_the_training_pod_through_a_secret_key_ref() -> None:
    from kubetune.api.contract import JUDGE_API_KEY_ENV

    ftj = parse(manifest("lora.yaml"))
    ftj.spec.evaluation.judge = ftj.spec.evaluation.model_validate(
        {"judge": {"url": "https://api.example.com/v1", "model": "gpt-4o-mini", "apiKeySecret": "judge-key"}}
    ).judge
    train_env = trainer_job(ftj, UID, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": JUDGE_API_KEY_ENV,
        "valueFrom": {"secretKeyRef": {"name": "judge-key", "key": "api-key"}},
    } in train_env
    check_env = validation_job(ftj, UID, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert all(e["name"] != JUDGE_API_KEY_ENV for e in check_env)
    assert all(
        e["name"] != JUDGE_API_KEY_ENV
        for e in trainer_job(parse(manifest("lora.yaml")), UID, SETTINGS)["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
    )
