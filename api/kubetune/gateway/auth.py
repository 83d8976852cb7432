"""Who is calling `kubetune api`: bearer API keys, each mapped to one namespace, and optionally
Kubernetes tokens checked by the API server.

**API keys** come from an *access file* (YAML). On a cluster it is the key `access.yaml` of a
Secret the chart mounts into the gateway pod (`gateway.auth.secretName`), so the gateway needs no
permission on Secrets at all; on a laptop it is any file (`kubetune api --keys FILE`). The file is
read again whenever it changes (the kubelet swaps a mounted Secret in place), so keys are rotated
by editing the Secret. Format::

    keys:
      - name: team-a-ci              # a label for logs and audits, never the key itself
        sha256: 9f86d081…            # sha256 hex of the key (or `key: sk-…` in plain text)
        namespace: team-a            # every file and job of this key lives in this namespace
        organization: org-team-a     # the job objects' organization_id (default org-<namespace>)
    webhooks:                        # optional, see kubetune.gateway.webhooks
      - namespace: team-a
        url: https://hooks.example.com/kubetune
        secret: whsec_…

A presented key is hashed and compared with *every* configured digest by `hmac.compare_digest`
without stopping at a match, so the time taken says nothing about which key, or how much of one,
was right.

**Kubernetes tokens** (`gateway.auth.kubernetesTokens`): a bearer token that is no configured key
is sent to the API server as a TokenReview; the namespace is the `OpenAI-Project` header (the
client's `project=`), or the ServiceAccount's own namespace; a SubjectAccessReview then asks
whether that user may `list` (reads) or `create` (writes) finetunejobs.kubetune.io there. Answers
are cached for `cache_seconds` under the token's hash.

Failures are OpenAI's envelopes: 401 (no or an unknown key, `invalid_api_key`) and 403 (a valid
identity without access to the namespace, `permission_denied`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from kubetune.gateway.backend import Forbidden, Tenant, Unauthorized, Unavailable
from kubetune.gateway.webhooks import WebhookConfig
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

log = logging.getLogger(__name__)

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ACCESS_FILE_KEY = "access.yaml"
"""The key of the chart's Secret that holds the access file."""
PROJECT_HEADER = "openai-project"
"""The header the official client sends for `OpenAI(project=...)`: the namespace of a Kubernetes token."""
GROUP, PLURAL = "kubetune.io", "finetunejobs"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

REQUEST_METHOD: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "kubetune_gateway_request_method", default=None
)
"""The HTTP method of the request being answered (set by `RequestMethodMiddleware`): a caller that
passes only the headers still gets the right SubjectAccessReview verb."""

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


class AccessFileError(Exception):
    """The access file cannot be used; the message names FILE:LINE and the field."""


# ------------------------------------------------------------------------------ the file


