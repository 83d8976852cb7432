"""The kopf handlers of FineTuneJobs: wiring only.

Every handler is declared here, at module level, as in kopf's examples, and registered on kopf's
default registry when this module is imported (`kopf run -m kubetune.operator`, `python -m
kubetune.operator`). A handler takes the operator's `Context` (settings, API clients, shared
state) from kopf's `memo` and calls one function of `kubetune.operator.actions`, which decides
and acts through `kubetune.operator.client`.

The `configure` startup handler puts the Context into the memo: the one an embedding passed
(`kopf.run(memo=kopf.Memo(kubetune=Context.create(...)))`), else one built from `KUBETUNE_*`
variables (`OperatorSettings.from_env`). `register(registry, settings, ...)` puts the same
handlers on another registry with their own Context, so tests run isolated operators, several in
one process, against an emulated API.

No handler needs a finalizer, so deleting a FineTuneJob while the operator is down never hangs (O7).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from datetime import datetime
from typing import Any

import kopf
from kubetune.api.enums import Phase
from kubetune.api.resource import GROUP, PLURAL, VERSION
from kubetune.operator import actions, client, names, presence, redaction
from kubetune.operator.actions import Context
from kubetune.operator.metrics import METRICS
from kubetune.operator.settings import OperatorSettings

MEMO_KEY = "kubetune"
"""The key of the `Context` in kopf's memo."""

_IMPORT_SETTINGS = OperatorSettings.from_env()
"""The settings when this module was imported: kopf fixes a timer's interval when it is declared."""


def context(memo: kopf.Memo) -> Context:
    """The operator's Context, put into the memo by `configure` before any resource handler runs."""
    ctx = memo[MEMO_KEY]
    assert isinstance(ctx, Context)
    return ctx


def from_env() -> Context:
    """The Context of a production operator: settings from `KUBETUNE_*`, /metrics on
    operator_metrics_port (0: off), the Lease in the namespace `presence` picks."""
    settings = OperatorSettings.from_env()
    return Context.create(
        settings,
        metrics_port=settings.operator_metrics_port or None,
        presence_namespace=presence.lease_namespace(settings.namespaces),
    )


class _WarningsOnly(logging.Filter):
    """On kopf's Event poster: a log record becomes an Event only from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


# ------------------------------------------------------------------------------ start-up


@kopf.on.startup(id="configure")
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """The Context into the memo; kopf settings of every instance (the tests' too, so they see
    what production does)."""
    if not isinstance(memo.get(MEMO_KEY), Context):
        memo[MEMO_KEY] = from_env()
    ctx = context(memo)
    settings.posting.level = logging.INFO  # JobCreated and phase events reach `kubectl describe`
    # Handler errors reach Events too: kopf logs them on its object logger, and with
    # `posting.loggers` those records are posted. Only warnings and errors: kopf's INFO
    # chatter ("Handler succeeded") would bury the job's own events.
    settings.posting.loggers = True
    for handler in logging.getLogger(redaction.OBJECT_LOGGER).handlers:
        if type(handler).__name__ == "K8sPoster" and not any(isinstance(f, _WarningsOnly) for f in handler.filters):
            handler.addFilter(_WarningsOnly())
    redaction.install()  # before any record reaches a handler or an Event: credentials redacted
    # kopf's bookkeeping lives in status.kopf, not in annotations: a FineTuneJob whose own
    # annotations are near the 256 KiB limit would otherwise never get a status (every patch
    # adding kopf's annotations refused). An object handled by an older operator (annotations)
    # is handled once more: every handler here is idempotent (children are adopted).
    settings.persistence.progress_storage = kopf.StatusProgressStorage(name="kopf")
    # No handler here reacts to annotations: leaving them out of the handled copy keeps a
    # user's 250 KB of notes from being copied into status as well.
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        name="kopf", ignored_fields=["metadata.annotations"]
    )
    # No CRD watching: the FineTuneJob CRD is installed before the operator (Helm does), and
    # a namespaced operator then needs no cluster-wide permission at all (O11).
    settings.scanning.disabled = True
    settings.batching.worker_limit = ctx.settings.worker_limit or None  # kopf: None is unlimited


@kopf.on.startup(id="presence")
async def hold_lease(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """A standalone operator holds the `kubetune-operator` Lease and warns about another holder."""
    ctx = context(memo)
    if ctx.presence_namespace is not None:
        await presence.start(
            ctx.lease_tasks, ctx.kube, ctx.presence_namespace, settings, logger, ctx.presence_renew_seconds
        )


@kopf.on.cleanup(id="presence")
async def release_lease(memo: kopf.Memo, **_: Any) -> None:
    await presence.stop(context(memo).lease_tasks)


@kopf.on.startup(id="metrics-server")
def serve_metrics(memo: kopf.Memo, **_: Any) -> None:
    """The operator's own /metrics while it runs (with a metrics port)."""
    ctx = context(memo)
    if ctx.metrics_port is not None:
        ctx.servers.append(METRICS.serve(ctx.metrics_port, ctx.settings.listen_address()))


@kopf.on.cleanup(id="metrics-server")
def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    servers = context(memo).servers
    while servers:
        server = servers.pop()
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ FineTuneJobs


