#!/usr/bin/env bash
# Build a current standalone CRD server (k8s.io/apiextensions-apiserver, Kubernetes 1.36 line)
# and fetch etcd 3.5, for kubetune's CEL test tier (tests/cluster_harness.py).
#
# Why: our committed CRD carries CEL `x-kubernetes-validations` rules, which only a Kubernetes
# >= 1.25 API server compiles and enforces; the kube-apiserver we can build (1.20, from bookworm)
# ignores them. No current kube-apiserver binary is obtainable here, but Debian sid ships the
# Kubernetes *libraries* as Go source packages, and `golang-k8s-apiextensions-apiserver-dev`
# contains the standalone CRD server's main package. Built in GOPATH mode against sid's other
# golang-*-dev packages and sid's Go, it is the real CRD validation code of Kubernetes 1.36:
# structural schemas, pruning, the status subresource, CEL type-checking, cost limits and rules.
# The test harness runs it aggregated behind the 1.20 kube-apiserver (see ../shared/TESTING.md).
#
# Result:  $CACHE/current/bin/apiextensions-apiserver and $CACHE/current/bin/etcd (+ VERSION)
#          CACHE = ${KUBETUNE_CRD_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/crd-server}
#          Each build lives in $CACHE/<apiextensions package version>-<go package version>/ and
#          `current` points at the last good one; the script prints the two paths.
#
# Fast path: when `current` exists and runs, nothing is downloaded (KUBETUNE_CRD_SERVER_REBUILD=1
# resolves sid again). Cold: ~320 Go source packages (≈300 MB) and ~7 minutes of `go build`.
#
# sid moves: a package transition can break the build. The script then names the Debian package
# and version whose files failed to compile (or that apt could not resolve), and falls back to
# the pinned copies made with exactly this recipe (../shared/bin, checked against its
# SHA256SUMS; KUBETUNE_PINNED_BIN overrides the directory), so CI never depends on sid's state of
# the day. KUBETUNE_CRD_SERVER_NO_FALLBACK=1 turns the fallback off (to see the breakage fail).
set -euo pipefail

CACHE="${KUBETUNE_CRD_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/crd-server}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SERVER_PKG=golang-k8s-apiextensions-apiserver-dev

runs() { "$1/bin/apiextensions-apiserver" --help >/dev/null 2>&1 && "$1/bin/etcd" --version >/dev/null 2>&1; }
print_paths() { echo "$CACHE/current/bin/apiextensions-apiserver"; echo "$CACHE/current/bin/etcd"; }

if [[ "${KUBETUNE_CRD_SERVER_REBUILD:-}" != 1 && -e "$CACHE/current" ]] && runs "$CACHE/current"; then
    print_paths
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
if [[ "${KUBETUNE_CRD_SERVER_REBUILD:-}" != 1 && -e "$CACHE/current" ]] && runs "$CACHE/current"; then
    print_paths
    exit 0
fi

