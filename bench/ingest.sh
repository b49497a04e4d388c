#!/usr/bin/env bash
# SMTP ingest benchmark: cofferd against two references measured in the same run
# (design.md §6), each on its own loopback address and a free port:
#   smtp-sink  127.0.0.1  Postfix's sink: answers 250 and stores nothing (the ceiling)
#   postfix    127.0.0.2  a throwaway Postfix instance (private config, queue and data
#                         dirs under a temp dir) that accepts into its own queue, with
#                         its fsyncs, then discards
#   cofferd    127.0.0.3  the release build, on a temp store
# Each is driven by `smtp-source -s SESSIONS -m MESSAGES -l SIZE` (one message per
# connection), sizes 10 KiB and 100 KiB, targets alternating; the table shows msg/s,
# cofferd's ratios to smtp-sink and to Postfix, and cofferd's peak RSS (VmHWM).
#
# Usage: bench/ingest.sh
# Environment (all optional):
#   BENCH_MESSAGES=20000        messages per run
#   BENCH_SESSIONS=20           parallel SMTP sessions
#   BENCH_SIZES="10240 102400"  payload sizes in bytes
#   BENCH_ROUNDS=1              runs per target and size (the median is reported)
#   BENCH_TARGETS="smtp-sink postfix cofferd"
#   BENCH_NO_BUILD=1            use the existing release build
#   BENCH_KEEP=1                keep the temp dir (logs, stores) for inspection
# Needs: postfix (smtp-source, smtp-sink, postfix) and, for cofferd, cargo.
# Everything started here is stopped by PID on exit, also on error or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES="${BENCH_MESSAGES:-20000}"
SESSIONS="${BENCH_SESSIONS:-20}"
SIZES="${BENCH_SIZES:-10240 102400}"
ROUNDS="${BENCH_ROUNDS:-1}"
TARGETS="${BENCH_TARGETS:-smtp-sink postfix cofferd}"
START_DEADLINE=60 # seconds a service gets to greet with 220
SMTP_SOURCE=/usr/sbin/smtp-source
SMTP_SINK=/usr/sbin/smtp-sink
POSTFIX=/usr/sbin/postfix

# shellcheck source=bench/lib.sh
. bench/lib.sh

for tool in "$SMTP_SOURCE" "$SMTP_SINK" "$POSTFIX"; do
    [ -x "$tool" ] || die "$tool missing: install the Debian package postfix (see .ci/run)"
done

TMP="$(mktemp -d /tmp/coffer-bench.XXXXXX)"
SINK_PID=""
COFFERD_PID=""
POSTFIX_DIR=""
POSTFIX_STARTED=0

cleanup() {
    set +e
    stop_pid "$SINK_PID" smtp-sink
    stop_pid "$COFFERD_PID" cofferd
    stop_postfix
    if [ "${BENCH_KEEP:-}" = 1 ]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build ------------------------------------------------------------------------------
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
COFFERD="$TARGET_DIR/release/cofferd"
if [[ " $TARGETS " == *" cofferd "* ]] && [ "${BENCH_NO_BUILD:-}" != 1 ]; then
    say "cargo build --release --locked --bin cofferd --bin coffer"
    cargo build --release --locked --bin cofferd --bin coffer
fi

# --- smtp-sink ----------------------------------------------------------------------------
start_sink() {
    local port user_opt=()
    port="$(free_port 127.0.0.1)"
    # smtp-sink refuses to run as root without -u.
    [ "$(id -u)" -eq 0 ] && user_opt=(-u nobody)
    "$SMTP_SINK" "${user_opt[@]}" "127.0.0.1:$port" 1024 >"$TMP/smtp-sink.log" 2>&1 &
    SINK_PID=$!
    wait_smtp 127.0.0.1 "$port" "$SINK_PID" || die "smtp-sink did not start: $(cat "$TMP/smtp-sink.log")"
    ADDR[smtp-sink]="127.0.0.1:$port"
}

# --- a throwaway Postfix ------------------------------------------------------------------
start_postfix() {
    local port
    port="$(free_port 127.0.0.2)"
    POSTFIX_DIR="$TMP/postfix"
    say "postfix -c $POSTFIX_DIR/etc start (smtpd on 127.0.0.2:$port)"
    # 127.0.0.2 is not an interface address of its own (lo holds 127.0.0.1/8): listen
    # on loopback, and the smtpd service line binds 127.0.0.2 explicitly.
    write_postfix "proxy_interfaces = 127.0.0.2" \
        "127.0.0.2:$port inet n  -       n       -       -       smtpd"
    wait_smtp 127.0.0.2 "$port" "" ||
        die "Postfix did not greet: $(cat "$TMP/postfix-start.log" "$POSTFIX_DIR/maillog" 2>/dev/null | tail -20)"
    ADDR[postfix]="127.0.0.2:$port"
}

# --- cofferd ------------------------------------------------------------------------------
start_cofferd() {
    local port d
    [ -x "$COFFERD" ] || die "$COFFERD missing (cargo build --release)"
    port="$(free_port 127.0.0.3)"
    d="$TMP/cofferd"
    mkdir -p "$d"
    cat >"$d/coffer.toml" <<EOF_TOML
# Throwaway store for bench/ingest.sh.
[node]
name = "bench"
data_dir = "data"

[store]
min_free_disk = "256MiB"

[[listener]]
name = "journal"
protocol = "smtp"
bind = "127.0.0.3:$port"

[[route]]
from = ["journal"]
archive = true
forward = []
EOF_TOML
    "$COFFERD" --config "$d/coffer.toml" >"$d/cofferd.log" 2>&1 &
    COFFERD_PID=$!
    wait_smtp 127.0.0.3 "$port" "$COFFERD_PID" ||
        die "cofferd did not start: $(tail -20 "$d/cofferd.log")"
    ADDR[cofferd]="127.0.0.3:$port"
}

declare -A ADDR=()
for t in $TARGETS; do
    case "$t" in
    smtp-sink) start_sink ;;
    postfix) start_postfix ;;
    cofferd) start_cofferd ;;
    *) die "unknown target $t (smtp-sink, postfix, cofferd)" ;;
    esac
    say "$t listening on ${ADDR[$t]}"
