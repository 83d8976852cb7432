#!/usr/bin/env bash
# Everything the test tiers need from outside PyPI, cached under ~/.cache/kubetune (`make tools`):
#
#   Debian packages  kubectl (kubernetes-client), docker.io (dockerd, containerd, runc), debootstrap, chromium
#   hack/build-apiserver.sh    the 1.20 control plane + etcd + pause   (~10-13 min cold, 2 cores)
#   hack/build-crd-server.sh   the 1.36 CRD server + etcd 3.5 from sid (~6 min cold)
#   hack/build-base-images.sh  the Debian base our images start FROM   (~3 min cold, network-bound)
#
# The base image (mostly downloads) runs beside the two Go builds (CPU-bound, one after the other).
# Warm: a few seconds. Each step's time is printed, and a failing step names itself.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
log() { echo "[cluster-tools +$((SECONDS - START))s] $*" >&2; }

missing=()
command -v kubectl >/dev/null || missing+=(kubernetes-client)
command -v dockerd >/dev/null || [[ -x /usr/sbin/dockerd ]] || missing+=(docker.io)
command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
# report.html is tested in a real browser (tests/trainer/test_evaluation.py, test_run.py): headless Chromium.
command -v chromium >/dev/null || missing+=(chromium)
if [[ ${#missing[@]} -gt 0 ]]; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No recommends: docker.io would pull in apparmor, git, … and start nothing (no systemd here:
    # the tests start their own dockerd on a private socket).
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

base_log="$(mktemp)"
bash hack/build-base-images.sh >"$base_log" 2>&1 &
base_pid=$!

step() {
    local t=$SECONDS
    if ! "$@" >/dev/null; then
        log "FAILED: $*"
        kill "$base_pid" 2>/dev/null || true
        exit 1
    fi
    log "$* ($((SECONDS - t)) s)"
}
step bash hack/build-apiserver.sh
step bash hack/build-crd-server.sh
if ! wait "$base_pid"; then
    cat "$base_log" >&2
    log "FAILED: hack/build-base-images.sh"
    exit 1
fi
rm -f "$base_log"
log "done in $((SECONDS - START)) s"