START=$SECONDS
log() { echo "[build-crd-server +$((SECONDS - START))s] $*" >&2; }
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
cleanup() { chmod -R u+w "$WORK" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# Point `current` at a finished build directory (atomic: a new symlink renamed over the old one).
publish() {
    ln -sfn "$(basename "$1")" "$CACHE/.current.tmp.$$"
    mv -Tf "$CACHE/.current.tmp.$$" "$CACHE/current"
}

# The pinned copies (../shared/bin): used only when the build from sid fails.
fallback() {
    local why="$1"
    log "BUILD FAILED: $why"
    if [[ "${KUBETUNE_CRD_SERVER_NO_FALLBACK:-}" == 1 ]]; then
        log "KUBETUNE_CRD_SERVER_NO_FALLBACK=1: not falling back to the pinned binaries"
        exit 1
    fi
    local dir=""
    for candidate in "${KUBETUNE_PINNED_BIN:-}" "$REPO/../shared/bin" /work/shared/bin; do
        if [[ -n "$candidate" && -f "$candidate/SHA256SUMS" ]]; then dir="$candidate"; break; fi
    done
    [[ -n "$dir" ]] || { log "no pinned binaries found (set KUBETUNE_PINNED_BIN to a directory with SHA256SUMS)"; exit 1; }
    (cd "$dir" && sha256sum --quiet -c SHA256SUMS) || { log "pinned binaries in $dir do not match their SHA256SUMS"; exit 1; }
    local server etcd
    server="$(cd "$dir" && ls apiextensions-apiserver-v* | sort -V | tail -n1)"
    etcd="$(cd "$dir" && ls etcd-v* | sort -V | tail -n1)"
    local dest="$CACHE/pinned-${server#apiextensions-apiserver-}"
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp/bin"
    cp "$dir/$server" "$dest.tmp/bin/apiextensions-apiserver"
    cp "$dir/$etcd" "$dest.tmp/bin/etcd"
    chmod 0755 "$dest.tmp/bin/"*
    printf 'pinned copy from %s (%s, %s): the build from Debian sid failed: %s\n' "$dir" "$server" "$etcd" "$why" >"$dest.tmp/VERSION"
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
    runs "$dest" || { log "pinned binaries do not run"; exit 1; }
    publish "$dest"
    log "using the pinned $server and $etcd from $dir"
    print_paths
    exit 0
}

# ---------------------------------------------------------------------------------------------
# 1. Private apt configuration for sid (nothing under /etc/apt is touched).
# ---------------------------------------------------------------------------------------------
# shellcheck source=hack/private-apt.sh
source "$(dirname "$0")/private-apt.sh"
MIRROR="$(debian_mirror)"
private_apt "$WORK/apt" "deb {SIGNED}{MIRROR} sid main"

log "apt-get update (sid, private lists, mirror $MIRROR)"
apt-get -qq update || fallback "apt-get update of sid from $MIRROR failed"

pkgver() { apt-cache show --no-all-versions "$1" 2>/dev/null | awk '/^Version:/ {print $2; exit}'; }
SERVER_VER="$(pkgver "$SERVER_PKG")"
[[ -n "$SERVER_VER" ]] || fallback "sid has no $SERVER_PKG"
# sid's default Go: the golang-1.NN-go that golang-go depends on.
GO_PKG="$(apt-cache depends golang-go 2>/dev/null | awk '$1 ~ /Depends:/ && $2 ~ /^golang-1\.[0-9]+-go$/ {print $2; exit}')"
[[ -n "$GO_PKG" ]] || fallback "cannot tell sid's Go toolchain from golang-go's dependencies"
GO_VER="$(pkgver "$GO_PKG")"
GO_SRC="${GO_PKG%-go}-src"
BUILD_ID="$SERVER_VER-$GO_PKG-$GO_VER"
BUILD_ID="${BUILD_ID//[^A-Za-z0-9.+_-]/_}"
DEST="$CACHE/$BUILD_ID"
if [[ -d "$DEST" ]] && runs "$DEST"; then
    publish "$DEST"
    log "already built: $DEST"
    print_paths
    exit 0
fi
log "$SERVER_PKG $SERVER_VER with $GO_PKG $GO_VER"

# ---------------------------------------------------------------------------------------------
# 2. The Go sources the server imports: every golang-*-dev package in its dependency closure.
# ---------------------------------------------------------------------------------------------
mapfile -t DEPS < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "$SERVER_PKG" 2>/dev/null |
    awk '/^[a-z0-9]/ {print $1}' | grep -E '^golang-.*-dev$' | sort -u)
