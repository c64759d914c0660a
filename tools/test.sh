#!/usr/bin/env bash
# Runs every check and test of the project on this machine, installing what the tests need first:
#   - Debian packages (openssl; more as the tests need them), with apt-get when missing;
#   - the real Kubernetes control plane (kube-apiserver, etcd, kubectl) and Helm, built from their Go
#     modules by tools/control-plane.sh and cached by version under ~/.cache/mail-integration-operator;
#   - the npm packages of the test OAuth server (tests/oauth-server), when that project exists;
# then cargo fmt --check, cargo clippy -D warnings and cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$SECONDS
step() { echo "==> $* ($((SECONDS - t0)) s)"; }

# Debian packages the tests use. policy-rc.d keeps package installs from starting system services
# (the tests start their own Dovecot on free loopback ports).
# lua5.1: the Argo CD health check's test; prometheus: promtool for the alert rules' test.
debs=(openssl ca-certificates dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond chromium chromium-driver lua5.1 prometheus)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f tests/oauth-server/package-lock.json ]; then
  stamp=tests/oauth-server/node_modules/.installed-lock
  if ! cmp -s tests/oauth-server/package-lock.json "$stamp" 2>/dev/null; then
    step "npm ci (tests/oauth-server)"
    npm ci --prefix tests/oauth-server --no-audit --no-fund --loglevel=error
    cp tests/oauth-server/package-lock.json "$stamp"
  fi
fi

step "control plane (tools/control-plane.sh)"
MIO_CONTROL_PLANE_BIN="$(tools/control-plane.sh | tail -n 1)"
export MIO_CONTROL_PLANE_BIN
"$MIO_CONTROL_PLANE_BIN/kube-apiserver" --version

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
step "cargo test"
cargo test --locked --all-targets -- --test-threads="${TEST_THREADS:-4}"
step "done"