@kopf.on.resume(GROUP, VERSION, PLURAL, id="children")
@kopf.on.create(GROUP, VERSION, PLURAL, id="children")
async def create_children(
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    retry: int = 0,
    started: datetime | None = None,
    **_: Any,
) -> None:
    await actions.create_children(
        context(memo), body, name=name, namespace=namespace, uid=uid, patch=patch, retry=retry, started=started
    )


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.suspend", id="suspend")
async def suspend(
    body: kopf.Body, name: str, namespace: str | None, uid: str, new: Any, memo: kopf.Memo, retry: int = 0, **_: Any
) -> None:
    await actions.suspend(context(memo), body, name=name, namespace=namespace, uid=uid, new=new, retry=retry)


# Watch-fed caches of the operator's Jobs and their pods (kopf indexes): an idle running job
# then costs no API request per tick, only the scrape of its pod (issue 14: 300 idle jobs
# cost 20 requests/s when every tick read its Job and listed its pods).
@kopf.index("batch", "v1", "jobs", labels={names.MANAGED_BY_LABEL: names.MANAGED_BY}, id="kubetune_jobs")
def index_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): client.slim_job(actions.plain(body))}


@kopf.index("", "v1", "pods", labels={names.MANAGED_BY_LABEL: names.MANAGED_BY}, id="kubetune_pods")
def index_pods(namespace: str | None, labels: Any, body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    job = labels.get(names.POD_JOB_LABEL) or labels.get(names.JOB_NAME_LABEL)
    return {(namespace, job): client.slim_pod(actions.plain(body))} if job else None


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.cancel", id="cancel")
async def cancel(
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    new: Any,
    patch: kopf.Patch,
    memo: kopf.Memo,
    retry: int = 0,
    **_: Any,
) -> None:
    await actions.cancel(
        context(memo), body, name=name, namespace=namespace, uid=uid, new=new, patch=patch, retry=retry
    )


@kopf.on.event(GROUP, VERSION, PLURAL, id="phase-gauge")
def count_phases(event: kopf.RawEvent, body: kopf.Body, uid: str, memo: kopf.Memo, **_: Any) -> None:
    """Keep `kubetune_operator_finetunejobs{phase}` equal to what the watch shows (no finalizer)."""
    ctx = context(memo)
    if event.get("type") == "DELETED":
        ctx.phases.pop(uid, None)
        ctx.serving_due.pop(uid, None)
    else:
        ctx.phases[uid] = str((body.get("status") or {}).get("phase") or Phase.PENDING.value)
    METRICS.set_phase_counts(collections.Counter(ctx.phases.values()))


def _timer_without_finalizer(registry: kopf.OperatorRegistry, handler: Any) -> None:
    """Timers normally make kopf add a finalizer; ours need none (the Job goes by ownerReference),
    and a finalizer would hang deletion while the operator is down (O7)."""
    registry._spawning.append(dataclasses.replace(handler, requires_finalizer=False))


async def observe(
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    logger: Any,
    memo: kopf.Memo,
    kubetune_jobs: Any = None,
    kubetune_pods: Any = None,
    **_: Any,
) -> None:
    """The timer: the trainer Job's state into the status, then (once Succeeded) spec.serving."""
    await actions.observe_job(
        context(memo),
        body,
        name=name,
        namespace=namespace,
        uid=uid,
        patch=patch,
        logger=logger,
        kubetune_jobs=kubetune_jobs,
        kubetune_pods=kubetune_pods,
    )


def _observe_timer(interval: float) -> Any:
    """The `observe` timer handler for `interval` seconds, without a finalizer."""
    scratch = kopf.OperatorRegistry()
    kopf.timer(GROUP, VERSION, PLURAL, registry=scratch, id="observe", interval=interval)(observe)
    [handler] = scratch._spawning.get_all_handlers()
    return handler


_timer_without_finalizer(kopf.get_default_registry(), _observe_timer(_IMPORT_SETTINGS.metrics_scrape_interval_seconds))


# ------------------------------------------------------------------------------ other registries


def register(
    registry: kopf.OperatorRegistry,
    settings: OperatorSettings,
    *,
    api_url: str | None = None,
    metrics_port: int | None = None,
    presence_namespace: str | None = None,
    presence_renew_seconds: float = presence.RENEW_SECONDS,
) -> client.Kube:
    """Put this module's handlers on `registry`, for an operator with `settings` (its observe
    timer ticking every metrics_scrape_interval_seconds); returns the API client they use. With
    `metrics_port`, the operator's own /metrics is served there while the operator runs; with
    `presence_namespace`, a standalone operator holds the `kubetune-operator` Lease there and
    warns when another operator holds it (`presence`), renewing it every `presence_renew_seconds`."""
    ctx = Context.create(
        settings,
        api_url=api_url,
        metrics_port=metrics_port,
        presence_namespace=presence_namespace,
        presence_renew_seconds=presence_renew_seconds,
    )

    @kopf.on.startup(registry=registry, id="context")
    def remember(memo: kopf.Memo, **_: Any) -> None:
        memo[MEMO_KEY] = ctx

    default = kopf.get_default_registry()
    for kind in ("_activities", "_indexing", "_watching", "_changing"):
        for handler in getattr(default, kind).get_all_handlers():
            if getattr(handler.fn, "__module__", None) == __name__:
                getattr(registry, kind).append(handler)
    _timer_without_finalizer(registry, _observe_timer(settings.metrics_scrape_interval_seconds))
    return ctx.kube
