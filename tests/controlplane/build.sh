#!/usr/bin/env bash
# Builds the local test control plane (etcd, kube-apiserver, kube-controller-manager) from the
# upstream Go modules pinned in go.mod/go.sum next to this script, into a cache outside the
# repository:
#
#   ${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}/controlplane/<key>/bin/{etcd,kube-apiserver,
#                                                                   kube-controller-manager}
#
# where <key> = k8s-<kubernetes version>-etcd-<etcd version>-<hash of go.mod, go.sum,
# etcd/main.go and the Go version>. Idempotent: once built, a run only prints the path.
# Concurrent callers wait on a lock instead of building twice; a build goes to a temporary
# directory that is renamed into place, so a half-built directory is never seen.
#
# Prints the bin directory as its only line on stdout; progress goes to stderr. The first
# build takes 10-30 minutes on a 2-core machine; later runs take well under a second.
set -euo pipefail

die() {
    echo "controlplane/build.sh: error: $*" >&2
    exit 1
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v go >/dev/null || die "the go command is not on PATH (Go >= 1.26 is needed)"
command -v flock >/dev/null || die "flock (util-linux) is not on PATH"

# Version of a module required in go.mod (first field after the path on its require line).
module_version() {
    awk -v m="$1" '($1 == m || ($1 == "require" && $2 == m)) && $0 !~ /=>/ {
        print ($1 == m ? $2 : $3); exit }' "$here/go.mod"
}

k8s_version="$(module_version k8s.io/kubernetes)"
etcd_version="$(module_version go.etcd.io/etcd/server/v3)"
[[ -n "$k8s_version" ]] || die "no k8s.io/kubernetes requirement found in $here/go.mod"
[[ -n "$etcd_version" ]] || die "no go.etcd.io/etcd/server/v3 requirement in $here/go.mod"

go_version="$(go env GOVERSION)"
hash="$(cat "$here/go.mod" "$here/go.sum" "$here/etcd/main.go" <(echo "$go_version") |
    sha256sum | cut -c1-12)"
key="k8s-${k8s_version}-etcd-${etcd_version}-${hash}"
root="${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}/controlplane"
dest="$root/$key"
binaries=(etcd kube-apiserver kube-controller-manager)

complete() {
    local b
    for b in "${binaries[@]}"; do
        [[ -x "$dest/bin/$b" ]] || return 1
    done
}

if complete; then
    echo "$dest/bin"
    exit 0
fi

mkdir -p "$root" || die "cannot create cache directory $root"
exec 9>"$root/$key.lock" || die "cannot open lock file $root/$key.lock"
if ! flock -n 9; then
    echo "controlplane: another process is building $key; waiting for it" >&2
    flock 9 || die "cannot lock $root/$key.lock"
fi
if complete; then
    echo "$dest/bin"
    exit 0
fi

tmp="$(mktemp -d "$root/.build-$key.XXXXXX")" || die "cannot create a temporary directory"
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT

# Without these the binaries report v0.0.0-master; the values are informational only.
minor="${k8s_version#v1.}"
minor="${minor%%.*}"
version_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1"
    version_ldflags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done

echo "controlplane: building Kubernetes $k8s_version and etcd $etcd_version with" \
    "$go_version into $dest (on a new machine this takes 10-30 minutes on 2 cores)" >&2
start=$SECONDS
if ! (
    cd "$here"
    export GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0
    go build -trimpath -buildvcs=false -ldflags="-s -w$version_ldflags" -o "$tmp/bin/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        ./etcd
) >&2; then
    die "go build failed (see the messages above)"
fi
for b in "${binaries[@]}"; do
    [[ -x "$tmp/bin/$b" ]] || die "go build did not produce $b"
done
printf 'kubernetes %s\netcd %s\ngo %s\n' "$k8s_version" "$etcd_version" "$go_version" \
    >"$tmp/VERSIONS"
mv -T "$tmp" "$dest" || die "cannot move the build into $dest"
trap - EXIT
echo "controlplane: built in $((SECONDS - start))s" >&2
echo "$dest/bin"
