#!/usr/bin/env bash
# The nightly-style opt-in of tools/test.sh (SOAK=1 tools/test.sh runs it after the normal tests;
# it also runs on its own, with the control plane of tools/control-plane.sh):
#   1. every property test of tests/properties.rs for MIO_FUZZ_SECONDS (default 600) seconds, release
#      build (docs/fuzzing.md): each prints its cases and the cases of each branch it names;
#   2. the soak of benches/soak.rs: SOAK_INTEGRATIONS (1000) integrations on one operator for
#      SOAK_SECONDS (3600) with faults injected (token endpoint errors and slowness, API Secret
#      writes failing, API partitions, operator restarts); it prints refreshes, reuse detections
#      (must be 0), lost grants (must be 0), peak RSS and the faults, and fails on a must-be-0.
# At the end it prints what both found again, together. SOAK_FUZZ=0 skips step 1 (and SOAK_RUN=0
# step 2), e.g. to try the soak's wiring with a short run:
#   SOAK_FUZZ=0 SOAK_SECONDS=120 SOAK_INTEGRATIONS=50 tools/soak.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$SECONDS
step() { echo "==> $* ($((SECONDS - t0)) s)"; }
if [[ -z "${MIO_CONTROL_PLANE_BIN:-}" ]]; then
  MIO_CONTROL_PLANE_BIN="$(tools/control-plane.sh | tail -n 1)"
  export MIO_CONTROL_PLANE_BIN
fi
out="$(mktemp -d)"
status=0
if [[ "${SOAK_FUZZ:-1}" != 0 ]]; then
  step "property tests for ${MIO_FUZZ_SECONDS:-600} s each (release build; docs/fuzzing.md)"
  MIO_FUZZ_SECONDS="${MIO_FUZZ_SECONDS:-600}" \
    cargo test --locked --release --test properties -- --nocapture --test-threads="${FUZZ_THREADS:-2}" \
    2>&1 | tee "$out/fuzz.log" || status=1
fi
if [[ "${SOAK_RUN:-1}" != 0 ]]; then
  step "soak: ${SOAK_INTEGRATIONS:-1000} integrations, ${SOAK_SECONDS:-3600} s of faults (benches/soak.rs)"
  cargo bench --locked --bench soak 2>&1 | tee "$out/soak.log" || status=1
fi
step "what the soak run found"
if [[ -f "$out/fuzz.log" ]]; then
  grep -E '^property |^test result|panicked|FAILED' "$out/fuzz.log" || true
fi
if [[ -f "$out/soak.log" ]]; then
  grep -E '^soak |the soak found|panicked' "$out/soak.log" || true
fi
step "done (status $status; logs in $out)"
exit "$status"
