#!/usr/bin/env bash
# Runs every check and test of the project on this machine, installing what the tests need first:
#   - Debian packages (Dovecot, Chromium, openssl, ...) and the test OAuth server's npm packages, by
#     tools/install-test-deps.sh;
#   - the real Kubernetes control plane (kube-apiserver, kube-controller-manager, etcd, kubectl) and
#     Helm, built from their Go modules by tools/control-plane.sh and cached by version under
#     ~/.cache/mail-integration-operator;
# then cargo fmt --check, cargo clippy -D warnings and the tests of `cargo test --lib --bins --tests`,
# each test binary built once and MIO_TEST_JOBS (default 4) of them run at once
# (tools/run-test-binaries.sh). With FUZZ=1, then also the property
# tests of tests/properties.rs for MIO_FUZZ_SECONDS (default 60) seconds each (docs/fuzzing.md).
# With SOAK=1 (nightly-style, hours), then tools/soak.sh: the property tests for 10 minutes each and a
# one-hour soak of 1,000 integrations with faults injected (benches/soak.rs), printing what they found.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$SECONDS
# A clean clone gains nothing from incremental compilation; it only adds its cache to target/.
if [[ "${CI:-}" == true ]]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi
step() { echo "==> $* ($((SECONDS - t0)) s)"; }

step "test dependencies (tools/install-test-deps.sh)"
tools/install-test-deps.sh

step "control plane (tools/control-plane.sh)"
MIO_CONTROL_PLANE_BIN="$(tools/control-plane.sh | tail -n 1)"
export MIO_CONTROL_PLANE_BIN
"$MIO_CONTROL_PLANE_BIN/kube-apiserver" --version

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
step "cargo build --bins --examples (the sandbox and process tests run them)"
cargo build --locked --bins --examples
step "cargo test --no-run, then the test binaries in parallel (tools/run-test-binaries.sh)"
tools/run-test-binaries.sh
if [[ "${FUZZ:-}" == 1 ]]; then
  step "property tests for ${MIO_FUZZ_SECONDS:-60} s each (FUZZ=1, release build; docs/fuzzing.md)"
  MIO_FUZZ_SECONDS="${MIO_FUZZ_SECONDS:-60}" \
    cargo test --locked --release --test properties -- --nocapture --test-threads="${FUZZ_THREADS:-2}"
fi
if [[ "${SOAK:-}" == 1 ]]; then
  step "soak (SOAK=1): tools/soak.sh"
  tools/soak.sh
fi
step "done"
