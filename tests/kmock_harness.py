"""
A fast, in-process Kubernetes API for kopf operator tests, built on kmock.

Why this module exists
----------------------
kmock (PyPI ``kmock``, by kopf's author) emulates the Kubernetes HTTP API in
memory, which makes it ideal for fault injection and many quick tests.  Out of
the box, kmock 0.8 cannot drive a kopf >= 1.45 operator.  This module closes
the gaps in a small test-only subclass, :class:`KubeEmulator`:

1. ``v1/namespaces`` is declared, so kopf's namespace observer starts
   (kopf waits for it forever otherwise, even cluster-wide);
2. stored objects get ``uid``, ``resourceVersion`` (one global counter bumped
   on every write), ``creationTimestamp`` and ``generation`` (1 on create,
   +1 on changes outside ``metadata``/``status``) -- kopf's finalizer
   JSON-patches test ``resourceVersion`` and ``kopf.adopt`` needs the owner uid;
3. a failed JSON-patch ``test`` op answers 422 (kmock: 500, so kopf retried
   a stale patch forever); kopf treats 422 as "retry on the next cycle";
4. watches honour ``?resourceVersion=`` (an event log is kept and only newer
   events are replayed) and subscribe *before* replaying, so nothing is lost.

Also: create answers 201; ``generateName``; the ``/status`` subresource only
changes ``.status`` and the main endpoint ignores ``.status`` (for resources
declared with a status subresource); ``labelSelector`` on list/watch; PUT;
DELETE of an object with finalizers sets ``deletionTimestamp`` and the object
goes away once its finalizers are emptied; background garbage collection via
``ownerReferences``; ``timeoutSeconds`` on watches.

Everything else is kmock's: the HTTP server, request parsing, the DSL of
reactions (``kube['get /x'] << 500`` still works), API discovery, and the
object storage (``kube.objects[...]``).  Not emulated: schema validation,
CRD registration by POSTing a CRD, field selectors, server-side apply.

Fault injection for tests: :meth:`KubeEmulator.fail_next` (5xx, 429 with
``Retry-After``), :meth:`KubeEmulator.drop_watches` (cut all open watch
streams now), and a request log :attr:`KubeEmulator.requests`.

:func:`serve` runs the emulator in its own thread and event loop.  This is
deliberate: when ``kopf.operator()`` stops, it cancels *every* task created in
its event loop after it started -- which would include the emulator's server
tasks if both lived in the test's loop.

:func:`run_operator` runs a kopf operator against the emulator inside the
current event loop as an async context manager.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import datetime
import logging
import re
import secrets
import string
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import kopf
from kmock._internal import dicts, parsing  # merge-patch & URL parsing: not exported by kmock 0.8

__all__ = [
    "KubeEmulator",
    "RequestRecord",
    "operator_settings",
    "run_operator",
    "serve",
    "verb_resource",
    "wait_until",
]

T = TypeVar("T")

VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}

# (resource, kind, namespaced, subresources, shortnames)
DECLARED_RESOURCES: list[tuple[str, str, bool, set[str], set[str]]] = [
    ("kubetune.io/v1alpha1/finetunejobs", "FineTuneJob", True, {"status"}, {"ftj"}),
    ("batch/v1/jobs", "Job", True, {"status"}, set()),
    ("v1/pods", "Pod", True, {"status"}, {"po"}),
    ("v1/services", "Service", True, set(), {"svc"}),
    ("v1/events", "Event", True, set(), {"ev"}),
    ("events.k8s.io/v1/events", "Event", True, set(), {"ev"}),
    ("v1/namespaces", "Namespace", False, {"status"}, {"ns"}),
    ("scheduling.volcano.sh/v1beta1/podgroups", "PodGroup", True, {"status"}, {"pg"}),
    ("kopf.dev/v1/kopfpeerings", "KopfPeering", True, set(), set()),
    ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False, set(), set()),
    ("coordination.k8s.io/v1/leases", "Lease", True, set(), set()),
    (
        "apiextensions.k8s.io/v1/customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        {"status"},
        {"crd", "crds"},
    ),
]


class RequestRecord(NamedTuple):
    """One served request. ``status`` is None while in flight (e.g. an open watch)."""

    method: str
    path: str
    query: dict[str, str]
    status: int | None
    timestamp: float  # time.monotonic() at arrival
    user_agent: str = ""  # tells the operator's requests (kopf/…, kubetune-operator/…) from the test's


def verb_resource(record: RequestRecord) -> tuple[str, str]:
    """
    Classify a request as a Kubernetes (verb, resource) pair, e.g.
    ``('watch', 'batch/v1/jobs')``, ``('patch', 'kubetune.io/v1alpha1/finetunejobs/status')``.
    Non-resource requests (discovery) give ``(method.lower(), path)``.
    """
    parsed = parsing.parse_path(record.path)
    if parsed.group is None or parsed.plural is None:
        return record.method.lower(), record.path
    gv = parsed.version if not parsed.group else f"{parsed.group}/{parsed.version}"
    resource = f"{gv}/{parsed.plural}" + (f"/{parsed.subresource}" if parsed.subresource else "")
    named = parsed.name is not None
    verb = {
        "GET": "watch" if record.query.get("watch") in ("true", "1") else "get" if named else "list",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }.get(record.method.upper(), record.method.lower())
    return verb, resource


@dataclasses.dataclass
class _Fault:
    method: str | None
    path: re.Pattern[str]
    status: int
    times: int
    headers: dict[str, str]
    message: str = "injected by the test"


_DROP = object()  # a sentinel put into a watch's queue to cut it


@dataclasses.dataclass(eq=False)
class _Watch:
    resource: kmock.resource
    namespace: str | None
    selector: list[tuple[str, str, frozenset[str]]]
    request: kmock.Request
    queue: asyncio.Queue[Any] = dataclasses.field(default_factory=asyncio.Queue)

    def sees(self, resource: kmock.resource, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        return (
            resource == self.resource
            and (self.namespace is None or meta.get("namespace") == self.namespace)
            and _labels_match(self.selector, meta.get("labels") or {})
        )


_SELECTOR_TERM = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<val>[-A-Za-z0-9_.]*)"
    r"|\s(?P<setop>in|notin)\s*\((?P<vals>[^)]*)\))?\s*$"
)


def parse_label_selector(text: str | None) -> list[tuple[str, str, frozenset[str]]]:
    """Parse ``a=b,c!=d,e,!f,g in (x,y),h notin (z)`` into (key, op, values) terms."""
    terms: list[tuple[str, str, frozenset[str]]] = []
    for part in re.split(r",(?![^(]*\))", text or ""):
        if not part.strip():
            continue
        m = _SELECTOR_TERM.match(part)
        if m is None or (m["neg"] and (m["op"] or m["setop"])):
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"unable to parse requirement: {part!r}"
            )
        if m["neg"]:
            terms.append((m["key"], "!exists", frozenset()))
        elif m["op"]:
            terms.append((m["key"], "!=" if m["op"] == "!=" else "=", frozenset([m["val"]])))
        elif m["setop"]:
            vals = frozenset(v.strip() for v in m["vals"].split(",") if v.strip())
            terms.append((m["key"], "=" if m["setop"] == "in" else "!=", vals))
        else:
            terms.append((m["key"], "exists", frozenset()))
    return terms


def _labels_match(terms: Iterable[tuple[str, str, frozenset[str]]], labels: Mapping[str, str]) -> bool:
    for key, op, values in terms:
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
        if op == "=" and labels.get(key) not in values:
            return False
        if op == "!=" and key in labels and labels[key] in values:
            return False
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _essence(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What counts for ``metadata.generation``: everything except metadata & status."""
    return {key: val for key, val in obj.items() if key not in ("metadata", "status")}


