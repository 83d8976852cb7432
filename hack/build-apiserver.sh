#!/usr/bin/env bash
# Build the Kubernetes v1.20.2 control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, the pause binary) and fetch etcd, for kubetune's "real" test tiers.
#
# Why: no prebuilt kube-apiserver can be downloaded on our build machines (only PyPI, Debian apt
# and npm are reachable), but Debian bookworm ships the full upstream Kubernetes tree, with
# vendored dependencies, as the *source* package `kubernetes` (1.20.5+really1.20.2), and etcd as
# the binary package `etcd-server`. See /work/shared/TESTING.md, "Kubernetes API: two tiers".
#
# Result:  $KUBETUNE_K8S_CACHE/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,
#          etcd,pause}; KUBETUNE_K8S_CACHE defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/k8s-v1.20.2
#          kube-apiserver + etcd serve the API tier; the controller-manager (Job controller, garbage
#          collector, TTL controller), the scheduler and the kubelet make the cluster tier, whose pods
#          run in Docker with a sandbox created from `pause` (build/pause/linux/pause.c, gcc -static).
#
# Idempotent: if every binary exists and answers --version, it prints their paths and exits.
# A cold build takes ~10-15 minutes on 2 cores (one `go build` of the four commands, sharing
# the compile of the common packages). Nothing under /etc/apt is
# touched: apt runs with a private APT_CONFIG, sources.list and state/cache dirs inside a
# temporary build dir, which is deleted at the end (only bin/ is kept). Binaries are staged
# and renamed into place, so an interrupted build never leaves a half-written binary behind.
#
# Users with setup-envtest can skip all this: tests/k8s_harness.py honours KUBEBUILDER_ASSETS.
set -euo pipefail

CACHE="${KUBETUNE_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/k8s-v1.20.2}"
BIN="$CACHE/bin"

# ---------------------------------------------------------------------------------------------
# Fast path: already built.
# ---------------------------------------------------------------------------------------------
# Source patches the build applies, recorded in $BIN/.patches; a cache built without one of them
# is rebuilt (tests/real/test_apiserver_fidelity.py checks the behaviour they restore).
# The set of binaries is part of the key too: a cache from before the cluster tier is rebuilt.
PATCHES="reflect2-1.0.2 kube-openapi-230 components-cm-sched-kubelet-pause"
COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
binaries_ok() {
    local b
    for b in "${COMMANDS[@]}" etcd; do
        [[ -x "$BIN/$b" ]] && "$BIN/$b" --version >/dev/null 2>&1 || return 1
    done
    [[ -x "$BIN/pause" ]] || return 1
    [[ -f "$BIN/.patches" && "$(cat "$BIN/.patches")" == "$PATCHES" ]]
}
print_paths() {
    local b
    for b in "${COMMANDS[@]}" etcd pause; do echo "$BIN/$b"; done
}
if binaries_ok; then
    print_paths
    exit 0
fi

mkdir -p "$CACHE"
# Serialise concurrent builds (e.g. two test sessions starting at once); re-check after the lock.
exec 9>"$CACHE/.build.lock"
flock 9
if binaries_ok; then
    print_paths
    exit 0
fi

START=$SECONDS
log() { echo "[build-apiserver +$((SECONDS - START))s] $*" >&2; }

# Everything bulky lives here and is removed on exit, success or not.
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
cleanup() {
    chmod -R u+w "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
    rm -f "$BIN"/.*.tmp.$$
}
trap cleanup EXIT
log "build dir: $WORK"

# ---------------------------------------------------------------------------------------------
# 1. Private apt configuration (deb + deb-src for the mirror the system already uses).
# ---------------------------------------------------------------------------------------------
# shellcheck source=hack/private-apt.sh
source "$(dirname "$0")/private-apt.sh"
MIRROR="$(debian_mirror)"
SUITE=bookworm
private_apt "$WORK/apt" "deb {SIGNED}{MIRROR} $SUITE main" "deb-src {SIGNED}{MIRROR} $SUITE main"

