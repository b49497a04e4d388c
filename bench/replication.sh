#!/usr/bin/env bash
# Replication benchmark (design.md §6): two release cofferd nodes on loopback, A
# (127.0.0.2) replicating to B (127.0.0.3) over B's `ha` listener, as in a pair.
#
# 1. Capacity, the references: `smtp-source -s SESSIONS -m CAPACITY_MESSAGES -l SIZE`
#    (one message per connection) into B's journal listener directly — B's own ingest
#    capacity — then into A's (A replicating to B meanwhile, as deployed).
# 2. Lag at LAG_FRACTION (half) of A's capacity: open-loop load into A (a new
#    smtp-source batch every TICK_MS ms) for LAG_SECONDS. Lag of one arrival = when B
#    stored its copy minus when A stored the original, both from the arrival records
#    (`coffer search --json` on B: a replicated arrival's `time` is the origin's,
#    `received` is B's; one clock, this machine's). Both stamps are taken just before
#    each node's fdatasync, so this is A's acceptance to B's, to within one fsync.
#    Reported p50/p99/max; target p99 < 1 s.
# 3. Catch-up: B stopped (SIGTERM), CATCHUP_MESSAGES put into A, B started again;
#    the time from B greeting until A's connection has no lag left (every arrival
#    acknowledged by B after B's fdatasync; read from A's /metrics), which includes
#    A's probe_interval (1 s here) to notice B. Catch-up rate / B's capacity from 1;
#    target >= 0.8. Then a check that B holds exactly A's arrivals.
#
# Usage: bench/replication.sh
# Environment (all optional):
#   BENCH_SIZE=10240               payload bytes per message
#   BENCH_SESSIONS=20              smtp-source sessions in capacity runs and the load
#   BENCH_CAPACITY_MESSAGES=20000  messages per capacity run
#   BENCH_LAG_FRACTION=0.5         offered load of the lag run, of A's capacity
#   BENCH_LAG_SECONDS=20           length of the lag run
#   BENCH_TICK_MS=20               pacing of the lag run
#   BENCH_CATCHUP_MESSAGES=20000   backlog for the catch-up run
#   BENCH_REPL_SESSIONS=           `sessions` of A's connection (empty: the default)
#   BENCH_NO_BUILD=1               use the existing release build
#   BENCH_KEEP=1                   keep the temp dir (logs, stores) for inspection
# Needs: postfix (smtp-source), python3 (JSON and quantiles), cargo unless
# BENCH_NO_BUILD=1. Every loop is bounded; everything started here is stopped by PID on
# exit, also on error or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE="${BENCH_SIZE:-10240}"
SESSIONS="${BENCH_SESSIONS:-20}"
CAPACITY_MESSAGES="${BENCH_CAPACITY_MESSAGES:-20000}"
LAG_FRACTION="${BENCH_LAG_FRACTION:-0.5}"
LAG_SECONDS="${BENCH_LAG_SECONDS:-20}"
TICK_MS="${BENCH_TICK_MS:-20}"
CATCHUP_MESSAGES="${BENCH_CATCHUP_MESSAGES:-20000}"
REPL_SESSIONS="${BENCH_REPL_SESSIONS:-}"
START_DEADLINE=60  # seconds a node gets to greet
RUN_DEADLINE=1800  # seconds one smtp-source run may take
DRAIN_DEADLINE=600 # seconds A's connection gets to ship everything
SMTP_SOURCE=/usr/sbin/smtp-source

# shellcheck source=bench/lib.sh
. bench/lib.sh

