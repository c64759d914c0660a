#!/usr/bin/env bash
# Builds the real Kubernetes control plane used by the tests (kube-apiserver, kube-controller-manager,
# kubectl, etcd) from the published Go modules, and Helm, caching each binary by version outside the
# repository. kube-controller-manager gives the tests the garbage collector (ownerReferences), namespace
# deletion, the service-account token controller and the aggregation of ClusterRoles.
#
#   tools/control-plane.sh            build what is missing, print the bin directory on the last line
#   tools/control-plane.sh --update   regenerate tools/k8s/go.mod for K8S_VERSION (after a version bump)
#
# Versions: Kubernetes 1.35 pairs with etcd 3.6 (as envtest pairs them).
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
HELM_VERSION="${HELM_VERSION:-4.3.1}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${MIO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mail-integration-operator}"
bin="$cache/bin/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION-helm-v$HELM_VERSION"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false"

log() { echo "control-plane: $*" >&2; }

k8s_gomod() {
  # k8s.io/kubernetes maps every staging module to ./staging/src/...; a consumer must replace each with
  # the published v0.MINOR.PATCH. Derive the list from the module's own go.mod, since it changes by minor.
  local dir="$here/k8s" minor_patch="${K8S_VERSION#1.}"
  log "generating $dir/go.mod for k8s.io/kubernetes v$K8S_VERSION"
  local upstream
  upstream=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  (
    cd "$dir"
    printf 'module mail-integration-operator/tools/k8s\n\ngo 1.25.0\n' > go.mod
    rm -f go.sum
    local args=()
    while read -r mod; do
      args+=("-replace=$mod=$mod@v0.$minor_patch")
    done < <(sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*|\1|p' "$upstream")
    go mod edit "${args[@]}"
    go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@v$K8S_VERSION" \
      "k8s.io/kubernetes/cmd/kube-controller-manager@v$K8S_VERSION"
    go mod tidy
  )
}

version_ldflags() {
  local major="${K8S_VERSION%%.*}" minor
  minor="$(echo "$K8S_VERSION" | cut -d. -f2)"
  local f=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    f+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "-s -w$f"
}

build_k8s() {
  local cmds=(kube-apiserver kube-controller-manager kubectl) missing=()
  for c in "${cmds[@]}"; do
    local version=(--version)
    [ "$c" = kubectl ] && version=(version --client)
    [[ -x "$bin/$c" && "$("$bin/$c" "${version[@]}" 2>/dev/null)" =~ v$K8S_VERSION($|$'\n') ]] || missing+=("$c")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "${cmds[*]} v$K8S_VERSION cached in $bin"
    return
  fi
  # go.mod is regenerated only for another version, or when it lacks one of the commands.
  ( grep -q "k8s.io/kubernetes v$K8S_VERSION\( // indirect\)\?\$" "$here/k8s/go.mod" &&
    for c in "${cmds[@]}"; do grep -q "^[[:space:]]*k8s.io/kubernetes/cmd/$c\$" "$here/k8s/go.mod" || exit 1; done ) 2>/dev/null ||
    k8s_gomod
  local t0=$SECONDS
  log "building ${missing[*]} v$K8S_VERSION (cold: about 10-15 minutes on 2 cores)"
  for c in "${missing[@]}"; do
    (cd "$here/k8s" && go build -trimpath -ldflags "$(version_ldflags)" -o "$bin/$c.tmp" "k8s.io/kubernetes/cmd/$c")
    mv "$bin/$c.tmp" "$bin/$c"
  done
  log "built ${missing[*]} in $((SECONDS - t0)) s"
}

build_etcd() {
  # The version is read whole, not piped into grep -q: with pipefail, grep quitting at the first
  # line makes etcd's later writes fail (SIGPIPE), and a cached binary looked missing.
  if [[ -x "$bin/etcd" && "$("$bin/etcd" --version 2>/dev/null)" == *"etcd Version: $ETCD_VERSION"$'\n'* ]]; then
    log "etcd v$ETCD_VERSION cached in $bin"
    return
  fi
  grep -q "go.etcd.io/etcd/server/v3 v$ETCD_VERSION\( // indirect\)\?\$" "$here/etcd/go.mod" 2>/dev/null || (
    cd "$here/etcd"
    log "generating $here/etcd/go.mod for etcd v$ETCD_VERSION"
    printf 'module mail-integration-operator/tools/etcd\n\ngo 1.25.0\n' > go.mod
    rm -f go.sum
    go get -tool "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
    go mod tidy
  )
  local t0=$SECONDS
  log "building etcd v$ETCD_VERSION"
  (cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$bin/etcd.tmp" "$bin/etcd"
  log "built etcd in $((SECONDS - t0)) s"
}

build_helm() {
  if [ -x "$bin/helm" ] && "$bin/helm" version --short 2>/dev/null | grep -q "^v$HELM_VERSION"; then
    log "helm v$HELM_VERSION cached in $bin"
    return
  fi
  local t0=$SECONDS
  log "building helm v$HELM_VERSION"
  # Helm has no replace lines, so `go install` works; a throwaway GOBIN keeps the cache dir tidy.
  local gobin
  gobin="$(mktemp -d)"
  GOBIN="$gobin" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION"
  mv "$gobin/helm" "$bin/helm"
  rm -rf "$gobin"
  log "built helm in $((SECONDS - t0)) s"
}

case "${1:-}" in
  --update) k8s_gomod ;;
  "") ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac
build_etcd
build_k8s
[ "${MIO_SKIP_HELM:-}" = 1 ] || build_helm
echo "$bin"
