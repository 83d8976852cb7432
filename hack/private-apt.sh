# Sourced by the hack/build-*.sh scripts: Debian packages without touching the system's apt.
#
# debian_mirror          the mirror the machine already uses (first non-security "URIs:" of
#                        /etc/apt/sources.list.d/debian.sources), else the Debian CDN
# private_apt DIR LINE…  an apt configuration of its own in DIR (sources, lists, caches, an empty
#                        dpkg status), with LINE… as its sources.list ("{MIRROR}" and "{SIGNED}"
#                        are filled in), exported as APT_CONFIG; `apt-get update` is the caller's.
# Nothing under /etc/apt changes and nothing is installed: `apt-get download` + `dpkg -x` unpack
# packages into a private root. ("performed unsandboxed as root" warnings are harmless.)

debian_mirror() {
    local mirror=""
    if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        mirror="$(awk 'tolower($1)=="uris:" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    echo "${mirror:-http://deb.debian.org/debian}"
}

private_apt() {
    local dir="$1" line mirror signed="" keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    shift
    mirror="$(debian_mirror)"
    [[ -r "$keyring" ]] && signed="[signed-by=$keyring] "
    mkdir -p "$dir/sources.list.d" "$dir/state/lists/partial" "$dir/cache/archives/partial"
    : >"$dir/sources.list"
    for line in "$@"; do
        line="${line//\{MIRROR\}/$mirror}"
        echo "${line//\{SIGNED\}/$signed}" >>"$dir/sources.list"
    done
    cat >"$dir/apt.conf" <<CONF
Dir::Etc::SourceList "$dir/sources.list";
Dir::Etc::SourceParts "$dir/sources.list.d";
Dir::State "$dir/state";
Dir::State::Lists "$dir/state/lists";
Dir::State::status "$dir/state/status";
Dir::Cache "$dir/cache";
Dir::Cache::Archives "$dir/cache/archives";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
// Downloads land in root-owned private dirs; skip the _apt sandbox (harmless either way).
APT::Sandbox::User "root";
APT::Architecture "$(dpkg --print-architecture)";
// Do not run the system's update hooks (appstream, packagekit) for our private lists.
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
Acquire::Languages "none";
CONF
    : >"$dir/state/status"
    export APT_CONFIG="$dir/apt.conf"
}