[ -x "$SMTP_SOURCE" ] || die "$SMTP_SOURCE missing: install the Debian package postfix (see .ci/run)"
command -v python3 >/dev/null 2>&1 || die "python3 missing (it reads the arrival records)"
for n in "$SIZE" "$SESSIONS" "$CAPACITY_MESSAGES" "$LAG_SECONDS" "$TICK_MS" "$CATCHUP_MESSAGES"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "not a positive integer: $n"
done
[ -z "$REPL_SESSIONS" ] || [[ "$REPL_SESSIONS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPL_SESSIONS: $REPL_SESSIONS"

TMP="$(mktemp -d /tmp/coffer-replbench.XXXXXX)"
declare -A PID=([a]="" [b]="")
cleanup() {
    set +e
    stop_pid "${PID[a]}" "cofferd A"
    stop_pid "${PID[b]}" "cofferd B"
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
BIN="$(cd "$TARGET_DIR" 2>/dev/null && pwd || echo "$TARGET_DIR")/release"
if [ "${BENCH_NO_BUILD:-}" != 1 ]; then
    say "cargo build --release --locked --bin cofferd --bin coffer"
    cargo build --release --locked --bin cofferd --bin coffer
fi
for b in cofferd coffer; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (cargo build --release)"
done

# --- the two nodes ----------------------------------------------------------------------
declare -A IP=([a]=127.0.0.2 [b]=127.0.0.3) PORT=() HA=() CONSOLE=()
for n in a b; do
    PORT[$n]="$(free_port "${IP[$n]}")"
    HA[$n]="$(free_port "${IP[$n]}")"
    CONSOLE[$n]="$(free_port "${IP[$n]}")"
done
repl_sessions_line=""
[ -z "$REPL_SESSIONS" ] || repl_sessions_line="sessions = $REPL_SESSIONS"
mkdir -p "$TMP/a" "$TMP/b"
cat >"$TMP/a/coffer.toml" <<EOF_A
# Throwaway node A for bench/replication.sh: journal mail is archived and sent to B.
[node]
name = "a"
data_dir = "data"

[store]
min_free_disk = "256MiB"

[[listener]]
name = "journal"
protocol = "smtp"
bind = "${IP[a]}:${PORT[a]}"

[[connection]]
name = "to-b"
peer = "b"
target = "${IP[b]}:${HA[b]}"
source = "${IP[a]}"
probe_interval = "1s"
$repl_sessions_line

[[route]]
from = ["journal"]
archive = true
forward = ["to-b"]

[console]
bind = "${IP[a]}:${CONSOLE[a]}"
EOF_A
cat >"$TMP/b/coffer.toml" <<EOF_B
# Throwaway node B for bench/replication.sh: takes journal mail (its own capacity run)
# and A's replication on its ha listener.
[node]
name = "b"
data_dir = "data"

[store]
min_free_disk = "256MiB"

[[listener]]
name = "journal"
protocol = "smtp"
bind = "${IP[b]}:${PORT[b]}"

[[listener]]
name = "ha"
protocol = "smtp"
bind = "${IP[b]}:${HA[b]}"
allow = ["${IP[a]}/32"]
trust_xcoffer = true

[[route]]
from = ["journal", "ha"]
archive = true
forward = []

[console]
bind = "${IP[b]}:${CONSOLE[b]}"
EOF_B

start_node() {
    local n="$1"
    (cd "$TMP/$n" && exec "$BIN/cofferd" --config coffer.toml >>cofferd.log 2>&1) &
    PID[$n]=$!
    wait_smtp "${IP[$n]}" "${PORT[$n]}" "${PID[$n]}" ||
        die "cofferd $n did not start: $(tail -20 "$TMP/$n/cofferd.log")"
    say "cofferd $n (pid ${PID[$n]}) on ${IP[$n]}:${PORT[$n]}"
}
coffer() {
    local n="$1"
    shift
    "$BIN/coffer" --config "$TMP/$n/coffer.toml" "$@"
}
# One value of a node's /metrics (A's unless $2 says b), e.g.
# metric 'coffer_replication_lag_arrivals{connection="to-b"}'.
metric() {
    local series="$1" n="${2:-a}" body
    body="$( (
        exec 3<>"/dev/tcp/${IP[$n]}/${CONSOLE[$n]}" || exit 1
        printf 'GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n' >&3
        timeout 10 cat <&3
    ) 2>/dev/null || true)"
    awk -v s="$series" '$1 == s { print $2; found = 1; exit } END { if (!found) print "" }' <<<"$body"
}
LAG_SERIES='coffer_replication_lag_arrivals{connection="to-b"}'
# Waits (bounded) until A's connection has nothing left to ship; prints the seconds.
wait_drained() {
    local deadline="$1" start end lag
    start="${EPOCHREALTIME/./}"
    end=$((SECONDS + deadline))
    while ((SECONDS < end)); do
        lag="$(metric "$LAG_SERIES")"
        if [ "$lag" = 0 ]; then
            awk -v us="$((${EPOCHREALTIME/./} - start))" 'BEGIN { printf "%.3f\n", us / 1e6 }'
            return 0
        fi
        sleep 0.05
    done
    return 1
}
arrivals() { coffer "$1" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["arrivals"])'; }

start_node b
start_node a

# --- 1. capacity ------------------------------------------------------------------------
capacity() {
    local n="$1" start end ms
    sync
    start="${EPOCHREALTIME/./}"
    timeout "$RUN_DEADLINE" "$SMTP_SOURCE" -s "$SESSIONS" -m "$CAPACITY_MESSAGES" -l "$SIZE" \
        -f bench@example.org -t archive@example.net "${IP[$n]}:${PORT[$n]}" >"$TMP/capacity-$n.log" 2>&1 ||
        die "smtp-source into $n failed: $(tail -5 "$TMP/capacity-$n.log")"
    end="${EPOCHREALTIME/./}"
    ms=$(((end - start) / 1000))
    awk -v m="$CAPACITY_MESSAGES" -v ms="$ms" 'BEGIN { printf "%.0f\n", m * 1000 / (ms > 0 ? ms : 1) }'
}
say "capacity of B: $CAPACITY_MESSAGES messages of $SIZE B, $SESSIONS sessions, straight into B"
CAP_B="$(capacity b)"
say "B: $CAP_B msg/s"
say "capacity of A: the same into A (replicating to B meanwhile)"
CAP_A="$(capacity a)"
say "A: $CAP_A msg/s; waiting for A to finish shipping"
DRAIN_AFTER_CAP="$(wait_drained "$DRAIN_DEADLINE")" || die "A did not finish shipping in $DRAIN_DEADLINE s"
say "A's backlog shipped ${DRAIN_AFTER_CAP} s after the run"

# --- 2. lag at half load ------------------------------------------------------------------
RATE="$(awk -v r="$CAP_A" -v f="$LAG_FRACTION" 'BEGIN { printf "%.0f", r * f }')"
((RATE > 0)) || RATE=1
sync
commit_sum0="$(metric coffer_commit_seconds_sum b)"
commit_count0="$(metric coffer_commit_seconds_count b)"
index_sum0="$(metric coffer_index_commit_seconds_sum)"
index_count0="$(metric coffer_index_commit_seconds_count)"
LAG_SINCE="$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)"
say "lag: $RATE msg/s offered to A for ${LAG_SECONDS}s (a batch every ${TICK_MS} ms)"
# Open loop on the clock: every tick sends what is due by then (rate x elapsed, minus
# what was sent), so a late tick sends a bigger batch instead of lowering the rate.
total=$((RATE * LAG_SECONDS))
sent=0
skipped=0
pids=()
t0="${EPOCHREALTIME/./}"
for ((i = 1; sent + skipped < total && i <= LAG_SECONDS * 1000 / TICK_MS + 1000; i++)); do
    now="${EPOCHREALTIME/./}"
    due=$(((now - t0) * RATE / 1000000))
    ((due <= total)) || due=$total
    k=$((due - sent - skipped))
    if ((k > 0)); then
        # Bounded: over 200 batches in flight means A is far behind.
        if (($(jobs -rp | wc -l) > 200)); then
            skipped=$((skipped + k))
        else
            s=$((k < 50 ? k : 50))
            timeout 300 "$SMTP_SOURCE" -s "$s" -m "$k" -l "$SIZE" \
                -f bench@example.org -t archive@example.net \
                "${IP[a]}:${PORT[a]}" >>"$TMP/lag-load.log" 2>&1 &
            pids+=($!)
            sent=$((sent + k))
        fi
    fi
    next=$((t0 + i * TICK_MS * 1000))
    now="${EPOCHREALTIME/./}"
    if ((next > now)); then
        sleep "$(printf '%d.%06d' $(((next - now) / 1000000)) $(((next - now) % 1000000)))"
    fi
done
t1="${EPOCHREALTIME/./}"
load_failed=0
for p in "${pids[@]}"; do wait "$p" || load_failed=$((load_failed + 1)); done
ACHIEVED="$(awk -v n="$sent" -v us="$((t1 - t0))" 'BEGIN { printf "%.0f", n * 1e6 / us }')"
wait_drained "$DRAIN_DEADLINE" >/dev/null || die "A did not finish shipping the lag run"
# B's group commits meanwhile (append + fdatasync): what each shipping session waits on.
mean_ms() {
    awk -v s0="$1" -v c0="$2" -v s1="$3" -v c1="$4" \
        'BEGIN { if (c1 > c0) printf "%.1f ms mean over %d", (s1 - s0) * 1000 / (c1 - c0), c1 - c0; else print "n/a" }'
}
B_COMMIT="$(mean_ms "$commit_sum0" "$commit_count0" "$(metric coffer_commit_seconds_sum b)" \
    "$(metric coffer_commit_seconds_count b)")"
# A's index transactions meanwhile: a replicator sees an arrival once it is indexed.
A_INDEX="$(mean_ms "$index_sum0" "$index_count0" "$(metric coffer_index_commit_seconds_sum)" \
    "$(metric coffer_index_commit_seconds_count)")"
coffer b search --since "$LAG_SINCE" --limit 0 --json >"$TMP/lag-arrivals.json"
LAG_LINE="$(python3 - "$TMP/lag-arrivals.json" <<'EOF_PY'
import datetime, json, sys
def t(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
lags = []
for rec in json.load(open(sys.argv[1])):
    for a in rec["arrivals"]:
        if a.get("received") and a["id"].startswith("a/"):
            lags.append(t(a["received"]) - t(a["time"]))
lags.sort()
def q(p):
    return lags[min(len(lags) - 1, max(0, int(p * len(lags) + 0.999999) - 1))] * 1000
if lags:
    print("n=%d p50_ms=%.1f p99_ms=%.1f max_ms=%.1f" % (len(lags), q(0.5), q(0.99), lags[-1] * 1000))
else:
    print("n=0")
EOF_PY
)"
field() { sed -n "s/.* \?$1=\([^ ]*\).*/\1/p" <<<"$2"; }
LAG_N="$(field n "$LAG_LINE")"
say "lag run: $sent sent ($ACHIEVED msg/s), $LAG_N arrivals measured on B: $LAG_LINE"

# --- 3. catch-up ----------------------------------------------------------------------------
say "catch-up: B stopped, $CATCHUP_MESSAGES messages into A"
stop_pid "${PID[b]}" "cofferd B"
PID[b]=""
timeout "$RUN_DEADLINE" "$SMTP_SOURCE" -s "$SESSIONS" -m "$CATCHUP_MESSAGES" -l "$SIZE" \
    -f bench@example.org -t archive@example.net "${IP[a]}:${PORT[a]}" >"$TMP/backlog.log" 2>&1 ||
    die "smtp-source into A failed: $(tail -5 "$TMP/backlog.log")"
# The index (which the replicator reads) trails the log by up to ~50 ms: wait until A
# counts the whole backlog.
BACKLOG=""
for ((i = 0; i < 600; i++)); do
    BACKLOG="$(metric "$LAG_SERIES")"
    [ -n "$BACKLOG" ] && ((BACKLOG >= CATCHUP_MESSAGES)) && break
    sleep 0.1
done
say "A's backlog for B: $BACKLOG arrivals"
sync
start_node b
CATCHUP_SECS="$(wait_drained "$DRAIN_DEADLINE")" || die "B did not catch up in $DRAIN_DEADLINE s"
CATCHUP_RATE="$(awk -v n="$BACKLOG" -v s="$CATCHUP_SECS" 'BEGIN { printf "%.0f", n / (s > 0 ? s : 0.001) }')"
say "B caught up on $BACKLOG arrivals in $CATCHUP_SECS s = $CATCHUP_RATE msg/s"

# --- check and report -----------------------------------------------------------------------
ARR_A="$(arrivals a)"
ARR_B="$(arrivals b)"
FAILED=0
# B holds A's arrivals plus its own capacity run's.
if [ "$ARR_B" -ne $((ARR_A + CAPACITY_MESSAGES)) ]; then
    say "MISMATCH: A holds $ARR_A arrivals, B $ARR_B (expected A's + $CAPACITY_MESSAGES of its own)"
    FAILED=1
fi
((skipped == 0 && load_failed == 0)) || FAILED=1
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
hwm() { awk '/^VmHWM:/ { print $2, $3 }' "/proc/$1/status" 2>/dev/null || echo "unknown"; }

echo
echo "Replication A -> B on loopback, $SIZE B messages, one message per connection into the nodes"
printf '%-44s%14s   %s\n' "B's own ingest capacity (reference)" "$CAP_B msg/s" "smtp-source -s $SESSIONS -m $CAPACITY_MESSAGES"
printf '%-44s%14s   %s\n' "A's ingest capacity (replicating)" "$CAP_A msg/s" "the same into A"
printf '%-44s%14s   %s\n' "lag run load" "$ACHIEVED msg/s" "$LAG_FRACTION of A's capacity, ${LAG_SECONDS}s, $sent messages$( ((skipped == 0)) || echo ", $skipped NOT sent")$( ((load_failed == 0)) || echo ", $load_failed batches failed")"
printf '%-44s%14s   %s\n' "lag p50" "$(field p50_ms "$LAG_LINE") ms" "B's received - A's time, $LAG_N arrivals"
printf '%-44s%14s   %s\n' "lag p99" "$(field p99_ms "$LAG_LINE") ms" "target < 1000 ms"
printf '%-44s%14s\n' "lag max" "$(field max_ms "$LAG_LINE") ms"
printf '%-44s%s\n' "B's log commits during the lag run" "$B_COMMIT (append + fdatasync)"
printf '%-44s%s\n' "A's index commits during the lag run" "$A_INDEX"
printf '%-44s%14s   %s\n' "catch-up" "$CATCHUP_RATE msg/s" "$BACKLOG arrivals in $CATCHUP_SECS s from B's restart"
printf '%-44s%14s   %s\n' "catch-up / B's ingest capacity" "$(ratio "$CATCHUP_RATE" "$CAP_B")" "target >= 0.80"
printf '%-44s%14s\n' "peak RSS (VmHWM) A" "$(hwm "${PID[a]}")"
printf '%-44s%14s\n' "peak RSS (VmHWM) B (since restart)" "$(hwm "${PID[b]}")"
printf '%-44s%14s\n' "arrivals A / B" "$ARR_A / $ARR_B"
exit "$FAILED"
