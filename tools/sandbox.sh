#!/usr/bin/env bash
# The local sandbox: a real kube-apiserver + etcd, oidc-provider as the OAuth server, Dovecot, the
# MailIntegration CRD, an example integration and the operator, all on 127.0.0.1. It prints the
# sign-in URL; with --auto-sign-in it signs in by itself. Ctrl-C stops everything it started.
#   tools/sandbox.sh [--auto-sign-in] [--exit-when-ready]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tools/install-test-deps.sh
MIO_CONTROL_PLANE_BIN="$(tools/control-plane.sh | tail -n 1)"
export MIO_CONTROL_PLANE_BIN
cargo build --quiet --bins --example sandbox
exec target/debug/examples/sandbox "$@"
