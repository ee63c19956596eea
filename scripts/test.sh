#!/usr/bin/env bash
# Ferrite's test command, used by the README and by .ci/run.
#
#   1. fast tests: `cargo test --workspace --release`, in parallel (Linux tests not built);
#   2. Linux boot tests (`--features linux-tests --test linux_boot`): minutes each under
#      emulation on our machines, so run alone (--test-threads=1) under a watchdog, each
#      bounded by its own budget.
# `--linux-long` adds the long Linux runs (full boot to /init, bzImage; ~40 min here).
# Guest assets come from $FERRITE_ASSETS (default: <repo>/assets); build them first with
# scripts/guest-assets.sh. The output ends with every `test result:` line of the run.
#
# Usage: scripts/test.sh [--fast-only | --linux-only] [--linux-long]
# Environment:
#   FERRITE_LINUX_WATCHDOG   seconds before the Linux phase is killed (default 1800)
#   FERRITE_LINUX_BUDGET_SECS, FERRITE_LINUX_ABORT_BUDGET_SECS, FERRITE_LINUX_LONG_BUDGET_SECS,
#   FERRITE_LINUX_BZIMAGE_BUDGET_SECS   per-test budgets (see crates/ferrite/tests/linux_*.rs)
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT_DIR"

fast=1
linux=1
long=0
while (($#)); do
    case "$1" in
    --fast-only) linux=0 ;;
    --linux-only) fast=0 ;;
    --linux-long) long=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown option $1 (see --help)" >&2
        exit 2
        ;;
    esac
    shift
done

export FERRITE_ASSETS=${FERRITE_ASSETS:-$ROOT_DIR/assets}
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT

timings=()
failed=()
# phase NAME COMMAND...: run, keep its output for the summary, record time and status.
phase() {
    local name=$1 start=$SECONDS status=0
    shift
    echo "=== test phase: $name: $*"
    "$@" 2>&1 | tee "$LOGS/$name.log" || status=$?
    timings+=("$(printf '%-14s %5d s  %s' "$name" $((SECONDS - start)) "$([[ $status == 0 ]] && echo ok || echo "FAILED ($status)")")")
    ((status == 0)) || failed+=("$name")
}

if ((fast)); then
    phase fast cargo test --workspace --release --no-fail-fast
fi
if ((linux || long)); then
    watchdog=${FERRITE_LINUX_WATCHDOG:-1800}
    linux_tests=()
    ((linux)) && linux_tests+=(--test linux_boot)
    ((long)) && linux_tests+=(--test linux_long) && watchdog=$((watchdog + 5400))
    # Echo the guest console live, and give every test the whole machine.
    phase linux env FERRITE_TEST_ECHO=1 timeout --kill-after=30 "$watchdog" \
        cargo test --release -p ferrite --features linux-tests "${linux_tests[@]}" \
        -- --test-threads=1 --nocapture
fi

echo "=== test timings"
printf '  %s\n' "${timings[@]}"
echo "=== test summary (FERRITE_ASSETS=$FERRITE_ASSETS)"
for log in "$LOGS"/*.log; do
    grep -E '^test result:|^error(\[|:)' "$log" || true
done
((${#failed[@]} == 0)) || {
    # Keep the last line a cargo summary line: the failure is in the exit status.
    exit 1
}
