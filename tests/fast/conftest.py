"""Fixtures for the fast tier: kopf against the kmock-based emulator (tests/kmock_harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio

from tests.kmock_harness import KubeEmulator, serve


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """A fresh emulated Kubernetes API on a free loopback port; its URL is ``kube.base_url``."""
    async with serve() as emulator:
        yield emulator


@pytest_asyncio.fixture
async def api(kube: KubeEmulator) -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client for the emulator: ``await api.post('/apis/…', json=…)``."""
    async with aiohttp.ClientSession(base_url=kube.base_url) as session:
        yield session
