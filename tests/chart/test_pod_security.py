"""Every pod kubetune ships passes Pod Security "restricted" (RELIABILITY, "Pods and RBAC the chart ships").

The operator Deployment is checked in test_render.py; here the same checker runs over the trainer
and data-validation Jobs the operator builds for every example manifest, with the chart's
default settings. The checker is only worth something if it fails: each negative case breaks one
control of the standard on an otherwise passing pod and names the control that must catch it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from kubetune.api import parse_manifest
from kubetune.api.manifest import is_finetunejob, load_documents
from kubetune.operator.builders import trainer_job, validation_job
from kubetune.operator.settings import OperatorSettings

from tests.chart.pss import restricted_violations
from tests.chart.render import ROOT, env_of, one, scenario

UID = "5f0c6a52-8a3e-4d2b-9c1e-0d4f3b7a9e21"
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def chart_settings() -> OperatorSettings:
    """The settings the chart's defaults give the operator."""
    return OperatorSettings.from_env(env_of(one(scenario("defaults"), "Deployment")))


def example_jobs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in EXAMPLES:
        for doc in load_documents(path):
            if is_finetunejob(doc.data):
                data = copy.deepcopy(doc.data)
                data["metadata"].setdefault("namespace", "default")
                out.append((doc.where, data))
    return out


JOBS = example_jobs()


@pytest.mark.parametrize(("where", "data"), JOBS, ids=[w for w, _ in JOBS])
def test_trainer_and_validation_pods_are_restricted(where: str, data: dict[str, Any]) -> None:
    ftj, problems = parse_manifest(data)
    assert ftj is not None, problems
    settings = chart_settings()
    for job in (trainer_job(ftj, UID, settings), validation_job(ftj, UID, settings)):
        template = job["spec"]["template"]
        assert restricted_violations(template) == [], job["metadata"]["name"]
        # RELIABILITY: trainers get no API token and a read-only root.
        assert template["spec"]["automountServiceAccountToken"] is False
        # ... under the chart's trainer account, unless spec.podOverrides names another one.
        own = ftj.spec.pod_overrides.service_account_name if ftj.spec.pod_overrides else None
        assert template["spec"]["serviceAccountName"] == (own or settings.trainer_service_account)
        assert settings.trainer_service_account == "kubetune-trainer"
        assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in template["spec"]["containers"])


def test_examples_are_all_covered() -> None:
    assert len(JOBS) >= 30  # one manifest per method and variant; a glob that found none would pass vacuously


# ------------------------------------------------------------------------------ negatives


def good_pod() -> dict[str, Any]:
    return copy.deepcopy(one(scenario("defaults"), "Deployment")["spec"]["template"])


def container(t: dict[str, Any]) -> dict[str, Any]:
    return t["spec"]["containers"][0]


Mutation = Callable[[dict[str, Any]], object]
NEGATIVE: dict[str, tuple[Mutation, str]] = {
    "host network": (lambda t: t["spec"].update(hostNetwork=True), "host_namespaces"),
    "host PID": (lambda t: t["spec"].update(hostPID=True), "host_namespaces"),
    "host IPC": (lambda t: t["spec"].update(hostIPC=True), "host_namespaces"),
    "privileged": (lambda t: container(t)["securityContext"].update(privileged=True), "privileged"),
    "host process": (
        lambda t: t["spec"]["securityContext"].update(windowsOptions={"hostProcess": True}),
        "host_process",
    ),
    "adds SYS_ADMIN": (
        lambda t: container(t)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "capabilities_baseline",
    ),
    "adds CHOWN (baseline only)": (
        lambda t: container(t)["securityContext"]["capabilities"].update(add=["CHOWN"]),
        "capabilities_restricted",
    ),
    "keeps capabilities": (lambda t: container(t)["securityContext"].pop("capabilities"), "capabilities_restricted"),
    "hostPath volume": (lambda t: t["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "host_path"),
    "nfs volume": (
        lambda t: t["spec"]["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
        "volume_types",
    ),
    "host port": (lambda t: container(t)["ports"][0].update(hostPort=8080), "host_ports"),
    "AppArmor unconfined annotation": (
        lambda t: (
            t["metadata"]
            .setdefault("annotations", {})
            .update({"container.apparmor.security.beta.kubernetes.io/operator": "unconfined"})
        ),
        "apparmor",
    ),
    "AppArmor unconfined field": (
        lambda t: container(t)["securityContext"].update(appArmorProfile={"type": "Unconfined"}),
        "apparmor",
    ),
    "SELinux custom type": (lambda t: t["spec"]["securityContext"].update(seLinuxOptions={"type": "spc_t"}), "selinux"),
    "SELinux user": (lambda t: container(t)["securityContext"].update(seLinuxOptions={"user": "system_u"}), "selinux"),
    "unmasked /proc": (lambda t: container(t)["securityContext"].update(procMount="Unmasked"), "proc_mount"),
    "unsafe sysctl": (
        lambda t: t["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
        "sysctls",
    ),
    "privilege escalation allowed": (
        lambda t: container(t)["securityContext"].update(allowPrivilegeEscalation=True),
        "privilege_escalation",
    ),
    "privilege escalation unset": (
        lambda t: container(t)["securityContext"].pop("allowPrivilegeEscalation"),
        "privilege_escalation",
    ),
    "runAsNonRoot unset": (
        lambda t: (
            t["spec"]["securityContext"].pop("runAsNonRoot"),
            container(t)["securityContext"].pop("runAsNonRoot"),
        ),
        "run_as_non_root",
    ),
    "container overrides runAsNonRoot": (
        lambda t: container(t)["securityContext"].update(runAsNonRoot=False),
        "run_as_non_root",
    ),
    "root uid": (lambda t: container(t)["securityContext"].update(runAsUser=0), "run_as_user"),
    "seccomp unset": (lambda t: t["spec"]["securityContext"].pop("seccompProfile"), "seccomp_restricted"),
    "seccomp unconfined in a container": (
        lambda t: container(t)["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "seccomp_baseline",
    ),
    "bad init container": (
        lambda t: t["spec"].setdefault("initContainers", []).append({"name": "init", "image": "busybox"}),
        "privilege_escalation",
    ),
}


def test_the_good_pod_passes() -> None:
    assert restricted_violations(good_pod()) == []


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_checker_catches(case: str) -> None:
    mutate, control = NEGATIVE[case]
    pod = good_pod()
    mutate(pod)
    found = restricted_violations(pod)
    assert any(v.startswith(f"{control}: ") for v in found), found


def test_a_trainer_job_with_a_dropped_setting_fails() -> None:
    """The trainer builder's output is checked for real: without the restricted pod context it fails."""
    ftj, _ = parse_manifest(JOBS[0][1])
    assert ftj is not None
    template = trainer_job(ftj, UID, chart_settings())["spec"]["template"]
    del template["spec"]["securityContext"]["seccompProfile"]
    assert restricted_violations(template) == ["seccomp_restricted: containers[trainer]: seccompProfile unset"]
