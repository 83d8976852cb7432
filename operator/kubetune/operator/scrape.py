"""Reading a trainer pod's /metrics page: bounded in bytes, time and whom it talks to (RELIABILITY O16).

The page comes from a container running an image the user chose, so it is hostile input. A
200 MiB page read with `resp.text()` took the operator from 107 to 508 MiB (its limit is 512Mi):
here the body is streamed and abandoned past `SCRAPE_MAX_BYTES`, a slow server is cut off after
`SCRAPE_TIMEOUT_SECONDS` in all, no redirect is followed, no compression is asked for or
accepted (a gzip bomb would multiply the cap), and only pods the trainer Job controls
(`reconcile.owned_pods`) at an IP literal (IPv4 or IPv6, never a host name) are asked.
Every refusal counts as a scrape failure; the next timer tick tries again.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
from collections.abc import Iterable
from typing import Any

import aiohttp
from kubetune.operator import reconcile
from kubetune.operator.metrics import METRICS

SCRAPE_TIMEOUT_SECONDS = 2.0
"""The whole exchange with one pod: connect, headers and body."""

SCRAPE_MAX_BYTES = 1 << 20
"""The trainer's page is a few KiB; more than this is refused, not truncated."""

SCRAPE_CONCURRENCY = 8
"""Scrapes in flight at once across every job: timers of jobs created together tick together,
and each scrape may hold up to SCRAPE_MAX_BYTES."""

_CHUNK_BYTES = 64 * 1024
_slots: dict[Any, asyncio.Semaphore] = {}


def _slot() -> asyncio.Semaphore:
    """One semaphore per event loop (tests run several operators, each in its own loop)."""
    loop = asyncio.get_running_loop()
    if loop not in _slots:
        _slots.clear()  # an old loop's semaphore is of no use (and must not be awaited) in a new one
        _slots[loop] = asyncio.Semaphore(SCRAPE_CONCURRENCY)
    return _slots[loop]


_MAX_LINES = 2000  # the trainer exports a few dozen series


class ScrapeRefused(Exception):
    """The pod's answer is not a metrics page the operator will read."""


def metrics_url(pod: Any, port: int) -> str | None:
    """`http://IP:port/metrics` for the pod's `status.podIP`; an IPv6 address in brackets.
    None when the pod has no IP yet. Raises `ScrapeRefused` when the IP is not an IP literal
    (a host name would be resolved, and could name anything) or the port is out of range."""
    ip = reconcile._get(pod, "status", "podIP")
    if ip is None or ip == "":
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ScrapeRefused(f"port {port!r} is not a TCP port")
    try:
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else None
    except ValueError:
        address = None
    if address is None or (isinstance(address, ipaddress.IPv6Address) and address.scope_id):
        raise ScrapeRefused("status.podIP is not an IP address")
    host = f"[{address.compressed}]" if isinstance(address, ipaddress.IPv6Address) else address.compressed
    return f"http://{host}:{port}/metrics"


async def read_page(session: aiohttp.ClientSession, url: str, max_bytes: int = SCRAPE_MAX_BYTES) -> str:
    """The body at `url` as text; `ScrapeRefused` when it is not a 200, is compressed, or has
    (or announces) more than `max_bytes`. Never holds more than `max_bytes` of it."""
    async with session.get(url, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as resp:
        if resp.status != 200:
            raise ScrapeRefused(f"HTTP {resp.status}")
        if resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
            raise ScrapeRefused("a compressed page")
        if resp.content_length is not None and resp.content_length > max_bytes:
            resp.close()  # do not read, nor drain, what was announced
            raise ScrapeRefused(f"Content-Length {resp.content_length} > {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        while chunk := await resp.content.read(min(_CHUNK_BYTES, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                resp.close()
                raise ScrapeRefused(f"more than {max_bytes} bytes")
        return b"".join(chunks).decode("utf-8", errors="replace")


def _relevant(text: str) -> str:
    """The trainer's own lines, at most `_MAX_LINES`: the parser's time (about 25 µs a line,
    on the event loop) stays bounded whatever else a page of up to 1 MiB carries."""
    prefix = reconcile.METRICS_PREFIX
    heads = (prefix, f"# HELP {prefix}", f"# TYPE {prefix}")
    kept = []
    for line in io.StringIO(text):  # lazily: no list of every line of a page of tiny lines
        if line.startswith(heads):
            kept.append(line if line.endswith("\n") else line + "\n")
            if len(kept) >= _MAX_LINES:
                break
    return "".join(kept)


async def scrape(pods: Iterable[Any], port: int, *, owner_uid: str | None = None) -> dict[str, float | str] | None:
    """The trainer's series (`reconcile.parse_metrics`) from the first running pod that answers;
    None when none does. With `owner_uid`, only pods whose controller is the Job with that uid
    are asked (the handler should also pass only `reconcile.owned_pods`)."""
    for pod in pods:
        if owner_uid is not None and not reconcile.controlled_by_job(pod, owner_uid):
            continue
        if reconcile._get(pod, "status", "phase") != "Running":
            continue
        try:
            url = metrics_url(pod, port)
            if url is None:
                continue
            timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
            async with _slot(), aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
                # aiohttp's total timeout, and a hard stop around it for a server that trickles.
                text = await asyncio.wait_for(read_page(session, url), SCRAPE_TIMEOUT_SECONDS + 0.5)
        except (TimeoutError, ScrapeRefused, aiohttp.ClientError, OSError, ValueError):
            METRICS.scrape_failure()
            continue
        return reconcile.parse_metrics(_relevant(text))
    return None
