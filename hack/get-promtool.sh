#!/usr/bin/env bash
# Fetch promtool (from Debian's `prometheus` package) into a cache dir, without installing the
# package system-wide: `apt-get download` + `dpkg -x`. Used by the metrics-exposition test.
# Prints the path of the promtool binary. Idempotent.
set -euo pipefail
CACHE="${KUBETUNE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/tools}"
BIN="$CACHE/usr/bin/promtool"
if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"; exit 0
fi
if command -v promtool >/dev/null 2>&1; then
    command -v promtool; exit 0
fi
mkdir -p "$CACHE"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get download prometheus >/dev/null
fi
dpkg -x prometheus_*.deb "$work/root"
mkdir -p "$CACHE/usr/bin"
cp "$work/root/usr/bin/promtool" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
"$BIN" --version >/dev/null 2>&1
echo "$BIN"