@attrs.define(kw_only=True, eq=False)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the semantics kopf relies on (see the module doc)."""

    requests: list[RequestRecord] = attrs.field(factory=list, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _log: list[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _watches: set[_Watch] = attrs.field(factory=set, init=False)
    _faults: list[_Fault] = attrs.field(factory=list, init=False)
    _faults_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_update
        for key, kind, namespaced, subresources, shortnames in DECLARED_RESOURCES:
            self.resources[key] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                verbs=VERBS,
                subresources=subresources,
                shortnames=shortnames,
            )

    @property
    def base_url(self) -> str:
        """The server's URL without a trailing slash, e.g. ``http://127.0.0.1:12345``."""
        return str(self.url).rstrip("/")

    # ---------------------------------------------------------------- test helpers (thread-safe)

    def fail_next(
        self,
        method: str | None,
        path_regex: str,
        status: int,
        *,
        times: int = 1,
        headers: Mapping[str, str] | None = None,
        message: str = "injected by the test",
    ) -> None:
        """
        Answer the next ``times`` requests whose HTTP method matches (None: any) and whose
        path (no query) matches ``path_regex`` (``re.search``) with ``status`` and ``headers``,
        without touching the stored objects.  E.g. ``fail_next('POST', r'/jobs$', 503)`` or
        ``fail_next('PATCH', r'/status$', 429, headers={'Retry-After': '1'})``.
        """
        fault = _Fault(
            method.upper() if method else None, re.compile(path_regex), status, times, dict(headers or {}), message
        )
        with self._faults_lock:
            self._faults.append(fault)

    def drop_watches(self) -> int:
        """Cut every open watch stream now (the TCP connection is closed). Returns how many."""
        return self._call(self._drop_watches)

    def active_watches(self, resource: str | None = None) -> int:
        """How many watch streams are open now, optionally for one ``group/version/plural``."""
        res = kmock.resource(resource) if resource else None
        return self._call(lambda: sum(1 for w in self._watches if res is None or w.resource == res))

    async def wait_for_watches(self, resource: str, count: int = 1, timeout: float = 10) -> None:
        """Wait until at least ``count`` watch streams for ``resource`` are open."""
        await wait_until(
            lambda: self.active_watches(resource) >= count,
            timeout=timeout,
            message=f"no {count} watch(es) for {resource}",
        )

    def read_object(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """A deep copy of a stored live object, or None."""

        def fetch() -> dict[str, Any] | None:
            key = (kmock.resource(resource), namespace, name)
            obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 (kmock's ObjectsArray has no .get)
            return None if obj is None or obj.deleted else copy.deepcopy(obj.raw)

        return self._call(fetch)

    def count(self, verb: str, resource: str) -> int:
        """How many requests of a (verb, resource) pair were served, e.g. ('create', 'batch/v1/jobs')."""
        return sum(1 for record in list(self.requests) if verb_resource(record) == (verb, resource))

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the emulator's loop (it may live in another thread) and return its result."""
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return fn()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as e:
                result.set_exception(e)

        loop.call_soon_threadsafe(run)
        return result.result(timeout=10)

    # ---------------------------------------------------------------- request dispatching

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        index = len(self.requests)
        self.requests.append(
            RequestRecord(
                str(request.method.value),
                request.url.path,
                dict(request.params),
                None,
                time.monotonic(),
                request.headers.get("User-Agent", ""),
            )
        )
        status: int | None = None
        try:
            fault = self._take_fault(request)
            if fault is not None:
                response = self._render_fault(fault)
            else:
                if (
                    request.resource is not None
                    and request.name is not None
                    and request.method in (kmock.method.POST, kmock.method.PATCH, kmock.method.PUT, kmock.method.DELETE)
                ):
                    self._mutate(request)
                elif request.resource is not None and request.action == kmock.action.CREATE:
                    self._create(request)
                # Skip KubernetesEmulator._handle (its mutations are replaced by ours), keep the DSL.
                response = await kmock.RawHandler._handle(self, request)
            status = response.status
            return response
        except kmock.KubernetesError as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (e.g. an open watch when kopf stops)
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.requests[index] = self.requests[index]._replace(status=status)

    def _take_fault(self, request: kmock.Request) -> _Fault | None:
        with self._faults_lock:
            for fault in self._faults:
                if (
                    fault.times > 0
                    and fault.method in (None, request.method.value.upper())
                    and fault.path.search(request.url.path)
                ):
                    fault.times -= 1
                    if not fault.times:
                        self._faults.remove(fault)
                    return fault
        return None

    @staticmethod
    def _render_fault(fault: _Fault) -> aiohttp.web.StreamResponse:
        reason = {
            404: "NotFound",
            422: "Invalid",
            429: "TooManyRequests",
            500: "InternalError",
            503: "ServiceUnavailable",
            504: "Timeout",
        }.get(fault.status, "InjectedFault")
        details: dict[str, Any] = {}
        if "Retry-After" in fault.headers:
            details["retryAfterSeconds"] = int(float(fault.headers["Retry-After"]))
        body = {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": fault.status,
            "reason": reason,
            "message": fault.message,
            "details": details,
        }
        return aiohttp.web.json_response(body, status=fault.status, headers=fault.headers)

    # ---------------------------------------------------------------- state changes

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        return self.resources[resource] if resource in self.resources else None  # noqa: SIM401 (no .get on kmock's mapping)

    def _has_status(self, resource: kmock.resource) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    def _live(self, key: tuple[kmock.resource, str | None, str]) -> dict[str, Any]:
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError(reason="NotFound", message=f"{key[2]!r} not found")
        return copy.deepcopy(self._objects[key].raw)

    def _emit(self, etype: str, resource: kmock.resource, obj: dict[str, Any]) -> None:
        event = {"type": etype, "object": copy.deepcopy(obj)}
        self._log.append((self._rv, resource, event))
        for watch in self._watches:
            if watch.sees(resource, obj):
                watch.queue.put_nowait(event)

    def _store(self, key: tuple[kmock.resource, str | None, str], obj: dict[str, Any], etype: str) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if key not in self._objects:
            self._objects[key] = obj
        else:
            self._objects[key].history.append(obj)
        self._emit(etype, key[0], obj)

    def _remove(self, key: tuple[kmock.resource, str | None, str], obj: dict[str, Any], gc: bool = True) -> None:
        self._store(key, obj, "DELETED")
        self._objects[key].delete()
        if gc:
            self._collect_garbage(obj["metadata"]["uid"])

    def _delete(self, key: tuple[kmock.resource, str | None, str], gc: bool = True) -> None:
        obj = self._live(key)
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return  # already terminating, waiting for the finalizers
        if meta.get("finalizers"):
            meta["deletionTimestamp"] = _now()
            meta["deletionGracePeriodSeconds"] = 0
            self._store(key, obj, "MODIFIED")
        else:
            self._remove(key, obj, gc=gc)

    def _collect_garbage(self, owner_uid: str) -> None:
        """Background-style GC: delete the dependents whose owners are all gone now."""
        live_uids = {obj.raw["metadata"].get("uid") for obj in self._objects.values() if not obj.deleted}
        for key, obj in list(self._objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs) and not any(
                ref.get("uid") in live_uids for ref in refs
            ):
                self._delete(key)

    def _create(self, request: kmock.Request) -> None:
        if not isinstance(request.data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="a JSON object is expected")
        resource = request.resource
        assert resource is not None
        info = self._info(resource)
        namespaced = (
            info.namespaced if info is not None and info.namespaced is not None else request.namespace is not None
        )
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if namespaced:
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise kmock.KubernetesError(status=422, reason="Invalid", message="name or generateName is required")
            alphabet = string.ascii_lowercase + string.digits
            meta["name"] = meta["generateName"] + "".join(secrets.choice(alphabet) for _ in range(5))
        key = (resource, meta.get("namespace"), meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists", message=f"{meta['name']!r} already exists")
        if self._has_status(resource):
            obj.pop("status", None)  # as for CRDs with the status subresource: ignored on create
        if info is not None and info.kind and "kind" not in obj:
            obj["kind"] = info.kind
        obj.setdefault("apiVersion", f"{resource.group}/{resource.version}" if resource.group else resource.version)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        # Let the fallback renderer (and user reactions) find the object by the request's data.
        request.data.setdefault("metadata", {}).update(name=meta["name"], namespace=meta.get("namespace"))
        self._store(key, obj, "ADDED")

    def _mutate(self, request: kmock.Request) -> None:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        if request.method == kmock.method.DELETE:
            if request.subresource:
                raise kmock.KubernetesNotFoundError()
            options = request.data if isinstance(request.data, dict) else {}
            policy = options.get("propagationPolicy") or request.params.get("propagationPolicy")
            self._delete(key, gc=policy != "Orphan")
        elif request.method in (kmock.method.PATCH, kmock.method.PUT):
            self._update(request, key)
        # POST to a named URL is not a thing in Kubernetes: let the fallbacks answer 404.

    def _update(self, request: kmock.Request, key: tuple[kmock.resource, str | None, str]) -> None:
        old = self._live(key)
        data = request.data
        has_status = self._has_status(key[0])
        if request.subresource not in (None, "status") or (request.subresource == "status" and not has_status):
            raise kmock.KubernetesNotFoundError()
        try:
            if request.method == kmock.method.PUT:
                if not isinstance(data, dict):
                    raise ValueError("a JSON object is expected")
                new = copy.deepcopy(data)
            elif isinstance(data, list):  # application/json-patch+json
                new = jsonpatch.apply_patch(old, data, in_place=False)
            elif isinstance(data, dict):  # merge-patch (strategic merge is treated the same)
                new = dict(dicts.merge_patch_dict(old, data))
            else:
                raise ValueError("a JSON patch is expected")
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, ValueError, TypeError) as e:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e
        expected_rv = (data.get("metadata") or {}).get("resourceVersion") if isinstance(data, dict) else None
        if expected_rv and expected_rv != old["metadata"]["resourceVersion"]:
            raise kmock.KubernetesError(
                status=409,
                reason="Conflict",
                message="the object has been modified; please apply your changes to the latest version",
            )

        # Only the status via /status; never the status via the main endpoint (if it has /status).
        if has_status and request.subresource == "status":
            new = dict(old, status=new.get("status"))
        elif has_status:
            new = dict(new, status=old.get("status"))
        if new.get("status") is None:
            new.pop("status", None)

        # System-managed metadata cannot be changed by clients.
        meta = new["metadata"] = dict(new.get("metadata") or {})
        for field in (
            "uid",
            "name",
            "namespace",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)

        if new == old:
            return  # a no-op write: no new resourceVersion, no event (as in Kubernetes)
        if _essence(new) != _essence(old):
            meta["generation"] = old["metadata"].get("generation", 0) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, new)
        else:
            self._store(key, new, "MODIFIED")

    # ---------------------------------------------------------------- rendering (kmock's fallbacks)

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        meta = request.data["metadata"]
        key = (request.resource, meta.get("namespace"), meta["name"])
        response = kmock.Response(status=201, payload=copy.deepcopy(self._objects[key].last.raw))  # type: ignore[attr-defined]
        return response

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        resource = request.resource
        assert resource is not None
        if resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        watch = _Watch(resource, request.namespace, parse_label_selector(request.params.get("labelSelector")), request)
        items = [
            copy.deepcopy(obj.raw)
            for (res, _, _), obj in self._objects.items()
            if not obj.deleted and watch.sees(res, obj.raw)
        ]
        info = self._info(resource)
        return {
            "apiVersion": f"{resource.group}/{resource.version}" if resource.group else resource.version,
            "kind": f"{info.kind if info is not None and info.kind else 'Object'}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        yield b""  # send the headers now, even if nothing happens for a while
        assert request.resource is not None
        since = request.params.get("resourceVersion") or "0"
        timeout = float(request.params["timeoutSeconds"]) if request.params.get("timeoutSeconds") else None
        watch = _Watch(
            request.resource, request.namespace, parse_label_selector(request.params.get("labelSelector")), request
        )
        if not since.isdigit():
            yield {
                "type": "ERROR",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "status": "Failure",
                    "code": 410,
                    "reason": "Expired",
                    "message": "too old",
                },
            }
            return

        # Subscribe first, then take the backlog, both atomically: no event is lost or duplicated.
        self._watches.add(watch)
        try:
            backlog: list[dict[str, Any]]
            if since == "0":  # the current state as synthetic ADDED events
                backlog = [
                    {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                    for (res, _, _), obj in self._objects.items()
                    if not obj.deleted and watch.sees(res, obj.raw)
                ]
                backlog.sort(key=lambda e: int(e["object"]["metadata"].get("resourceVersion", 0)))
            else:
                backlog = [
                    event for rv, res, event in self._log if rv > int(since) and watch.sees(res, event["object"])
                ]
            for event in backlog:
                yield event

            deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
            while True:
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if remaining is not None and remaining <= 0:
                    return  # a server-side timeout: a graceful end of the stream
                try:
                    item = await asyncio.wait_for(watch.queue.get(), remaining)
                except TimeoutError:
                    return
                if item is _DROP:
                    raw = request._raw_request
                    if raw is not None and raw.transport is not None:
                        raw.transport.close()  # an abrupt cut, as with a dying apiserver or LB
                    return
                yield item
        finally:
            self._watches.discard(watch)

    def _drop_watches(self) -> int:
        watches = list(self._watches)
        for watch in watches:
            watch.queue.put_nowait(_DROP)
        return len(watches)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def wait_until(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout: float = 10,
    interval: float = 0.02,
    message: str = "the condition",
) -> Any:
    """Poll a (sync or async) predicate until it returns something truthy; return it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"Timed out after {timeout}s waiting for {message}.")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def serve(*, host: str = "127.0.0.1", port: int | None = None) -> AsyncIterator[KubeEmulator]:
    """
    Run a :class:`KubeEmulator` on a (free, by default) loopback port in its own thread & loop.

    Talk to it over HTTP (``kube.base_url``); the test helpers of the emulator are thread-safe.
    kmock's DSL reactions (``kube['get /x'] << 500``) work too, but not its live streams.
    """
    ready: concurrent.futures.Future[tuple[KubeEmulator, asyncio.AbstractEventLoop, asyncio.Event]]
    ready = concurrent.futures.Future()

    async def main() -> None:
        stop = asyncio.Event()
        try:
            async with KubeEmulator() as kube, kmock.Server(kube, host=host, port=port):
                kube._loop = asyncio.get_running_loop()
                ready.set_result((kube, kube._loop, stop))
                await stop.wait()
                kube._drop_watches()
                await asyncio.sleep(0)  # let the watch handlers see it
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            raise

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="kmock-emulator", daemon=True)
    thread.start()
    kube, loop, stop = await asyncio.wrap_future(ready)
    try:
        yield kube
    finally:
        loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join, 30)


# ------------------------------------------------------------------------------ kopf side

_SERVER_URL: contextvars.ContextVar[str] = contextvars.ContextVar("kmock_harness_server_url")
_LOGIN_INSTALLED: weakref.WeakSet[kopf.OperatorRegistry] = weakref.WeakSet()


async def _login(**_: Any) -> kopf.ConnectionInfo:
    # The URL comes from the context of the operator's task, so one registry can be reused.
    return kopf.ConnectionInfo(server=_SERVER_URL.get(), insecure=True, priority=1_000_000)


def operator_settings() -> kopf.OperatorSettings:
    """kopf settings for tests: short backoffs and timeouts, annotation-based progress, events on."""
    settings = kopf.OperatorSettings()
    settings.process.ultimate_exiting_timeout = None  # never SIGKILL the test process
    settings.posting.enabled = True
    settings.posting.level = logging.INFO
    settings.networking.request_timeout = 10
    settings.networking.connect_timeout = 2
    settings.networking.error_backoffs = [0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 1.0]
    settings.watching.connect_timeout = 2
    settings.watching.reconnect_backoff = 0.05
    settings.watching.inactivity_timeout = 60
    settings.queueing.idle_timeout = 1.0
    settings.queueing.exit_timeout = 1.0
    settings.queueing.error_delays = [0.1, 0.2, 0.5, 1.0]
    settings.execution.default_backoff = 0.5  # handler retries after arbitrary exceptions
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    settings.persistence.consistency_timeout = 2
    return settings


@contextlib.asynccontextmanager
async def run_operator(
    registry: kopf.OperatorRegistry,
    server_url: str,
    *,
    settings: kopf.OperatorSettings | None = None,
    memo: object | None = None,
    startup_timeout: float = 10,
    shutdown_timeout: float = 10,
    peering_name: str | None = None,
    priority: int = 0,
    identity: str | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    """
    Run ``kopf.operator(registry=…, standalone=True, clusterwide=True)`` in the current loop.

    A ``@kopf.on.login`` handler pointing to ``server_url`` is added to the registry (once).
    With ``peering_name`` the operator joins that (cluster) peering with ``priority`` under
    ``identity`` instead of running standalone.  Waits for kopf's readiness on entry; on exit, sets the stop-flag and awaits the operator
    (cancelling it after ``shutdown_timeout``).  If the operator crashed, its error is re-raised.
    """
    if registry not in _LOGIN_INSTALLED:
        kopf.on.login(registry=registry, id="kmock-harness-login")(_login)
        _LOGIN_INSTALLED.add(registry)
    settings = settings if settings is not None else operator_settings()
    settings.process.ultimate_exiting_timeout = None
    stop_flag = asyncio.Event()
    ready_flag = asyncio.Event()
    context = contextvars.copy_context()
    context.run(_SERVER_URL.set, server_url.rstrip("/"))
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            memo=memo,
            standalone=peering_name is None,
            clusterwide=True,
            peering_name=peering_name,
            priority=priority,
            identity=kopf.Identity(identity) if identity else None,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        ),
        name="kopf operator under test",
        context=context,
    )
    try:
        ready = asyncio.create_task(ready_flag.wait())
        await asyncio.wait({task, ready}, timeout=startup_timeout, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            if task.done():
                task.result()  # re-raise the start-up failure
            raise TimeoutError(f"kopf was not ready in {startup_timeout}s")
        yield task
    finally:
        stop_flag.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), shutdown_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise TimeoutError(f"kopf did not stop in {shutdown_timeout}s") from None


async def fetch(api: aiohttp.ClientSession, path: str) -> dict[str, Any] | None:
    """GET an object through the emulator's HTTP API; None when it does not exist."""
    async with api.get(path) as resp:
        if resp.status == 404:
            return None
        assert resp.status == 200, await resp.text()
        return await resp.json()
