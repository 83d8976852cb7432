"""The Pod Security Standards "restricted" profile (Kubernetes 1.30), as a checker for pod templates.

RELIABILITY.md promises that a namespace labelled `pod-security.kubernetes.io/enforce: restricted`
admits every pod kubetune ships: the operator Deployment's and the trainer Jobs'. No admission
controller runs offline, so the rules of https://kubernetes.io/docs/concepts/security/pod-security-standards/
are written out here, one function per control, each returning what it finds wrong. Restricted is
Baseline plus its own controls; both are checked. Container-level settings override pod-level ones
where the standard says so (runAsNonRoot, seccomp).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Pod = dict[str, Any]

BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t"})
RESTRICTED_VOLUMES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def containers(pod: Pod) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(key) or []:
            yield f"{key}[{c.get('name')}]", c


def _ctx(c: dict[str, Any]) -> dict[str, Any]:
    return c.get("securityContext") or {}


# ------------------------------------------------------------------------------ baseline


def host_process(pod: Pod, meta: dict[str, Any]) -> list[str]:
    where = [("pod", pod.get("securityContext") or {})] + [(n, _ctx(c)) for n, c in containers(pod)]
    return [
        f"{n}: windowsOptions.hostProcess" for n, ctx in where if (ctx.get("windowsOptions") or {}).get("hostProcess")
    ]


def host_namespaces(pod: Pod, meta: dict[str, Any]) -> list[str]:
    return [f"{key} is true" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]


def privileged(pod: Pod, meta: dict[str, Any]) -> list[str]:
    return [f"{n}: privileged" for n, c in containers(pod) if _ctx(c).get("privileged")]


def capabilities_baseline(pod: Pod, meta: dict[str, Any]) -> list[str]:
    return [
        f"{n}: adds {cap}"
        for n, c in containers(pod)
        for cap in (_ctx(c).get("capabilities") or {}).get("add") or []
        if cap not in BASELINE_CAPABILITIES
    ]


def host_path(pod: Pod, meta: dict[str, Any]) -> list[str]:
    return [f"volume {v.get('name')}: hostPath" for v in pod.get("volumes") or [] if "hostPath" in v]


def host_ports(pod: Pod, meta: dict[str, Any]) -> list[str]:
    return [
        f"{n}: hostPort {p['hostPort']}" for n, c in containers(pod) for p in c.get("ports") or [] if p.get("hostPort")
    ]


def apparmor(pod: Pod, meta: dict[str, Any]) -> list[str]:
    bad = [
        f"annotation {k}={v}"
        for k, v in (meta.get("annotations") or {}).items()
        if k.startswith(APPARMOR_ANNOTATION) and v != "runtime/default" and not str(v).startswith("localhost/")
    ]
    where = [("pod", pod.get("securityContext") or {})] + [(n, _ctx(c)) for n, c in containers(pod)]
    bad += [
        f"{n}: appArmorProfile {ctx['appArmorProfile'].get('type')}"
        for n, ctx in where
        if ctx.get("appArmorProfile") and ctx["appArmorProfile"].get("type") not in ("RuntimeDefault", "Localhost")
    ]
    return bad


def selinux(pod: Pod, meta: dict[str, Any]) -> list[str]:
    bad = []
    for n, ctx in [("pod", pod.get("securityContext") or {})] + [(n, _ctx(c)) for n, c in containers(pod)]:
        opts = ctx.get("seLinuxOptions") or {}
        if opts.get("type", "") not in SELINUX_TYPES:
            bad.append(f"{n}: seLinuxOptions.type {opts['type']}")
        bad += [f"{n}: seLinuxOptions.{k} is set" for k in ("user", "role") if opts.get(k)]
    return bad


def proc_mount(pod: Pod, meta: dict[str, Any]) -> list[str]:
    return [
        f"{n}: procMount {_ctx(c)['procMount']}"
        for n, c in containers(pod)
        if _ctx(c).get("procMount", "Default") != "Default"
    ]


def seccomp_baseline(pod: Pod, meta: dict[str, Any]) -> list[str]:
    where = [("pod", pod.get("securityContext") or {})] + [(n, _ctx(c)) for n, c in containers(pod)]
    return [
        f"{n}: seccomp Unconfined" for n, ctx in where if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined"
    ]


def sysctls(pod: Pod, meta: dict[str, Any]) -> list[str]:
    return [
        f"sysctl {s.get('name')}"
        for s in (pod.get("securityContext") or {}).get("sysctls") or []
        if s.get("name") not in SAFE_SYSCTLS
    ]


# ---------------------------------------------------------------------------- restricted


def volume_types(pod: Pod, meta: dict[str, Any]) -> list[str]:
    bad = []
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        bad += [f"volume {v.get('name')}: type {k}" for k in sorted(kinds - RESTRICTED_VOLUMES)]
    return bad


def privilege_escalation(pod: Pod, meta: dict[str, Any]) -> list[str]:
    return [
        f"{n}: allowPrivilegeEscalation is not false"
        for n, c in containers(pod)
        if _ctx(c).get("allowPrivilegeEscalation") is not False
    ]


def run_as_non_root(pod: Pod, meta: dict[str, Any]) -> list[str]:
    pod_level = (pod.get("securityContext") or {}).get("runAsNonRoot")
    bad = []
    for n, c in containers(pod):
        own = _ctx(c).get("runAsNonRoot")
        if own is False or (own is None and pod_level is not True):
            bad.append(f"{n}: runAsNonRoot is not true")
    return bad


def run_as_user(pod: Pod, meta: dict[str, Any]) -> list[str]:
    where = [("pod", pod.get("securityContext") or {})] + [(n, _ctx(c)) for n, c in containers(pod)]
    return [f"{n}: runAsUser 0" for n, ctx in where if ctx.get("runAsUser") == 0]


def seccomp_restricted(pod: Pod, meta: dict[str, Any]) -> list[str]:
    pod_type = ((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    bad = []
    for n, c in containers(pod):
        own = (_ctx(c).get("seccompProfile") or {}).get("type")
        effective = own or pod_type
        if effective not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{n}: seccompProfile {effective or 'unset'}")
    return bad


def capabilities_restricted(pod: Pod, meta: dict[str, Any]) -> list[str]:
    bad = []
    for n, c in containers(pod):
        caps = _ctx(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{n}: capabilities.drop lacks ALL")
        bad += [f"{n}: adds {cap}" for cap in caps.get("add") or [] if cap not in RESTRICTED_CAPABILITIES]
    return bad


BASELINE: tuple[Callable[[Pod, dict[str, Any]], list[str]], ...] = (
    host_process,
    host_namespaces,
    privileged,
    capabilities_baseline,
    host_path,
    host_ports,
    apparmor,
    selinux,
    proc_mount,
    seccomp_baseline,
    sysctls,
)
RESTRICTED = BASELINE + (
    volume_types,
    privilege_escalation,
    run_as_non_root,
    run_as_user,
    seccomp_restricted,
    capabilities_restricted,
)


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """Everything in a pod template ({metadata, spec}) the restricted profile forbids; [] when it passes."""
    pod, meta = template.get("spec") or {}, template.get("metadata") or {}
    return [f"{check.__name__}: {problem}" for check in RESTRICTED for problem in check(pod, meta)]
