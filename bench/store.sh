#!/usr/bin/env bash
# Store-scale benchmark (design.md §6): builds a store of N synthetic messages through
# the real ingest path (archiver/examples/storegen.rs, no SMTP), then measures
#   - the ingest rate per block of messages as the store grows (flat is the goal),
#   - the open time of the finished store, clean (`coffer status`, no daemon),
#   - the open time after kill -9 in the middle of further ingest (recovery replays
#     the log past the index's tail and truncates the torn record),
#   - data folder bytes over raw bytes (before any compaction), and peak RSS.
# Targets: open < 2 s clean and < 10 s after kill -9 at 1 M messages.
#
# Usage: bench/store.sh            BENCH_STORE_MESSAGES=1000000 by default (~20 GiB raw:
#                                  check free disk); BENCH_STORE_DIR to choose the folder.
set -euo pipefail
cd "$(dirname "$0")/.."

N="${BENCH_STORE_MESSAGES:-1000000}"
REPORT="${BENCH_STORE_REPORT:-$(( N / 10 > 0 ? N / 10 : 1 ))}"
DIR="${BENCH_STORE_DIR:-$(mktemp -d /tmp/coffer-store-bench.XXXXXX)}"
STORE="$DIR/data"
say() { printf '==> %s\n' "$*" >&2; }

say "building release binaries and the generator"
cargo build --release --locked --bins -p coffer-archiver >&2
cargo build --release --locked -p coffer-archiver --example storegen >&2
GEN=target/release/examples/storegen
COFFER=target/release/coffer
cat >"$DIR/coffer.toml" <<TOML
[node]
name = "gen"
data_dir = "$STORE"
[[listener]]
name = "journal"
protocol = "smtp"
bind = "127.0.0.1:0"
[[route]]
from = ["journal"]
archive = true
forward = []
TOML

say "generating $N messages into $STORE"
/usr/bin/time -f "%M" -o "$DIR/gen.rss" "$GEN" --out "$STORE" --messages "$N" --report "$REPORT" | tee "$DIR/gen.out"
RSS_KB="$(tail -1 "$DIR/gen.rss")"

open_time() { # median of three `coffer status` runs, seconds
    local t
    for _ in 1 2 3; do
        t="$( { /usr/bin/time -f "%e" "$COFFER" --config "$DIR/coffer.toml" status >/dev/null; } 2>&1 | tail -1)"
        echo "$t"
    done | sort -n | sed -n 2p
}
say "open time, clean"
CLEAN="$(open_time)"

say "kill -9 during further ingest, then open"
"$GEN" --out "$STORE" --first "$N" --messages "$N" --report "$N" >"$DIR/gen2.out" 2>&1 &
GEN_PID=$!
sleep "${BENCH_STORE_KILL_AFTER:-5}"
kill -9 "$GEN_PID" 2>/dev/null || true
wait "$GEN_PID" 2>/dev/null || true
CRASH="$( { /usr/bin/time -f "%e" "$COFFER" --config "$DIR/coffer.toml" status >/dev/null; } 2>&1 | tail -1)"
AFTER="$(open_time)"

RATES="$(grep -o 'rate_msg_s=[0-9]*' "$DIR/gen.out" | cut -d= -f2 | tr '\n' ' ')"
DONE_LINE="$(grep '^done' "$DIR/gen.out")"
echo
echo "Store scale, $N messages (storegen, $(nproc) cores)"
echo "ingest msg/s per block of $REPORT:  $RATES"
echo "generator: $DONE_LINE"
echo "open, clean (median of 3):        ${CLEAN} s   (target < 2 s)"
echo "open after kill -9 (recovery):    ${CRASH} s   (target < 10 s); next opens ${AFTER} s"
echo "peak RSS of the writer process:   ${RSS_KB} kB"
if [ -z "${BENCH_STORE_DIR:-}" ] && [ -z "${BENCH_KEEP:-}" ]; then rm -rf "$DIR"; fi