done

# --- runs -------------------------------------------------------------------------------
declare -A RESULTS=() # "target size" -> space-separated msg/s of each round
FAILED=0
# Before each run: the bench Postfix has discarded everything it queued, and the page
# cache holds no dirty data of the previous run, so no target pays for another's
# leftovers (Postfix keeps delivering its queue, and writeback goes on, after a run).
settle() {
    [ -z "$POSTFIX_DIR" ] || drain 120
    sync
}

run_one() {
    local t="$1" size="$2" start end ms rate
    settle
    start="$(date +%s%N)"
    if ! "$SMTP_SOURCE" -s "$SESSIONS" -m "$MESSAGES" -l "$size" \
        -f bench@example.org -t archive@example.net "${ADDR[$t]}" >"$TMP/run.log" 2>&1; then
        say "$t, $size B: smtp-source failed: $(tail -5 "$TMP/run.log")"
        FAILED=1
        RESULTS["$t $size"]+="failed "
        return 0
    fi
    end="$(date +%s%N)"
    ms=$(((end - start) / 1000000))
    rate="$(awk -v m="$MESSAGES" -v ms="$ms" 'BEGIN { printf "%.0f", m * 1000 / (ms > 0 ? ms : 1) }')"
    say "$t, $size B: $MESSAGES messages in ${ms} ms = $rate msg/s"
    RESULTS["$t $size"]+="$rate "
}

read -ra target_list <<<"$TARGETS"
for ((round = 1; round <= ROUNDS; round++)); do
    for size in $SIZES; do
        # Alternate the order each round so no target always runs on a warm (or tired) box.
        order=("${target_list[@]}")
        if ((round % 2 == 0)); then
            mapfile -t order < <(printf '%s\n' "${target_list[@]}" | tac)
        fi
        for t in "${order[@]}"; do
            run_one "$t" "$size"
        done
    done
done

# --- report -----------------------------------------------------------------------------
median() {
    # shellcheck disable=SC2086
    printf '%s\n' $1 | grep -v failed | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "failed"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a / b; else print "n/a" }'
}

echo
echo "SMTP ingest, $SESSIONS sessions, $MESSAGES messages per run, one message per connection; msg/s (median of $ROUNDS)"
printf '%-22s' "target"
for size in $SIZES; do printf '%14s' "$size B"; done
echo
declare -A MED=()
for t in "${target_list[@]}"; do
    printf '%-22s' "$t"
    for size in $SIZES; do
        MED["$t $size"]="$(median "${RESULTS["$t $size"]:-}")"
        printf '%14s' "${MED["$t $size"]}"
    done
    echo
done
if [ -n "${ADDR[cofferd]:-}" ]; then
    for ref in smtp-sink postfix; do
        [ -n "${ADDR[$ref]:-}" ] || continue
        printf '%-22s' "cofferd / $ref"
        for size in $SIZES; do
            printf '%14s' "$(ratio "${MED["cofferd $size"]}" "${MED["$ref $size"]}")"
        done
        echo
    done
    hwm="$(awk '/^VmHWM:/ { print $2, $3 }' "/proc/$COFFERD_PID/status" 2>/dev/null || true)"
    echo "cofferd peak RSS (VmHWM): ${hwm:-unknown (cofferd exited)}"
fi
echo "targets (design.md §6): cofferd >= 0.50 of smtp-sink at both sizes"
exit "$FAILED"
