#!/usr/bin/env bash
# Builds helm from its upstream Go module, at the version pinned in go.mod/go.sum next to
# this script, into a cache outside the repository:
#
#   ${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}/helm/<key>/bin/helm
#
# where <key> = helm-<helm version>-<hash of go.mod, go.sum and the Go version>. The chart
# tests run `helm lint` and `helm template` with it, and scripts/test renders the plain
# manifests in deploy/manifests/ with it. Idempotent: once built, a run only prints the
# path. Concurrent callers wait on a lock instead of building twice; a build goes to a
# temporary directory that is renamed into place, so a half-built directory is never seen.
#
# Prints the bin directory as its only line on stdout; progress goes to stderr. The first
# build takes a few minutes on a 2-core machine; later runs take well under a second.
#
# To move to another helm release: `go get -tool helm.sh/helm/v4/cmd/helm@vX.Y.Z` in this
# directory (GOWORK=off), then `go mod tidy`.
set -euo pipefail

die() {
    echo "helm/build.sh: error: $*" >&2
    exit 1
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v go >/dev/null || die "the go command is not on PATH (Go >= 1.26 is needed)"
command -v flock >/dev/null || die "flock (util-linux) is not on PATH"

helm_version="$(awk '$1 == "helm.sh/helm/v4" { print $2; exit }' "$here/go.mod")"
[[ -n "$helm_version" ]] || die "no helm.sh/helm/v4 requirement found in $here/go.mod"

go_version="$(go env GOVERSION)"
hash="$(cat "$here/go.mod" "$here/go.sum" <(echo "$go_version") | sha256sum | cut -c1-12)"
key="helm-${helm_version}-${hash}"
root="${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}/helm"
dest="$root/$key"

if [[ -x "$dest/bin/helm" ]]; then
    echo "$dest/bin"
    exit 0
fi

mkdir -p "$root" || die "cannot create cache directory $root"
exec 9>"$root/$key.lock" || die "cannot open lock file $root/$key.lock"
if ! flock -n 9; then
    echo "helm: another process is building $key; waiting for it" >&2
    flock 9 || die "cannot lock $root/$key.lock"
fi
if [[ -x "$dest/bin/helm" ]]; then
    echo "$dest/bin"
    exit 0
fi

tmp="$(mktemp -d "$root/.build-$key.XXXXXX")" || die "cannot create a temporary directory"
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT

# Without it `helm version` says v4.3 (the release's minor only); metadata is cleared so
# it is not reported as "unreleased".
version_ldflags="-X helm.sh/helm/v4/internal/version.version=$helm_version"
version_ldflags+=" -X helm.sh/helm/v4/internal/version.metadata="
version_ldflags+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

echo "helm: building helm $helm_version with $go_version into $dest" \
    "(on a new machine this takes a few minutes on 2 cores)" >&2
start=$SECONDS
if ! (
    cd "$here"
    export GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0
    go build -trimpath -buildvcs=false -ldflags="-s -w $version_ldflags" -o "$tmp/bin/" \
        helm.sh/helm/v4/cmd/helm
) >&2; then
    die "go build failed (see the messages above)"
fi
[[ -x "$tmp/bin/helm" ]] || die "go build did not produce helm"
printf 'helm %s\ngo %s\n' "$helm_version" "$go_version" >"$tmp/VERSIONS"
mv -T "$tmp" "$dest" || die "cannot move the build into $dest"
trap - EXIT
echo "helm: built in $((SECONDS - start))s" >&2
echo "$dest/bin"