log "apt-get update (private lists, mirror $MIRROR)"
apt-get -qq update

# ---------------------------------------------------------------------------------------------
# 2. Source package: download and unpack (applies Debian's patches).
# ---------------------------------------------------------------------------------------------
SRCDIR="$WORK/src"
mkdir -p "$SRCDIR"
log "apt-get source --download-only kubernetes"
(cd "$SRCDIR" && apt-get -qq source --download-only kubernetes)

# ---------------------------------------------------------------------------------------------
# 3. Build-time tools into a private root (never installed system-wide).
# ---------------------------------------------------------------------------------------------
ROOT="$WORK/root"
DEBS="$WORK/debs"
mkdir -p "$ROOT" "$DEBS"
PKGS=(golang-1.19-go golang-1.19-src rsync libpopt0 golang-github-modern-go-reflect2-dev etcd-server)
command -v dpkg-source >/dev/null || PKGS+=(dpkg-dev libdpkg-perl)
log "apt-get download ${PKGS[*]}"
(cd "$DEBS" && apt-get -qq download "${PKGS[@]}")
for deb in "$DEBS"/*.deb; do
    dpkg -x "$deb" "$ROOT"
done

if command -v dpkg-source >/dev/null; then
    DPKG_SOURCE=(dpkg-source)
else
    # dpkg-source is perl; point it at the private copy of its modules.
    DPKG_SOURCE=(env PERL5LIB="$ROOT/usr/share/perl5" perl "$ROOT/usr/bin/dpkg-source")
fi

log "dpkg-source -x"
DSC="$(ls "$SRCDIR"/kubernetes_*.dsc | head -n1)"
(cd "$SRCDIR" && "${DPKG_SOURCE[@]}" --no-check -x "$DSC" >/dev/null)
# The directory name follows the version (kubernetes-1.20.5+really1.20.2 today): glob it.
TREE="$(find "$SRCDIR" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
[[ -d "$TREE/cmd/kube-apiserver" ]] || { log "no kube-apiserver in $TREE"; exit 1; }
# Upstream version: Debian's "1.20.5+really1.20.2" means 1.20.2.
DEBVER="${TREE##*/kubernetes-}"
K8S_VERSION="v${DEBVER##*really}"
K8S_VERSION="${K8S_VERSION%%[-~]*}"
log "tree: $TREE (version $K8S_VERSION)"

# ---------------------------------------------------------------------------------------------
# 4. Go toolchain environment. GOPATH mode: the tree is vendored, modules would try the network.
# ---------------------------------------------------------------------------------------------
export GOROOT="$ROOT/usr/lib/go-1.19"
[[ -x "$GOROOT/bin/go" ]] || { log "no go in $GOROOT"; exit 1; }
MULTIARCH_LIBS="$(find "$ROOT/usr/lib" "$ROOT/lib" -maxdepth 1 -type d -name '*-linux-gnu*' 2>/dev/null | paste -sd: -)"
# rsync from the private root needs libpopt0 from there.
export PATH="$GOROOT/bin:$ROOT/usr/bin:$PATH"
export LD_LIBRARY_PATH="${MULTIARCH_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GOCACHE="$WORK/gocache"
export GOPATH="$WORK/gopath"
export GO111MODULE=off
export CGO_ENABLED=0
export GOFLAGS=""
export GOTOOLCHAIN=local
rsync --version >/dev/null || { log "private rsync does not run"; exit 1; }

# zz_generated.openapi.go is not in the tarball; kube's own make rule generates it.
log "make gen_openapi"
(cd "$TREE" && make gen_openapi >"$WORK/gen_openapi.log" 2>&1) || {
    tail -n 50 "$WORK/gen_openapi.log" >&2
    exit 1
}
[[ -f "$TREE/pkg/generated/openapi/zz_generated.openapi.go" ]] || { log "gen_openapi produced nothing"; exit 1; }

