#!/usr/bin/env bash
# Short fuzzing run of every target in fuzz/ (docs/reliability.md "Fuzzing"):
#   scripts/fuzz.sh [--release] [SECONDS]      (default 20 seconds per target)
# Builds with cargo-fuzz on stable (`-s none`: no sanitizer, so no nightly flags) — a
# debug build with debug assertions by default, which builds several times faster (what
# CI's short run wants); --release for optimized targets, which execute several times
# more inputs per second (what a long run wants) — runs
# each target on its seed corpus (fuzz/corpus/TARGET, read only: new inputs go to a temp
# dir that is removed afterwards) and prints the executions per target. A crash fails the
# script; the input is kept in fuzz/artifacts/TARGET/ and cargo-fuzz prints how to replay
# it. Needs cargo-fuzz (`cargo install cargo-fuzz --version 0.13.1 --locked`, as .ci/run does).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
profile=(--dev)
if [ "${1:-}" = --release ]; then
    profile=()
    shift
fi
secs="${1:-20}"
targets=(smtp_codec xcoffer proxy_header log_record config milter_rebuild message_index)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --version 0.13.1 --locked" >&2
    exit 2
fi

printf '\n==> cargo fuzz build -s none %s(%d targets)\n' "${profile[*]:+${profile[*]} }" "${#targets[@]}"
cargo fuzz build -s none "${profile[@]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
summary=()
for t in "${targets[@]}"; do
    printf '\n==> fuzz %s for %ss\n' "$t" "$secs"
    mkdir -p "$work/$t" "artifacts/$t"
    log="$work/$t.log"
    if ! cargo fuzz run -s none "${profile[@]}" "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    execs="$(awk '/stat::number_of_executed_units/ { print $2 }' "$log" | tail -n 1)"
    grep -E '^(#[0-9]+ *DONE|Done [0-9]+ runs)' "$log" | tail -n 1 || true
    summary+=("$(printf '%-16s %12s executions in %ss, no crash' "$t" "${execs:-?}" "$secs")")
done
printf '\n==> fuzzing summary\n'
printf '%s\n' "${summary[@]}"
