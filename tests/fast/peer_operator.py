"""One operator replica for the O12 peering test, as its own process so that it can be killed:
`python -m tests.fast.peer_operator URL PRIORITY IDENTITY`.

It runs the real handlers (kubetune.operator.handlers.register) against the emulator at URL,
in the cluster-wide kopf peering `kubetune` with the given priority, and a short peering lifetime
so that a killed leader's record expires in seconds rather than a minute.
"""

from __future__ import annotations

import sys
from typing import Any

import kopf
from kubetune.operator import handlers
from kubetune.operator.__main__ import PEERING_NAME
from kubetune.operator.settings import OperatorSettings

PEERING_LIFETIME_SECONDS = 3


def main(url: str, priority: int, identity: str) -> None:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, OperatorSettings(metrics_scrape_interval_seconds=0.5, peering=True), api_url=url)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.lifetime = PEERING_LIFETIME_SECONDS
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()

    kopf.run(
        registry=registry,
        clusterwide=True,
        standalone=False,
        peering_name=PEERING_NAME,
        priority=priority,
        identity=identity,
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
