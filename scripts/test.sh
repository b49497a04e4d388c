#!/usr/bin/env bash
# The project's test command — the one the README gives, the one CI runs (.ci/run):
# formatting, lints, a build of every binary, then every test (unit, property, e2e).
#
# The e2e tests need swaks and Postfix's smtp-source on the machine; outside CI they
# skip with a printed reason when those are missing, in CI (CI set) they fail.
# `sudo bash .ci/run` installs them on Debian 12 and then runs this script.
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
    printf '\n==> %s\n' "$*"
    "$@"
}

step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets --locked -- -D warnings
step cargo build --workspace --locked
# The tests' output also goes to a log, summed up at the end in one plain line.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
printf '\n==> %s\n' "cargo test --workspace --locked"
cargo test --workspace --locked 2>&1 | tee "$log"
summary="$(awk '/^test result:/ { p += $4; f += $6; i += $8 }
    END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log")"
mkdir -p target
echo "$summary" >target/test-summary.txt
printf '\n==> all checks passed\n%s\n' "$summary"
