"""The kopf wiring of kubetune.operator.handlers: module-level handlers that take their Context
(settings, API clients) from kopf's memo, and `register`, which puts the same handlers on another
registry for an isolated operator (the kmock tier runs several in one process)."""

from __future__ import annotations

import kopf
import pytest
from kubetune.operator import handlers
from kubetune.operator.actions import Context
from kubetune.operator.settings import OperatorSettings


def ids(registry: kopf.OperatorRegistry, kind: str) -> list[str]:
    return [h.id for h in getattr(registry, kind).get_all_handlers() if h.fn.__module__ == handlers.__name__]


def test_configure_builds_the_context_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_WORKER_LIMIT", "7")
    monkeypatch.setenv("KUBETUNE_API_URL", "https://apiserver.example:6443")
    monkeypatch.setenv("KUBETUNE_OPERATOR_METRICS_PORT", "0")
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "team-a,team-b")
    memo, settings = kopf.Memo(), kopf.OperatorSettings()
    handlers.configure(settings=settings, memo=memo)
    ctx = handlers.context(memo)
    assert ctx.settings.worker_limit == 7 and settings.batching.worker_limit == 7
    assert ctx.kube._api_url == ctx.serving_kube._api_url == "https://apiserver.example:6443"
    assert ctx.serving_kube._user_agent.endswith(" serving") and not ctx.kube._user_agent.endswith(" serving")
    assert ctx.metrics_port is None  # 0: off
    assert ctx.presence_namespace == "team-a"  # the first watched namespace holds the Lease
    assert settings.scanning.disabled is True
    assert isinstance(settings.persistence.progress_storage, kopf.StatusProgressStorage)


def test_configure_keeps_the_context_an_embedding_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_WORKER_LIMIT", "7")
    given = Context.create(OperatorSettings(worker_limit=3), api_url="http://127.0.0.1:1")
    memo, settings = kopf.Memo(kubetune=given), kopf.OperatorSettings()
    handlers.configure(settings=settings, memo=memo)
    assert handlers.context(memo) is given
    assert settings.batching.worker_limit == 3


def test_register_puts_every_module_handler_on_another_registry() -> None:
    default = kopf.get_default_registry()
    registry = kopf.OperatorRegistry()
    kube = handlers.register(registry, OperatorSettings(metrics_scrape_interval_seconds=0.25), api_url="http://x:1")
    assert kube._api_url == "http://x:1"
    for kind in ("_indexing", "_watching", "_changing"):
        assert ids(registry, kind) == ids(default, kind), kind
    assert ids(registry, "_activities") == ["context", *ids(default, "_activities")]  # the Context first
    assert ids(default, "_activities")[0] == "configure"
    assert ids(registry, "_changing") == ["children", "children", "suspend/spec.suspend", "cancel/spec.cancel"]
    [timer] = registry._spawning.get_all_handlers()
    [default_timer] = default._spawning.get_all_handlers()
    assert (timer.id, timer.interval, timer.requires_finalizer) == ("observe", 0.25, False)
    assert default_timer.requires_finalizer is False  # O7: deleting a FineTuneJob never waits for the operator


def test_handlers_take_the_context_from_the_memo() -> None:
    ctx = Context.create(OperatorSettings(), api_url="http://x:1")
    ctx.phases["gone"] = "Running"
    ctx.serving_due["gone"] = (0.0, 0)
    memo = kopf.Memo(kubetune=ctx)
    body = kopf.Body({"metadata": {"uid": "new"}, "status": {"phase": "Queued"}})
    handlers.count_phases(event={"type": "ADDED"}, body=body, uid="new", memo=memo)
    handlers.count_phases(event={"type": "DELETED"}, body=body, uid="gone", memo=memo)
    assert ctx.phases == {"new": "Queued"} and ctx.serving_due == {}
    with pytest.raises(KeyError):
        handlers.context(kopf.Memo())
