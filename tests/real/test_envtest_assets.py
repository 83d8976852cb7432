"""KUBEBUILDER_ASSETS (the envtest convention) wins over the build cache, and never triggers a build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.k8s_harness import ApiServer, BinariesMissing, find_binaries


def test_assets_dir_is_used_and_nothing_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, apiserver: ApiServer
) -> None:
    real_apiserver, real_etcd = find_binaries()  # whatever the session uses
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "kube-apiserver").symlink_to(real_apiserver)
    (assets / "etcd").symlink_to(real_etcd)
    # An empty cache proves the cache is not consulted (and a build would have to write there).
    monkeypatch.setenv("KUBETUNE_K8S_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    assert find_binaries() == (assets / "kube-apiserver", assets / "etcd")
    with ApiServer() as server:
        assert server.startup_seconds is not None  # it started from the assets (no build: the cache stays empty)
    assert not (tmp_path / "empty-cache").exists()


def test_incomplete_assets_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    with pytest.raises(BinariesMissing, match="KUBEBUILDER_ASSETS=.* lacks executable"):
        find_binaries()
    assert os.listdir(tmp_path) == []
