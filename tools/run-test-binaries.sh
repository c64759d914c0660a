#!/usr/bin/env bash
# Builds every test binary once (`cargo test --no-run --lib --bins --tests`) and runs them in
# parallel, at most MIO_TEST_JOBS (default 4) at once, longest first. `cargo test` runs its binaries
# one after another, and each of ours starts its own control plane, OAuth server and Dovecot and
# mostly waits (protocol windows, outages, leases): those waits overlap here.
#
#   - Order: the wall times of the last run (target/test-times.txt), else the checked-in
#     tools/test-durations.txt; a binary in neither goes first.
#   - Threads: per binary from tools/test-durations.txt (third column), else TEST_THREADS (default 4).
#   - Each binary runs as cargo test would run it: from the package root, with CARGO and
#     CARGO_MANIFEST_DIR set; its output goes to target/test-logs/<name>.log.
#   - One line per binary as it ends (result, wall time); a binary still running after
#     MIO_TEST_TIMEOUT seconds (default 900) is killed with its process group and reported.
#   - At the end, the failing tests' sections of each failed binary (all of its output if it
#     crashed or timed out), and exit 1.
# Extra arguments are passed to every binary (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
jobs_max="${MIO_TEST_JOBS:-4}"
limit="${MIO_TEST_TIMEOUT:-900}"
default_threads="${TEST_THREADS:-4}"
target_dir="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)"
logs="$target_dir/test-logs"
times_file="$target_dir/test-times.txt"
checked_in="tools/test-durations.txt"

# name<TAB>path of every test binary, from cargo's JSON messages.
list="$(mktemp)"
trap 'rm -f "$list"' EXIT
cargo test --locked --no-run --lib --bins --tests --message-format=json \
  | jq -r 'select(.reason == "compiler-artifact" and .profile.test == true and .executable != null)
           | (if .target.kind[0] == "lib" then "lib"
              elif .target.kind[0] == "bin" then "bin-" + .target.name
              else .target.name end) + "\t" + .executable' >"$list"
[[ -s "$list" ]] || { echo "no test binaries found" >&2; exit 1; }

# Expected seconds and threads per name: checked-in first, the last run's times over them.
declare -A expect=() threads=()
while read -r name secs thr _; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  expect[$name]=$secs
  [[ -n "${thr:-}" ]] && threads[$name]=$thr
done <"$checked_in"
if [[ -f "$times_file" ]]; then
  while read -r name secs _; do [[ -n "$name" ]] && expect[$name]=$secs; done <"$times_file"
fi
declare -A path=()
order=()
while IFS=$'\t' read -r name exe; do
  path[$name]=$exe
  order+=("${expect[$name]:-100000} $name")
done <"$list"
mapfile -t order < <(printf '%s\n' "${order[@]}" | sort -k1,1nr -k2 | cut -d' ' -f2)

mkdir -p "$logs"
rm -f "$logs"/*.log
cargo_bin="${CARGO:-$(command -v cargo)}"
declare -A started=() pid_of=()
failed=()
new_times="$(mktemp)"
t0=$SECONDS

start() {
  local name=$1
  shift
  local thr="${threads[$name]:-$default_threads}"
  # timeout(1) runs the binary in its own process group and signals that whole group, so the
  # servers a killed binary started go with it.
  (
    cd "$root"
    exec env CARGO="$cargo_bin" CARGO_MANIFEST_DIR="$root" \
      timeout --kill-after=30 "$limit" "${path[$name]}" --test-threads="$thr" "$@" \
      >"$logs/$name.log" 2>&1
  ) &
  pid_of[$!]=$name
  started[$name]=$SECONDS
}

finish() {
  local pid=$1 rc=$2
  local name="${pid_of[$pid]}"
  unset "pid_of[$pid]"
  local secs=$((SECONDS - started[$name]))
  local result
  result="$(grep -a '^test result:' "$logs/$name.log" | tail -n 1 || true)"
  local status=ok
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT (killed after ${limit} s)"
  elif ((rc != 0)); then
    status="FAILED (exit $rc)"
  fi
  [[ "$status" == ok ]] || failed+=("$name")
  printf '%-22s %4d s  %s  %s\n' "$name" "$secs" "$status" "${result#test result: }"
  echo "$name $secs" >>"$new_times"
}

echo "running ${#order[@]} test binaries, $jobs_max at once (logs: $logs)"
for name in "${order[@]}"; do
  while ((${#pid_of[@]} >= jobs_max)); do
    rc=0
    wait -n -p done_pid || rc=$?
    finish "$done_pid" "$rc"
  done
  start "$name" "$@"
done
while ((${#pid_of[@]} > 0)); do
  rc=0
  wait -n -p done_pid || rc=$?
  finish "$done_pid" "$rc"
done
# Keep the times of binaries that did not run this time (a filter may have run few tests).
if [[ -f "$times_file" ]]; then
  awk 'NR == FNR { seen[$1] = 1; next } !($1 in seen)' "$new_times" "$times_file" >>"$new_times"
fi
sort -k2,2nr "$new_times" >"$times_file"
rm -f "$new_times"
echo "all test binaries: $((SECONDS - t0)) s"

if ((${#failed[@]} > 0)); then
  for name in "${failed[@]}"; do
    echo
    echo "======== $name (${path[$name]}): $logs/$name.log"
    # libtest prints each failing test's output after the first line "failures:"; a binary
    # that crashed or was killed has no such line, so all of its output is shown.
    if grep -aq '^failures:$' "$logs/$name.log"; then
      sed -n '/^failures:$/,$p' "$logs/$name.log"
    else
      cat "$logs/$name.log"
    fi
  done
  echo
  echo "failed: ${failed[*]}"
  exit 1
fi