class ApiKey(BaseModel):
    """One API key of the access file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="A label for logs and audits (never the key).",
    )
    key: Optional[SecretStr] = Field(
        default=None, min_length=16, description="The key in plain text (at least 16 characters)."
    )
    sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="sha256 hex digest of the key.")
    namespace: str = Field(max_length=63, pattern=DNS_LABEL, description="The namespace this key acts in.")
    organization: Optional[str] = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_]*$",
        description="organization_id of this key's jobs (default org-<namespace>).",
    )

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("set exactly one of `key` (the key in plain text) and `sha256` (its sha256 hex digest)")
        return self

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()

    def tenant(self) -> Tenant:
        return Tenant(
            namespace=self.namespace, organization_id=self.organization or f"org-{self.namespace}", key_id=self.name
        )


class AccessConfig(BaseModel):
    """The access file: API keys and per-namespace webhooks."""

    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list, description="API keys, each acting in one namespace.")
    webhooks: list[WebhookConfig] = Field(
        default_factory=list, description="Webhook endpoints, at most one per namespace."
    )

    @model_validator(mode="after")
    def _unique(self) -> AccessConfig:
        names = [k.name for k in self.keys]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"keys[{i}].name: {name!r} is used twice; give every key its own name")
        digests = [k.digest() for k in self.keys]
        for i, digest in enumerate(digests):
            if digest in digests[:i]:
                raise ValueError(
                    f"keys[{i}]: the same key as keys[{digests.index(digest)}]; a key maps to one namespace"
                )
        spaces = [w.namespace for w in self.webhooks]
        for i, ns in enumerate(spaces):
            if ns in spaces[:i]:
                raise ValueError(f"webhooks[{i}].namespace: {ns!r} has two webhooks; keep one per namespace")
        return self

    def webhook(self, namespace: str) -> Optional[WebhookConfig]:
        return next((w for w in self.webhooks if w.namespace == namespace), None)


def _line_of(root: Optional[yaml.Node], loc: tuple[Any, ...]) -> Optional[int]:
    """The 1-based line of the node at `loc` (a pydantic error location) in a composed YAML tree."""
    node, line = root, (root.start_mark.line + 1) if root is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if match is None:
                break
            node, line = match[1], match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_access(text: str, source: str = "<access file>") -> AccessConfig:
    """The access file's contents as an AccessConfig, or AccessFileError naming SOURCE:LINE and the field."""
    from kubetune.api.manifest import Loader  # YAML as kubectl reads it: duplicate keys are errors

    try:
        root = yaml.compose(text, Loader=Loader)
        data = Loader(text).construct_document(root) if root is not None else {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise AccessFileError(
            f"{where}: invalid YAML: {' '.join(x for x in (err.context, err.problem) if x)}"
        ) from None
    except yaml.YAMLError as err:
        raise AccessFileError(f"{source}: invalid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AccessFileError(f"{source}:1: expected a mapping with `keys:` (and optionally `webhooks:`)")
    try:
        return AccessConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(p for p in e["loc"])
            field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
            line = _line_of(root, loc)
            message = e["msg"].removeprefix("Value error, ")
            problems.append(f"{source}:{line or 1}: {field or '(top level)'}: {message}")
        raise AccessFileError("\n".join(problems)) from None


class AccessFile:
    """An access file on disk, read again when it changes (mtime, size or inode).

    A change that does not parse is logged and the previous contents stay in force: a typo while
    rotating keys must not lock every tenant out. The first read must succeed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: Optional[tuple[int, int, int]] = None
        self._config = self._read()

    def _signature(self) -> tuple[int, int, int]:
        st = self.path.stat()  # follows the kubelet's ..data symlink
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> AccessConfig:
        try:
            stamp = self._signature()
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AccessFileError(f"{self.path}: no such file (the access file with `keys:`)") from None
        except (OSError, UnicodeDecodeError) as err:
            raise AccessFileError(f"{self.path}: cannot read: {err}") from None
        config = parse_access(text, str(self.path))
        self._stamp = stamp
        return config

    @property
    def config(self) -> AccessConfig:
        try:
            changed = self._signature() != self._stamp
        except OSError:
            changed = False  # mid-swap or gone: keep what we have
        if changed:
            try:
                self._config = self._read()
                log.info("access file %s reloaded: %d key(s)", self.path, len(self._config.keys))
            except AccessFileError as err:
                log.error("access file changed but is not usable, keeping the previous keys: %s", err)
                try:
                    self._stamp = self._signature()  # do not re-read the same broken file on every request
                except OSError:
                    pass
        return self._config


# ------------------------------------------------------------------------------ tokens


def bearer(headers: Mapping[str, str]) -> Optional[str]:
    """The bearer credential of `Authorization`, or None when there is none."""
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
    if not value:
        return None
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    return next((v for k, v in headers.items() if k.lower() == name), None)


def _masked(key: str) -> str:
    return f"{key[:3]}***{key[-4:]}" if len(key) >= 12 else "***"


@dataclass(frozen=True)
class _Review:
    user: str
    groups: tuple[str, ...]
    uid: str
    extra: tuple[tuple[str, tuple[str, ...]], ...]


class TokenReviewer:
    """Kubernetes bearer tokens: TokenReview for who, SubjectAccessReview for what.

    `api_client` is a `kubernetes.client.ApiClient` (the gateway's own identity, which needs
    `create` on tokenreviews and subjectaccessreviews: the chart binds `system:auth-delegator`).
    Calls run in a thread (the client is synchronous)."""

    def __init__(self, api_client: Any, *, cache_seconds: float = 30.0, cache_size: int = 4096) -> None:
        self.api_client = api_client
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self._reviews: OrderedDict[bytes, tuple[float, Optional[_Review]]] = OrderedDict()
        self._access: OrderedDict[tuple[bytes, str, str], tuple[float, bool, str]] = OrderedDict()

    def _cached(self, cache: OrderedDict[Any, Any], key: Any) -> Any:
        hit = cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            cache.move_to_end(key)
            return hit
        cache.pop(key, None)
        return None

    def _store(self, cache: OrderedDict[Any, Any], key: Any, value: tuple[Any, ...]) -> None:
        cache[key] = (time.monotonic() + self.cache_seconds, *value)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)

    def _token_review(self, token: str) -> Optional[_Review]:
        from kubernetes import client

        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        result = client.AuthenticationV1Api(self.api_client).create_token_review(body)
        status = result.status
        if status is None or not status.authenticated or status.user is None:
            return None
        user = status.user
        extra = tuple(sorted((k, tuple(v or ())) for k, v in (user.extra or {}).items()))
        return _Review(user.username or "", tuple(user.groups or ()), user.uid or "", extra)

    def _access_review(self, review: _Review, namespace: str, verb: str) -> tuple[bool, str]:
        from kubernetes import client

        spec = client.V1SubjectAccessReviewSpec(
            user=review.user,
            groups=list(review.groups),
            uid=review.uid or None,
            extra={k: list(v) for k, v in review.extra} or None,
            resource_attributes=client.V1ResourceAttributes(
                group=GROUP, resource=PLURAL, namespace=namespace, verb=verb
            ),
        )
        result = client.AuthorizationV1Api(self.api_client).create_subject_access_review(
            client.V1SubjectAccessReview(spec=spec)
        )
        status = result.status
        return bool(status and status.allowed), (status.reason or "") if status else ""

    async def tenant(self, token: str, headers: Mapping[str, str], method: str) -> Optional[Tenant]:
        """The tenant of a Kubernetes token, None when the API server does not know the token,
        Forbidden when it does but the user may not use the namespace."""
        from kubernetes.client.exceptions import ApiException

        digest = hashlib.sha256(token.encode()).digest()
        try:
            hit = self._cached(self._reviews, digest)
            if hit is None:
                review = await asyncio.to_thread(self._token_review, token)
                self._store(self._reviews, digest, (review,))
            else:
                review = hit[1]
            if review is None:
                return None
            namespace = _header(headers, PROJECT_HEADER)
            sa = re.match(r"^system:serviceaccount:([^:]+):[^:]+$", review.user)
            if not namespace:
                if sa is None:
                    raise Forbidden(
                        f"{review.user!r} is no ServiceAccount: say which namespace to act in with the "
                        'OpenAI-Project header (project="NAMESPACE" in the openai client)',
                        param="OpenAI-Project",
                    )
                namespace = sa.group(1)
            if not re.match(DNS_LABEL, namespace) or len(namespace) > 63:
                raise Forbidden(
                    f"OpenAI-Project {namespace[:80]!r} is not a namespace name (a DNS label)", param="OpenAI-Project"
                )
            verb = "list" if method.upper() in READ_METHODS else "create"
            key = (digest, namespace, verb)
            hit = self._cached(self._access, key)
            if hit is None:
                allowed, reason = await asyncio.to_thread(self._access_review, review, namespace, verb)
                self._store(self._access, key, (allowed, reason))
            else:
                allowed, reason = hit[1], hit[2]
        except ApiException as err:
            if err.status in (401, 403):
                raise Unavailable(
                    "the gateway may not review tokens (its ServiceAccount needs create on tokenreviews "
                    "and subjectaccessreviews: the chart's system:auth-delegator binding)"
                ) from None
            raise Unavailable(
                f"the Kubernetes API server did not answer the token review (HTTP {err.status})", retry_after=1
            ) from None
        except OSError as err:
            raise Unavailable(
                f"the Kubernetes API server cannot be reached for the token review: {err}", retry_after=1
            ) from None
        if not allowed:
            because = f" ({reason})" if reason else ""
            raise Forbidden(
                f"{review.user!r} may not {verb} finetunejobs.kubetune.io in namespace {namespace!r}{because}; "
                "ask for a RoleBinding there (the chart aggregates FineTuneJob rights into the edit and "
                "view roles)"
            )
        return Tenant(namespace=namespace, organization_id=f"org-{namespace}", key_id=review.user)


# ------------------------------------------------------------------------------ the callable


class Authenticator:
    """`await authenticator(headers, method)` → the caller's Tenant, or Unauthorized / Forbidden.

    Sources: the access file's keys, then Kubernetes tokens when a `TokenReviewer` is given. Or,
    alone, `anonymous`: a laptop's `kubetune api --local` without keys, where every request is that
    tenant whatever key the client sends (the openai client insists on sending one)."""

    def __init__(
        self,
        access: Optional[AccessFile | AccessConfig] = None,
        *,
        tokens: Optional[TokenReviewer] = None,
        anonymous: Optional[Tenant] = None,
    ) -> None:
        if anonymous is not None and (access is not None or tokens is not None):
            raise ValueError("an anonymous tenant excludes keys and tokens: with keys, every caller needs one")
        if access is None and tokens is None and anonymous is None:
            raise ValueError(
                "no way to authenticate: give an access file, Kubernetes token reviews or an anonymous tenant"
            )
        self.access = access
        self.tokens = tokens
        self.anonymous = anonymous

    @property
    def config(self) -> AccessConfig:
        if isinstance(self.access, AccessFile):
            return self.access.config
        return self.access if self.access is not None else AccessConfig()

    def match_key(self, key: str) -> Optional[Tenant]:
        """The tenant of a configured key, compared in constant time against every key."""
        presented = hashlib.sha256(key.encode()).digest()
        found: Optional[ApiKey] = None
        for entry in self.config.keys:
            if hmac.compare_digest(presented, entry.digest()) and found is None:
                found = entry
        return found.tenant() if found is not None else None

    async def __call__(self, headers: Mapping[str, str], method: Optional[str] = None) -> Tenant:
        """`method` decides the access review's verb (list for reads, create for writes); unknown
        (not passed, no `RequestMethodMiddleware`) counts as a write, the stricter check."""
        method = method or REQUEST_METHOD.get() or "POST"
        if self.anonymous is not None:
            return self.anonymous
        key = bearer(headers)
        if key is None:
            raise Unauthorized(_NO_KEY, code=None)
        tenant = self.match_key(key) if self.access is not None else None
        if tenant is None and self.tokens is not None:
            tenant = await self.tokens.tenant(key, headers, method)
        if tenant is None:
            raise Unauthorized(
                f"Incorrect API key provided: {_masked(key)}. Ask your kubetune administrator for a key "
                "(the gateway's access file)" + (" or use a Kubernetes token" if self.tokens else "") + "."
            )
        return tenant

    authenticate = __call__


class RequestMethodMiddleware:
    """Pure ASGI middleware recording each request's method in `REQUEST_METHOD`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        token = REQUEST_METHOD.set(scope.get("method") if scope.get("type") == "http" else None)
        try:
            await self.app(scope, receive, send)
        finally:
            REQUEST_METHOD.reset(token)
