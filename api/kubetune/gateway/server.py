"""`kubetune api` on a cluster: the Kubernetes backend, API keys and tokens, webhooks, /metrics.

Configured by environment variables, which the chart's gateway Deployment sets from its values:

| variable | meaning |
|---|---|
| `KUBETUNE_API_STORAGE` | fsspec URL prefix for uploads and job outputs (required), e.g. `s3://models/kubetune-api` |
| `KUBETUNE_API_CREDENTIALS_SECRET` | `spec.output.credentialsSecret` of every job (a Secret in each tenant namespace) |
| `KUBETUNE_API_GPUS` | GPUs per job (default 1) |
| `KUBETUNE_API_CHECKPOINT_EVERY_STEPS` | `spec.checkpointing.everySteps` of every job (default: the CRD's) |
| `KUBETUNE_API_ACCESS_FILE` | the access file (keys and webhooks, kubetune.gateway.auth), e.g. the mounted Secret |
| `KUBETUNE_API_KUBERNETES_TOKENS` | `true`: also accept Kubernetes tokens (TokenReview + SubjectAccessReview) |
| `KUBETUNE_API_WEBHOOK_POLL_SECONDS` | how often namespaces with a webhook are polled for finished jobs (default 10) |
| `KUBECONFIG` | off-cluster only; in a pod the ServiceAccount is used |

`python -m kubetune.gateway.server --host 0.0.0.0 --port 8080` serves it (the chart's command);
`kube_app()` builds the ASGI app for tests and for `kubetune api`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

log = logging.getLogger(__name__)
TRUE = ("1", "true", "yes", "on")


class ConfigError(Exception):
    """A setting that cannot be used; the message names the variable and what to do."""


def _int(env: Mapping[str, str], name: str, default: Optional[int]) -> Optional[int]:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return value


def kube_app(env: Optional[Mapping[str, str]] = None, *, client: Any = None) -> Any:
    """The FastAPI app of the Kubernetes mode, from `env` (default: os.environ)."""
    from kubetune.gateway import metrics
    from kubetune.gateway.app import create_app
    from kubetune.gateway.auth import AccessFile, AccessFileError, Authenticator, RequestMethodMiddleware, TokenReviewer
    from kubetune.gateway.kube import KubeBackend, KubeSettings, api_client
    from kubetune.gateway.webhooks import WebhookSender

    env = os.environ if env is None else env
    storage = env.get("KUBETUNE_API_STORAGE", "")
    if not storage:
        raise ConfigError(
            "KUBETUNE_API_STORAGE is not set: name the object-store prefix for uploads and job outputs "
            "(the chart's gateway.storage.uri, e.g. s3://models/kubetune-api)"
        )
    try:
        settings = KubeSettings(
            storage=storage,
            credentials_secret=env.get("KUBETUNE_API_CREDENTIALS_SECRET") or None,
            gpus=_int(env, "KUBETUNE_API_GPUS", 1) or 0,
            checkpoint_every_steps=_int(env, "KUBETUNE_API_CHECKPOINT_EVERY_STEPS", None) or None,
            webhook_poll_seconds=float(env.get("KUBETUNE_API_WEBHOOK_POLL_SECONDS") or 10),
        )
    except ValueError as err:
        raise ConfigError(f"KUBETUNE_API_STORAGE: {err}") from None
    access_path = env.get("KUBETUNE_API_ACCESS_FILE") or None
    tokens = env.get("KUBETUNE_API_KUBERNETES_TOKENS", "").lower() in TRUE
    if access_path is None and not tokens:
        raise ConfigError(
            "no way to authenticate callers: set KUBETUNE_API_ACCESS_FILE (API keys; the chart mounts "
            "gateway.auth.secretName) or KUBETUNE_API_KUBERNETES_TOKENS=true"
        )
    try:
        access = AccessFile(access_path) if access_path else None
    except AccessFileError as err:
        raise ConfigError(str(err)) from None
    client = client if client is not None else api_client()
    gateway_metrics = metrics.GatewayMetrics()
    sender = WebhookSender(on_done=gateway_metrics.webhook_done, on_attempt=gateway_metrics.webhook_attempt)
    webhooks = (lambda: access.config.webhooks) if access is not None else None
    backend = KubeBackend(client, settings, webhooks=webhooks, sender=sender)
    authenticator = Authenticator(access, tokens=TokenReviewer(client) if tokens else None)
    app = create_app(backend, authenticator)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    metrics.install(app, gateway_metrics)
    app.add_middleware(RequestMethodMiddleware)
    return app


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.gateway.server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("KUBETUNE_API_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("KUBETUNE_API_PORT", "8080")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = kube_app()
    except ConfigError as err:
        print(f"kubetune api: {err}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