[[ ${#DEPS[@]} -gt 10 ]] || fallback "resolving the dependencies of $SERVER_PKG $SERVER_VER gave ${#DEPS[@]} packages"
# A dependency apt knows by name but has no version of (removed in a transition) is named here.
mapfile -t MISSING < <(comm -23 <(printf '%s\n' "${DEPS[@]}") \
    <(apt-cache show --no-all-versions "${DEPS[@]}" 2>/dev/null | awk '/^Package:/ {print $2}' | sort -u))
[[ ${#MISSING[@]} -eq 0 ]] || fallback "$SERVER_PKG $SERVER_VER depends on ${MISSING[*]}, which sid no longer has"
DEBS="$WORK/debs"
ROOT="$WORK/root"
mkdir -p "$DEBS" "$ROOT"
log "apt-get download ${#DEPS[@]} Go source packages + $GO_PKG $GO_SRC etcd-server"
(cd "$DEBS" && apt-get -qq download "${DEPS[@]}" "$GO_PKG" "$GO_SRC" etcd-server) ||
    fallback "apt-get download failed (see above for the package)"
for deb in "$DEBS"/*.deb; do
    dpkg -x "$deb" "$ROOT"
done
ETCD_VER="$(pkgver etcd-server)"

# ---------------------------------------------------------------------------------------------
# 3. GOPATH build (GO111MODULE=off: the Debian packages are the dependency set).
# ---------------------------------------------------------------------------------------------
GO_MINOR="${GO_PKG#golang-}"
export GOROOT="$ROOT/usr/lib/go-${GO_MINOR%-go}"
[[ -x "$GOROOT/bin/go" ]] || fallback "$GO_PKG $GO_VER has no go binary at $GOROOT/bin/go"
export GOPATH="$ROOT/usr/share/gocode"
export GOCACHE="$WORK/gocache" GO111MODULE=off CGO_ENABLED=0 GOFLAGS="" GOTOOLCHAIN=local
export PATH="$GOROOT/bin:$PATH"
K8S_MINOR="$(echo "$SERVER_VER" | sed -E 's/^[0-9]+://; s/^0\.([0-9]+)\.([0-9]+).*/\1/')"
K8S_PATCH="$(echo "$SERVER_VER" | sed -E 's/^0\.[0-9]+\.([0-9]+).*/\1/')"
K8S_VERSION="v1.$K8S_MINOR.$K8S_PATCH"
V=k8s.io/component-base/version
LDFLAGS="-s -w -X $V.gitVersion=$K8S_VERSION -X $V.gitMajor=1 -X $V.gitMinor=$K8S_MINOR -X $V.gitTreeState=archive"
STAGE="$WORK/stage"
mkdir -p "$STAGE/bin"
log "go build k8s.io/apiextensions-apiserver ($K8S_VERSION, $(go version))"
if ! go build -trimpath -ldflags "$LDFLAGS" -o "$STAGE/bin/apiextensions-apiserver" k8s.io/apiextensions-apiserver \
    >"$WORK/build.log" 2>&1; then
    tail -n 30 "$WORK/build.log" >&2
    # Name the Debian package (and version) that owns the first file the compiler complained about.
    first="$(grep -oE "$GOPATH/src/[^: ]+\.go" "$WORK/build.log" | head -n1 || true)"
    [[ -n "$first" ]] || first="$(grep -oE '^[^ :]+\.go' "$WORK/build.log" | head -n1 || true)"
    owner="unknown package"
    if [[ -n "$first" ]]; then
        rel="${first#"$ROOT"}"
        for deb in "$DEBS"/*.deb; do
            if dpkg-deb -c "$deb" | grep -qF ".${rel}"; then
                owner="$(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)"
                break
            fi
        done
    fi
    fallback "go build failed in ${first:-an unknown file} from $owner (building $SERVER_PKG $SERVER_VER with $GO_PKG $GO_VER)"
fi
cp "$ROOT/usr/bin/etcd" "$STAGE/bin/etcd"
chmod 0755 "$STAGE/bin/"*
for b in apiextensions-apiserver etcd; do
    flag=--help; [[ $b == etcd ]] && flag=--version
    if ! out="$("$STAGE/bin/$b" "$flag" 2>&1)"; then
        printf '%s\n' "$out" | tail -n 15 >&2
        [[ $b == etcd ]] && owner="etcd-server $ETCD_VER" || owner="$SERVER_PKG $SERVER_VER built with $GO_PKG $GO_VER"
        fallback "the built $b ($owner) does not run: $(printf '%s' "$out" | tail -n 1)"
    fi
done
printf '%s from Debian sid %s %s, %s %s; etcd-server %s\n' "$K8S_VERSION" "$SERVER_PKG" "$SERVER_VER" \
    "$GO_PKG" "$GO_VER" "$ETCD_VER" >"$STAGE/VERSION"

rm -rf "$DEST.tmp" && mv "$STAGE" "$DEST.tmp" && rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
publish "$DEST"
log "done in $((SECONDS - START)) s: $(cat "$DEST/VERSION")"
print_paths
