"""`python -m kubetune.operator`: run the operator with the settings from `KUBETUNE_*` variables.

`run()` is also what `kubetune operator` calls, so the container entrypoint and the CLI start the
operator the same way: the handlers of `kubetune.operator.handlers` on kopf's default registry,
the watched namespaces (empty: the whole cluster) and peering from the arguments or settings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import kopf
from kubetune.operator import redaction
from kubetune.operator.settings import OperatorSettings

PEERING_NAME = "kubetune"


def liveness_endpoint(port: int, address: str = "0.0.0.0") -> str | None:
    """kopf's liveness URL on `address`:`port` (KUBETUNE_BIND_ADDRESS, KUBETUNE_HEALTH_PORT);
    None when the port is 0. An IPv6 address is bracketed."""
    if not port:
        return None
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/healthz"


def run(namespaces: Sequence[str] | None = None, peering: bool | None = None, liveness: bool = True) -> None:
    """Run the operator until it is stopped (SIGTERM/SIGINT)."""
    from kubetune.operator import handlers  # noqa: F401  (registers the handlers on the default registry)

    settings = OperatorSettings.from_env()
    formats = {f.name.lower(): f for f in kopf.LogFormat}
    if settings.log_format not in formats:
        raise SystemExit(f"KUBETUNE_LOG_FORMAT={settings.log_format!r}: use one of {', '.join(formats)}")
    # kopf logs nothing until configured: without this an operator pod's log stays empty. A
    # program that configured logging itself (a test harness, an embedding) keeps its set-up.
    if not logging.getLogger().handlers:
        kopf.configure(log_format=formats[settings.log_format])
    # Log lines and the Events kopf posts from them carry exception texts, which may quote a
    # URI with credentials: every record is redacted before any handler sees it (O10, O17).
    redaction.install()
    watched = list(settings.namespaces if namespaces is None else namespaces)
    peering = settings.peering if peering is None else peering
    kopf.run(
        registry=kopf.get_default_registry(),
        clusterwide=not watched,
        namespaces=watched,
        standalone=not peering,
        peering_name=PEERING_NAME if peering else None,
        priority=settings.peering_priority,
        liveness_endpoint=liveness_endpoint(settings.health_port, settings.listen_address()) if liveness else None,
    )


if __name__ == "__main__":
    run()
