#!/usr/bin/env bash
# Build the Debian root filesystem that stands in for the registry images our Dockerfiles start
# FROM, for kubetune's "cluster" test tier (tests/cluster/).
#
# Why: no image registry is reachable from our build machines (only PyPI, Debian apt and npm), so
# `python:3.11.11-slim-bookworm` (operator/Dockerfile) and `nvidia/cuda:…-runtime-ubuntu22.04`
# (trainer/Dockerfile) cannot be pulled. Debian's debootstrap builds an equivalent base from the
# apt mirror the machine already uses: bookworm minbase + python3 (3.11, like the python image),
# python3-venv, python-is-python3 (the operator Dockerfile calls `python`) and ca-certificates.
# The machine's extra CA certificates (/usr/local/share/ca-certificates: what the host's pip
# trusts, e.g. an egress proxy's) are added so pip and apt work inside `docker build`; PIP_CERT
# and friends are set by `docker import --change` in tests/cluster_harness.py.
# The CUDA base has no Debian equivalent: the cluster tier builds the trainer image with
# `--build-arg BASE_IMAGE=` this base and the local CPU torch wheel (the tests say so).
#
# Result:  $KUBETUNE_IMAGE_CACHE/debian-bookworm-python.tar (a rootfs tarball for `docker import`)
#          KUBETUNE_IMAGE_CACHE defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/images
#          The file name carries a key of the recipe below; a changed recipe builds a new one.
# Idempotent and atomic (staged, then renamed); about 2 minutes cold. Needs root (debootstrap).
set -euo pipefail

CACHE="${KUBETUNE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/images}"
SUITE=bookworm
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
# The key changes with the recipe and with the extra CA certificates the base must trust.
CA_DIR=/usr/local/share/ca-certificates
CA_SUM="$(cat "$CA_DIR"/*.crt 2>/dev/null | sha256sum | cut -c1-12)"
KEY="$(printf '%s\n' "$SUITE" "$PACKAGES" "$CA_SUM" v1 | sha256sum | cut -c1-12)"
OUT="$CACHE/debian-$SUITE-python-$KEY.tar"

if [[ -s "$OUT" ]]; then
    echo "$OUT"
    exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
if [[ -s "$OUT" ]]; then
    echo "$OUT"
    exit 0
fi

START=$SECONDS
log() { echo "[build-base-images +$((SECONDS - START))s] $*" >&2; }
command -v debootstrap >/dev/null || {
    log "debootstrap is missing: apt-get install debootstrap (hack/cluster-deps.sh does)"
    exit 1
}

WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
cleanup() { rm -rf "$WORK"; rm -f "$OUT.tmp.$$"; }
trap cleanup EXIT

# shellcheck source=hack/private-apt.sh
source "$(dirname "$0")/private-apt.sh"
MIRROR="$(debian_mirror)"

ROOTFS="$WORK/rootfs"
log "debootstrap --variant=minbase $SUITE from $MIRROR (+$PACKAGES)"
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [[ -f "$ROOTFS/debootstrap/debootstrap.log" ]] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2
    log "debootstrap of $SUITE failed (packages: $PACKAGES, mirror: $MIRROR)"
    exit 1
fi

# The host's extra CA certificates, so pip and apt reach the same registries inside a build.
if compgen -G "$CA_DIR/*.crt" >/dev/null; then
    cp "$CA_DIR"/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    chroot "$ROOTFS" update-ca-certificates >/dev/null
fi
# Small image: no apt lists, caches or docs (a Dockerfile's `apt-get update` fetches lists again).
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/debootstrap
# apt sources as the image will see them (debootstrap writes a one-line sources.list).
echo "deb $MIRROR $SUITE main" >"$ROOTFS/etc/apt/sources.list"

tar --numeric-owner -C "$ROOTFS" -cf "$OUT.tmp.$$" .
mv -f "$OUT.tmp.$$" "$OUT"
log "done in $((SECONDS - START)) s: $(du -h "$OUT" | cut -f1) $OUT"
echo "$OUT"