# Vendored reflect2 1.0.1 segfaults under Go >= 1.18 on the first custom-resource POST;
# Debian's 1.0.2 is API-compatible.
REFLECT2="$ROOT/usr/share/gocode/src/github.com/modern-go/reflect2"
[[ -d "$REFLECT2" ]] || { log "no reflect2 in private root"; exit 1; }
rm -rf "$TREE/vendor/github.com/modern-go/reflect2"
cp -a "$REFLECT2" "$TREE/vendor/github.com/modern-go/reflect2"

# kube-openapi#230 (released in 1.21): the vendored OpenAPI validator treats any zero value as
# null, `reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))`, which is
# always false under Go 1.15 (what released 1.20 binaries were built with) and true for "" under
# Go >= 1.16: custom resources with an empty string anywhere below the top level are refused
# ("must be of type string: \"null\""), which no released 1.20 apiserver does. Apply the upstream fix.
ZERO_CHECK='data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))'
mapfile -t ZERO_FILES < <(grep -rlF "$ZERO_CHECK" "$TREE/vendor" || true)
[[ ${#ZERO_FILES[@]} -gt 0 ]] || { log "kube-openapi zero-value check not found: patch kube-openapi-230 does not apply"; exit 1; }
for f in "${ZERO_FILES[@]}"; do
    log "patch kube-openapi-230: ${f#"$TREE"/}"
    sed -i "s/data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))/data == nil/" "$f"
done
! grep -rqF "$ZERO_CHECK" "$TREE/vendor" || { log "patch kube-openapi-230 left a zero-value check"; exit 1; }

# ---------------------------------------------------------------------------------------------
# 5. Build the commands inside a GOPATH whose src/k8s.io/kubernetes links to the tree.
# ---------------------------------------------------------------------------------------------
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$TREE" "$GOPATH/src/k8s.io/kubernetes"
STAGE="$WORK/stage"
mkdir -p "$STAGE"
MINOR="${K8S_VERSION#v*.}"
MINOR="${MINOR%%.*}"
LDFLAGS="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
    k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR"
    LDFLAGS+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
done
# One `go build` for all four commands: with -o DIR they share the compile of common packages.
PKGPATHS=()
for c in "${COMMANDS[@]}"; do PKGPATHS+=("./cmd/$c"); done
log "go build ${PKGPATHS[*]} ($(go version))"
(cd "$GOPATH/src/k8s.io/kubernetes" &&
    go build -trimpath -ldflags "$LDFLAGS" -o "$STAGE/" "${PKGPATHS[@]}")
# The pod sandbox's pause process, as upstream's build/pause builds it (no registry is reachable,
# so the cluster tier imports it as an image; see tests/cluster/).
PAUSE_SRC="$TREE/build/pause/linux/pause.c"
[[ -f "$PAUSE_SRC" ]] || { log "no $PAUSE_SRC in the tree"; exit 1; }
log "gcc -static pause.c"
gcc -Os -static -o "$STAGE/pause" "$PAUSE_SRC"
cp "$ROOT/usr/bin/etcd" "$STAGE/etcd"
for b in "${COMMANDS[@]}" etcd; do
    chmod 0755 "$STAGE/$b"
    "$STAGE/$b" --version >/dev/null || { log "$b built but does not run"; exit 1; }
done
chmod 0755 "$STAGE/pause"

# ---------------------------------------------------------------------------------------------
# 6. Move into place: copy next to the target, then rename (atomic within one filesystem).
# ---------------------------------------------------------------------------------------------
mkdir -p "$BIN"
for b in "${COMMANDS[@]}" etcd pause; do
    cp "$STAGE/$b" "$BIN/.$b.tmp.$$"
    mv -f "$BIN/.$b.tmp.$$" "$BIN/$b"
done
echo "$PATCHES" >"$BIN/.patches.tmp.$$"
mv -f "$BIN/.patches.tmp.$$" "$BIN/.patches"
log "done in $((SECONDS - START)) s: $("$BIN/kube-apiserver" --version), $("$BIN/etcd" --version | head -n1)"
print_paths
