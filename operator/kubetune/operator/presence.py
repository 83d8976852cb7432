"""Two operators without peering: the second one says so.

Two standalone operators (a second Helm release, replicas > 1 without peering, a laptop running
`kubetune operator` against the production cluster) both act on every FineTuneJob: both create
children, both patch status, and each job's events come twice. kopf peering is how replicas agree
on one leader; without it, nothing tells the operators about each other.

So each standalone operator holds a `coordination.k8s.io/v1` Lease named `kubetune-operator`
(the Kubernetes object for "who is active"): it renews the Lease while it holds it, takes it over
once it has expired, and when another live holder has it, logs a warning naming that holder and
what to do, once per holder. With peering on, kopf coordinates and this module stays out of the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import kopf
from kubetune.operator.client import ApiError  # one API client for the whole operator

LEASE_NAME = "kubetune-operator"
LEASE_SECONDS = 60
RENEW_SECONDS = 20.0


def lease_path(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"


def lease_namespace(watched: list[str] | tuple[str, ...], env: Any = None) -> str:
    """Where the Lease lives: the first watched namespace of a namespaced operator (its Role is
    there), else the operator's own namespace (POD_NAMESPACE), else `default`."""
    env = os.environ if env is None else env
    return watched[0] if watched else (env.get("POD_NAMESPACE") or "default")


def identity() -> str:
    """This process: host name (the pod's name in a pod), PID and a random suffix."""
    return f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


def _micro(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    with contextlib.suppress(ValueError):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


def live_holder(lease: dict[str, Any] | None, me: str, now: datetime) -> str | None:
    """The holder of `lease` other than `me` whose renewal has not expired; None otherwise."""
    spec = (lease or {}).get("spec") or {}
    holder, renewed = spec.get("holderIdentity"), _parse(spec.get("renewTime"))
    duration = spec.get("leaseDurationSeconds")
    duration = duration if isinstance(duration, int) and duration > 0 else LEASE_SECONDS
    if not holder or holder == me or renewed is None:
        return None
    return holder if now - renewed < timedelta(seconds=duration) else None


def other_operator_message(holder: str, namespace: str) -> str:
    return (
        f"another kubetune operator ({holder}) holds Lease {namespace}/{LEASE_NAME}: two operators without "
        "peering both act on every FineTuneJob (children created twice, status written twice). Stop one, or "
        "run both with peering (chart value peering.enabled, KUBETUNE_PEERING=true)"
    )


async def hold(
    kube: Any, namespace: str, me: str, logger: Any, stop: asyncio.Event, renew_seconds: float = RENEW_SECONDS
) -> None:
    """Hold or watch the Lease until `stop` is set; warn once per other live holder."""
    warned: set[str] = set()
    while not stop.is_set():
        now = datetime.now(UTC)
        try:
            lease = await kube.get(f"{lease_path(namespace)}/{LEASE_NAME}")
            other = live_holder(lease, me, now)
            if other is not None:
                if other not in warned:
                    warned.add(other)
                    logger.warning(other_operator_message(other, namespace))
            else:
                spec = {"holderIdentity": me, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": _micro(now)}
                if lease is None:
                    spec["acquireTime"] = _micro(now)
                    body = {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": LEASE_NAME, "namespace": namespace},
                        "spec": spec,
                    }
                    await kube.request("POST", lease_path(namespace), body)
                else:
                    if (lease.get("spec") or {}).get("holderIdentity") != me:
                        spec["acquireTime"] = _micro(now)
                    # resourceVersion makes the update conditional: two takers cannot both win
                    patch = {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]}, "spec": spec}
                    await kube.request("PATCH", f"{lease_path(namespace)}/{LEASE_NAME}", patch)
        except ApiError as err:
            if err.status not in (409,):  # 409: someone else took or renewed it first; look again
                logger.debug(f"Lease {namespace}/{LEASE_NAME}: HTTP {err.status}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), renew_seconds)


async def start(
    tasks: list[tuple[asyncio.Task[None], asyncio.Event]],
    kube: Any,
    namespace: str,
    settings: kopf.OperatorSettings,
    logger: Any,
    renew_seconds: float = RENEW_SECONDS,
) -> None:
    """Hold the Lease in the background while a standalone operator runs (nothing with peering
    on: kopf decides who acts); the task and its stop flag go into `tasks` for `stop`."""
    if not settings.peering.standalone and settings.peering.name:
        return
    flag = asyncio.Event()
    task = asyncio.create_task(hold(kube, namespace, identity(), logger, flag, renew_seconds))
    tasks.append((task, flag))


async def stop(tasks: list[tuple[asyncio.Task[None], asyncio.Event]]) -> None:
    """End what `start` began (the operator's cleanup)."""
    while tasks:
        task, flag = tasks.pop()
        flag.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 5)
