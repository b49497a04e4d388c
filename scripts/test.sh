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
step cargo test --workspace --locked
printf '\n==> all checks passed\n'
