#!/usr/bin/env bash
# Lints the GitHub Actions workflows (.github/workflows/*.yml) with actionlint and zizmor, each
# installed once and cached by version beside the other tools (~/.cache/mail-integration-operator/bin):
#   - actionlint: built from its Go module (`go install github.com/rhysd/actionlint/cmd/actionlint@v…`);
#     it runs shellcheck on `run:` scripts when shellcheck is on PATH (Debian's shellcheck package,
#     installed by tools/install-test-deps.sh);
#   - zizmor: the PyPI wheel, which carries zizmor's static binary, run with --offline (no GitHub API).
#
#   tools/workflow-lint.sh [DIR]     lint DIR/.github/workflows (default: the repository's) with both
#   tools/workflow-lint.sh --paths   print the two binaries' paths (installing what is missing)
# With MIO_NO_INSTALL=1 (as the tests run it) nothing is installed or downloaded: a missing tool
# fails, names itself and names tools/install-test-deps.sh, which installs it.
set -euo pipefail
ACTIONLINT_VERSION="${ACTIONLINT_VERSION:-1.7.12}"
ZIZMOR_VERSION="${ZIZMOR_VERSION:-1.32.0}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cache="${MIO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mail-integration-operator}"
actionlint="$cache/bin/actionlint-v$ACTIONLINT_VERSION/actionlint"
zizmor="$cache/bin/zizmor-v$ZIZMOR_VERSION/zizmor"

missing() {
  echo "workflow-lint.sh: $1 is missing ($2): run tools/install-test-deps.sh" >&2
  exit 1
}

if ! [ -x "$actionlint" ] || ! "$actionlint" -version 2>/dev/null | grep -qx "v\?$ACTIONLINT_VERSION"; then
  [ "${MIO_NO_INSTALL:-}" = 1 ] && missing "actionlint $ACTIONLINT_VERSION" "$actionlint"
  command -v go >/dev/null || { echo "workflow-lint.sh: go is needed to build actionlint" >&2; exit 1; }
  echo "workflow-lint.sh: building actionlint v$ACTIONLINT_VERSION" >&2
  gobin="$(mktemp -d)"
  CGO_ENABLED=0 GOBIN="$gobin" go install -trimpath \
    -ldflags "-s -w -X github.com/rhysd/actionlint.version=v$ACTIONLINT_VERSION" \
    "github.com/rhysd/actionlint/cmd/actionlint@v$ACTIONLINT_VERSION"
  mkdir -p "$(dirname "$actionlint")"
  mv "$gobin/actionlint" "$actionlint"
  rm -rf "$gobin"
fi

if ! [ -x "$zizmor" ] || ! "$zizmor" --version 2>/dev/null | grep -q " $ZIZMOR_VERSION\$"; then
  [ "${MIO_NO_INSTALL:-}" = 1 ] && missing "zizmor $ZIZMOR_VERSION" "$zizmor"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "workflow-lint.sh: installing python3-pip (to fetch the zizmor wheel)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "workflow-lint.sh: fetching zizmor==$ZIZMOR_VERSION from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "zizmor==$ZIZMOR_VERSION"
  python3 -m zipfile -e "$tmp"/zizmor-*.whl "$tmp/x"
  mkdir -p "$(dirname "$zizmor")"
  install -m 0755 "$tmp"/x/zizmor-*.data/scripts/zizmor "$zizmor"
fi

if [ "${1:-}" = --paths ]; then
  echo "$actionlint"
  echo "$zizmor"
  exit 0
fi
# actionlint skips the shell checks of `run:` scripts without a word when shellcheck is missing.
shellcheck="$(command -v shellcheck || true)"
[ -n "$shellcheck" ] || missing shellcheck "Debian package shellcheck"
if [ -n "${1:-}" ]; then cd "$1"; fi
status=0
echo "== actionlint $ACTIONLINT_VERSION (with $("$shellcheck" --version | sed -n 's/^version: /shellcheck /p'))"
shopt -s nullglob
files=(.github/workflows/*.yml .github/workflows/*.yaml)
[ ${#files[@]} -gt 0 ] || { echo "workflow-lint.sh: no workflow in $PWD/.github/workflows" >&2; exit 1; }
"$actionlint" -no-color -shellcheck "$shellcheck" "${files[@]}" || status=1
echo "== zizmor $ZIZMOR_VERSION"
"$zizmor" --offline --no-progress --format plain .github/workflows || status=1
exit $status
