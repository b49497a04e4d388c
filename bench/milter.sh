#!/usr/bin/env bash
# Milter benchmark (design.md §6): what coffer-milter + cofferd cost a real Postfix.
#
# One throwaway Postfix instance (private config, queue and data dirs under a temp dir,
# delivering to the discard transport) with three smtpd services on 127.0.0.1:
#   plain   `-o smtpd_milters=`: Postfix alone (accept into its queue, with its fsyncs)
#   noop    the same with a no-op milter (milter/examples/noop_milter.rs: negotiates
#           what coffer-milter negotiates, receives every header and body chunk, keeps
#           nothing, answers at once): the floor, what the milter protocol costs
#           Postfix itself
#   milter  smtpd_milters = { unix:…/milter.sock, default_action=tempfail }: the same
#           Postfix with coffer-milter handing every message to cofferd (release
#           builds, a temp store) before Postfix may accept it
# Same queue, same cleanup and qmgr, so the differences are the milter protocol and
# the archive.
#
# 1. Capacity: `smtp-source -s SESSIONS -m MESSAGES -l SIZE` (one message per
#    connection) against each service, the order rotating from round to round,
#    BENCH_ROUNDS times; the median msg/s of each and the ratios to Postfix alone
#    (target for coffer-milter >= 0.85), and the median of the ratios within each round
#    (whose three runs are next to each other in time). The queue is drained before each run. For
#    each service the CPU time per message of Postfix (master and all its children),
#    smtp-source, the no-op milter, coffer-milter, cofferd and kernel threads, their
#    total, and "other": CPU that no part of the benchmark used (another process on the
#    machine; when it is large the rates are not to be trusted), over all its runs,
#    from /proc. And how many messages cofferd committed per log fdatasync (its
#    /metrics, read with curl) during the coffer-milter runs, and the bytes its log
#    stage and its index stage wrote per message (their threads' write_bytes in /proc).
# 2. Half load: the milter service is offered HALF_FRACTION of its measured capacity,
#    open loop (a new smtp-source batch every TICK_MS ms) for HALF_SECONDS. Meanwhile
#    an fsync probe writes and fdatasyncs 4 KiB in a loop on the store's filesystem.
#    Reported: coffer-milter's end-of-message latency p50/p90/p99/max over exactly that
#    window (its SIGUSR1 report, docs/milter.md "Latency report"; target p99 < 20 ms),
#    beside the probe's fdatasync p50/p99/max, and where in cofferd the time went over
#    the same window (its /metrics histograms, so bucket bounds, not exact values): from
#    a message's hand-off to the store until the answer, and the log's group commits
#    (write + fdatasync) alone.
# 3. Peak RSS (VmHWM) of coffer-milter and cofferd, and a check that cofferd holds one
#    arrival per message sent through the milter service.
#
# Usage: bench/milter.sh
# Environment (all optional):
#   BENCH_MESSAGES=10000      messages per capacity run
#   BENCH_SESSIONS=20         parallel SMTP sessions in capacity runs
#   BENCH_SIZE=10240          payload bytes per message
#   BENCH_ROUNDS=3            capacity runs per service (the median is reported)
#   BENCH_WARMUP=500          messages sent to each service first, not counted (starts
#                             Postfix's smtpd and cleanup processes, fills caches)
#   BENCH_HALF_FRACTION=0.5   offered load of the latency run, as a fraction of the
#                             measured with-milter capacity
#   BENCH_HALF_SECONDS=20     length of the latency run
#   BENCH_TICK_MS=20          pacing of the latency run
#   BENCH_NO_BUILD=1          use the existing release build
#   BENCH_KEEP=1              keep the temp dir (logs, store, Postfix) for inspection
# Needs root (a Postfix instance), postfix (smtp-source, postfix), cargo unless
# BENCH_NO_BUILD=1, and python3 for the fsync probe (without it the probe falls back
# to dd oflag=dsync, which gives a mean only).
# Everything started here is stopped by PID on exit, also on error or Ctrl-C. The
# figures are only as good as the machine is quiet: the "rest" CPU column shows how
# much else ran meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES="${BENCH_MESSAGES:-10000}"
SESSIONS="${BENCH_SESSIONS:-20}"
SIZE="${BENCH_SIZE:-10240}"
ROUNDS="${BENCH_ROUNDS:-3}"
WARMUP="${BENCH_WARMUP:-500}"
HALF_FRACTION="${BENCH_HALF_FRACTION:-0.5}"
HALF_SECONDS="${BENCH_HALF_SECONDS:-20}"
TICK_MS="${BENCH_TICK_MS:-20}"
START_DEADLINE=60 # seconds a service gets to come up
DRAIN_DEADLINE=300 # seconds the queue gets to empty between runs
RUN_DEADLINE=1800  # seconds one smtp-source run may take
SMTP_SOURCE=/usr/sbin/smtp-source
POSTFIX=/usr/sbin/postfix

# shellcheck source=bench/lib.sh
. bench/lib.sh

for tool in "$SMTP_SOURCE" "$POSTFIX"; do
    [ -x "$tool" ] || die "$tool missing: install the Debian package postfix (see .ci/run)"
done
[ "$(id -u)" -eq 0 ] || die "a throwaway Postfix instance needs root"
for n in "$MESSAGES" "$SESSIONS" "$SIZE" "$ROUNDS" "$HALF_SECONDS" "$TICK_MS"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "not a positive integer: $n"
done
[[ "$WARMUP" =~ ^[0-9]+$ ]] || die "BENCH_WARMUP: not a number: $WARMUP"

TMP="$(mktemp -d /tmp/coffer-milterbench.XXXXXX)"
COFFERD_PID=""
MILTER_PID=""
NOOP_PID=""
PROBE_PID=""
POSTFIX_DIR="$TMP/postfix"
POSTFIX_STARTED=0

cleanup() {
    set +e
    stop_pid "$PROBE_PID" "fsync probe"
    stop_postfix
    stop_pid "$MILTER_PID" coffer-milter
    stop_pid "$NOOP_PID" "no-op milter"
    stop_pid "$COFFERD_PID" cofferd
    if [ "${BENCH_KEEP:-}" = 1 ]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits (bounded) until socket $1 exists while PID $2 lives.
wait_socket() {
    local path="$1" pid="$2" end
    end=$((SECONDS + START_DEADLINE))
    while ((SECONDS < end)); do
        kill -0 "$pid" 2>/dev/null || return 1
        [ -S "$path" ] && return 0
        sleep 0.1
    done
    return 1
}

# --- build ------------------------------------------------------------------------------
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release"
if [ "${BENCH_NO_BUILD:-}" != 1 ]; then
    say "cargo build --release --locked --bin cofferd --bin coffer --bin coffer-milter --example noop_milter"
    cargo build --release --locked --bin cofferd --bin coffer --bin coffer-milter \
        -p coffer-archiver -p coffer-milter --example noop_milter
fi
for b in cofferd coffer coffer-milter examples/noop_milter; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (cargo build --release)"
done

# --- cofferd and coffer-milter ----------------------------------------------------------
# Postfix's smtpd and cleanup (user postfix) must reach the milter socket.
chmod 755 "$TMP"
C="$TMP/coffer"
mkdir -p "$C"
chmod 755 "$C"
CONSOLE_PORT="$(free_port 127.0.0.1)"
cat >"$C/coffer.toml" <<EOF_TOML
# Throwaway store for bench/milter.sh.
[node]
name = "bench"
data_dir = "data"

[store]
min_free_disk = "256MiB"

[[listener]]
name = "milter"
protocol = "lmtp"
bind = "unix:lmtp.sock"
trust_xcoffer = true
socket_mode = 0o600

[[route]]
from = ["milter"]
archive = true
forward = []

[milter]
listen = "unix:milter.sock"
target = "unix:lmtp.sock"
socket_mode = 0o666
timeout = "60s"

[console]
bind = "127.0.0.1:$CONSOLE_PORT"
EOF_TOML
"$BIN/cofferd" --config "$C/coffer.toml" >"$C/cofferd.log" 2>&1 &
COFFERD_PID=$!
wait_socket "$C/lmtp.sock" "$COFFERD_PID" || die "cofferd did not start: $(tail -20 "$C/cofferd.log")"
RUST_LOG=info "$BIN/coffer-milter" --config "$C/coffer.toml" >"$C/coffer-milter.log" 2>&1 &
MILTER_PID=$!
wait_socket "$C/milter.sock" "$MILTER_PID" ||
    die "coffer-milter did not start: $(tail -20 "$C/coffer-milter.log")"
"$BIN/examples/noop_milter" "unix:$C/noop.sock" >"$C/noop-milter.log" 2>&1 &
NOOP_PID=$!
wait_socket "$C/noop.sock" "$NOOP_PID" ||
    die "the no-op milter did not start: $(tail -20 "$C/noop-milter.log")"
say "cofferd (pid $COFFERD_PID), coffer-milter (pid $MILTER_PID), no-op milter (pid $NOOP_PID) up in $C"

# --- the throwaway Postfix --------------------------------------------------------------
PLAIN_PORT="$(free_port 127.0.0.1)"
NOOP_PORT="$(free_port 127.0.0.1)"
MILTER_PORT="$(free_port 127.0.0.1)"
[ "$(printf '%s\n' "$PLAIN_PORT" "$NOOP_PORT" "$MILTER_PORT" | sort -u | wc -l)" = 3 ] ||
    die "port clash, run again"
d="$POSTFIX_DIR"
say "postfix -c $d/etc start (plain smtpd on :$PLAIN_PORT, no-op milter on :$NOOP_PORT, coffer-milter on :$MILTER_PORT)"
# coffer-milter as in production (docs/milter.md), failing closed; the plain smtpd
# service turns it off with -o smtpd_milters=, the no-op one swaps in the no-op milter.
write_postfix "milter_protocol = 6
smtpd_milters = { unix:$C/milter.sock, default_action=tempfail }
bench_noop_milters = { unix:$C/noop.sock, default_action=tempfail }
non_smtpd_milters =
milter_connect_timeout = 30s
milter_command_timeout = 30s
milter_content_timeout = 300s" \
    "127.0.0.1:$PLAIN_PORT inet n  -       n       -       -       smtpd -o smtpd_milters=
127.0.0.1:$NOOP_PORT inet n  -       n       -       -       smtpd -o smtpd_milters=\$bench_noop_milters
127.0.0.1:$MILTER_PORT inet n -       n       -       -       smtpd"
for p in "$PLAIN_PORT" "$NOOP_PORT" "$MILTER_PORT"; do
    wait_smtp 127.0.0.1 "$p" "" || die "Postfix did not greet on $p: $(tail -20 "$d/maillog" 2>/dev/null)"
done

TARGETS=(plain noop milter)
declare -A PORT=([plain]="$PLAIN_PORT" [noop]="$NOOP_PORT" [milter]="$MILTER_PORT")
declare -A LABEL=([plain]="postfix alone" [noop]="postfix + no-op milter" [milter]="postfix + coffer-milter")

# --- CPU accounting ---------------------------------------------------------------------
# Clock ticks of CPU (user + system) used so far, from /proc, as "postfix source milter
# cofferd noop kernel busy": Postfix's master with every child it reaped plus its live
# children; this shell's reaped children (smtp-source, under timeout); the three
# daemons; kernel threads (writeback, block I/O) plus interrupt time; and the whole
# machine's busy time (everything but idle, iowait and steal). Busy minus the rest is "other":
# processes that are no part of the benchmark.
HZ="$(getconf CLK_TCK)"
MASTER_PID=""
proc_ticks() { # PID [1 = with reaped children]
    local stat f
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || {
        echo 0
        return
    }
    read -r -a f <<<"${stat##*) }"
    if [ "${2:-0}" = 1 ]; then
        echo $((f[11] + f[12] + f[13] + f[14]))
    else
        echo $((f[11] + f[12]))
    fi
}
cpu_snapshot() { # FILE: where the kernel threads' "pid ticks" go (see kthread_ticks)
    local kids sys
    [ -n "$MASTER_PID" ] || MASTER_PID="$(tr -dc 0-9 <"$POSTFIX_DIR/spool/pid/master.pid")"
    # Live children of master (smtpd, cleanup, qmgr, ...): utime + stime; each kernel
    # thread (child of kthreadd, pid 2) apart, since they come and go. (cat, not awk,
    # opens the files: a process may end meanwhile.)
    kids="$({ cat /proc/[0-9]*/stat 2>/dev/null || true; } |
        awk -v m="$MASTER_PID" -v kt="$1" '{ pid = $1; sub(/^.*\) /, "")
            if ($2 == m) p += $12 + $13
            if ($2 == 2 || pid == 2) print pid, $12 + $13 >kt }
            END { print p + 0 }')"
    # busy (user nice system irq softirq) and irq + softirq
    sys="$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $7 + $8; exit }' /proc/stat)"
    echo "$(($(proc_ticks "$MASTER_PID" 1) + kids)) \
$(awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$$/stat") \
$(proc_ticks "$MILTER_PID") $(proc_ticks "$COFFERD_PID") $(proc_ticks "$NOOP_PID") \
${sys#* } ${sys% *}"
}
# Ticks kernel threads used between two cpu_snapshot files: those in both by their
# difference, new ones whole (one that ended meanwhile is lost: a small undercount).
kthread_ticks() {
    awk 'NR == FNR { b[$1] = $2; next } { d += ($1 in b) ? $2 - b[$1] : $2 } END { print d + 0 }' "$1" "$2"
}
# cofferd's group commits so far, "messages batches" (its /metrics; "0 0" without curl).
commits() {
    command -v curl >/dev/null 2>&1 || {
        echo "0 0"
        return
    }
    curl -fsS --max-time 5 "http://127.0.0.1:$CONSOLE_PORT/metrics" 2>/dev/null |
        awk '/^coffer_commit_batch_messages_sum / { s = $2 } /^coffer_commit_batch_messages_count / { c = $2 }
            END { printf "%d %d\n", s, c }'
}
# One cofferd histogram's cumulative buckets, "le count" per line (empty without curl).
hist_snapshot() {
    command -v curl >/dev/null 2>&1 || return 0
    curl -fsS --max-time 5 "http://127.0.0.1:$CONSOLE_PORT/metrics" 2>/dev/null |
        sed -n "s/^$1_bucket{le=\"\([^\"]*\)\"} \([0-9]*\)$/\1 \2/p"
}
# The p50 and p99 of what a histogram observed between two snapshots, as the upper
# bounds of the buckets they fall in: "p50 <= A ms, p99 <= B ms (n=N)".
hist_quantiles() { # BEFORE AFTER UNIT_TO_MS
    awk -v f="$3" 'NR == FNR { b[$1] = $2; next }
        { le[++n] = $1; c[n] = $2 - (($1 in b) ? b[$1] : 0) }
        function q(p,   i) { for (i = 1; i <= n; i++) if (c[i] >= p * c[n]) return le[i] == "+Inf" ? "+Inf" : le[i] * f; return "?" }
        END { if (n == 0 || c[n] == 0) { print "no observations"; exit }
              printf "p50 <= %s ms, p99 <= %s ms (n=%d; bucket bounds of its histogram)", q(0.5), q(0.99), c[n] }' \
        <(printf '%s\n' "$1") <(printf '%s\n' "$2")
}
COMMITTED_MESSAGES=0
COMMIT_BATCHES=0
# Bytes cofferd's log stage and index stage have written so far, "log index": each
# thread's write_bytes in /proc (counted when a page is dirtied, by the thread that
# dirtied it).
store_writes() {
    local t log=0 index=0 comm bytes
    for t in /proc/"$COFFERD_PID"/task/*; do
        comm="$(cat "$t/comm" 2>/dev/null)" || continue
        bytes="$(awk '/^write_bytes:/ { print $2 }' "$t/io" 2>/dev/null)" || continue
        case "$comm" in
        store-writer) log=$((log + ${bytes:-0})) ;;
        store-indexer) index=$((index + ${bytes:-0})) ;;
        esac
    done
    echo "$log $index"
}
LOG_WRITTEN=0
INDEX_WRITTEN=0
declare -A CPU=() # per target: summed ticks, as cpu_snapshot
declare -A CPU_MESSAGES=()
cpu_add() { # TARGET "before" "after" MESSAGES KTHREAD_TICKS
    local -a before after sum
    read -r -a before <<<"$2"
    read -r -a after <<<"$3"
    read -r -a sum <<<"${CPU[$1]:-0 0 0 0 0 0 0}"
    local i out=""
    after[5]=$((after[5] + $5))
    for i in 0 1 2 3 4 5 6; do out+="$((sum[i] + after[i] - before[i])) "; done
    CPU[$1]="$out"
    CPU_MESSAGES[$1]=$((${CPU_MESSAGES[$1]:-0} + $4))
}
# One line of µs of CPU per message for a target.
cpu_line() {
    local -a sum
    read -r -a sum <<<"${CPU[$1]:-0 0 0 0 0 0 0}"
    awk -v n="${CPU_MESSAGES[$1]:-0}" -v hz="$HZ" -v pf="${sum[0]}" -v src="${sum[1]}" \
        -v mil="${sum[2]}" -v cd="${sum[3]}" -v noop="${sum[4]}" -v kern="${sum[5]}" \
        -v busy="${sum[6]}" 'BEGIN {
        if (n == 0) { print "not measured"; exit }
        u = 1e6 / hz / n
        other = busy - pf - src - mil - cd - noop - kern
        printf "%5.0f %7.0f %7.0f %7.0f %7.0f %7.0f %7.0f %7.0f\n",
            pf * u, src * u, noop * u, mil * u, cd * u, kern * u, (pf + src + noop + mil + cd + kern) * u, other * u
    }'
}

# --- 1. capacity ------------------------------------------------------------------------
declare -A RESULTS=()
MILTER_SENT=0
FAILED=0
run_one() {
    local t="$1" start end ms rate cpu0 cpu1 commits0 commits1 writes0 writes1
    drain "$DRAIN_DEADLINE"
    read -r -a commits0 <<<"$(commits)"
    read -r -a writes0 <<<"$(store_writes)"
    cpu0="$(cpu_snapshot "$TMP/kthreads.0")"
    start="${EPOCHREALTIME/./}"
    if ! timeout "$RUN_DEADLINE" "$SMTP_SOURCE" -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" \
        -f bench@example.org -t archive@example.net "127.0.0.1:${PORT[$t]}" >"$TMP/run.log" 2>&1; then
        say "${LABEL[$t]}: smtp-source failed: $(tail -5 "$TMP/run.log")"
        FAILED=1
        RESULTS[$t]+="failed "
        LAST[$t]=failed
        return 0
    fi
    end="${EPOCHREALTIME/./}"
    cpu1="$(cpu_snapshot "$TMP/kthreads.1")"
    cpu_add "$t" "$cpu0" "$cpu1" "$MESSAGES" "$(kthread_ticks "$TMP/kthreads.0" "$TMP/kthreads.1")"
    if [ "$t" = milter ]; then
        read -r -a commits1 <<<"$(commits)"
        COMMITTED_MESSAGES=$((COMMITTED_MESSAGES + commits1[0] - commits0[0]))
        COMMIT_BATCHES=$((COMMIT_BATCHES + commits1[1] - commits0[1]))
        sleep 0.5 # the index stage trails the log by up to one commit spacing
        read -r -a writes1 <<<"$(store_writes)"
        LOG_WRITTEN=$((LOG_WRITTEN + writes1[0] - writes0[0]))
        INDEX_WRITTEN=$((INDEX_WRITTEN + writes1[1] - writes0[1]))
    fi
    ms=$(((end - start) / 1000))
    rate="$(awk -v m="$MESSAGES" -v ms="$ms" 'BEGIN { printf "%.0f", m * 1000 / (ms > 0 ? ms : 1) }')"
    say "${LABEL[$t]}: $MESSAGES messages in ${ms} ms = $rate msg/s"
    RESULTS[$t]+="$rate "
    LAST[$t]="$rate"
    [ "$t" = milter ] && MILTER_SENT=$((MILTER_SENT + MESSAGES))
    return 0
}

if ((WARMUP > 0)); then
    for t in "${TARGETS[@]}"; do
        say "${LABEL[$t]}: warm-up, $WARMUP messages (not counted)"
        timeout "$RUN_DEADLINE" "$SMTP_SOURCE" -s "$SESSIONS" -m "$WARMUP" -l "$SIZE" \
            -f bench@example.org -t archive@example.net "127.0.0.1:${PORT[$t]}" \
            >"$TMP/warmup.log" 2>&1 || die "warm-up failed: $(tail -5 "$TMP/warmup.log")"
    done
    MILTER_SENT=$((MILTER_SENT + WARMUP))
fi
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a / b; else print "n/a" }'
}
# Ratios within each round too: the three runs of a round are next to each other in
# time, so a slow drift in what else runs on the machine cancels out of them.
declare -A LAST=()
ROUND_NOOP=""
ROUND_MILTER=""
for ((round = 1; round <= ROUNDS; round++)); do
    # Rotate the order: each service goes first, second and third in turn.
    for ((i = 0; i < ${#TARGETS[@]}; i++)); do
        run_one "${TARGETS[$(((round - 1 + i) % ${#TARGETS[@]}))]}"
    done
    ROUND_NOOP+="$(ratio "${LAST[noop]}" "${LAST[plain]}") "
    ROUND_MILTER+="$(ratio "${LAST[milter]}" "${LAST[plain]}") "
done

median() { # WORDS [printf format of an even count's mean]
    # shellcheck disable=SC2086
    printf '%s\n' $1 | grep -E '^[0-9.]+$' | sort -n |
        awk -v f="${2:-%.0f}" '{ v[NR] = $1 } END { if (NR == 0) print "failed"; else if (NR % 2) print v[(NR + 1) / 2]; else printf f "\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
PLAIN_MED="$(median "${RESULTS[plain]:-}")"
NOOP_MED="$(median "${RESULTS[noop]:-}")"
MILTER_MED="$(median "${RESULTS[milter]:-}")"

# --- 2. half load: milter latency beside the disk's fsync latency -----------------------
# The number of "eom latency" report lines in the milter's log.
reports() { grep -c 'eom latency since the last report' "$C/coffer-milter.log" || true; }
# Sends SIGUSR1 and waits (bounded) for the report; prints it.
milter_report() {
    local before end
    before="$(reports)"
    kill -USR1 "$MILTER_PID"
    end=$((SECONDS + 30))
    while ((SECONDS < end)); do
        if (($(reports) > before)); then
            grep 'eom latency since the last report' "$C/coffer-milter.log" | tail -1
            return 0
        fi
        sleep 0.1
    done
    say "coffer-milter did not report its latency"
}
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

# The fsync probe: 4 KiB write + fdatasync in a loop on the store's filesystem until
# told to stop (SIGTERM) or for at most the given seconds; prints samples and quantiles.
PROBE_OUT="$TMP/fsync-probe.txt"
start_probe() {
    local secs="$1" file="$C/data/fsync-probe.bin"
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$file" "$secs" >"$PROBE_OUT" 2>&1 <<'EOF_PY' &
import os, signal, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
buf = os.urandom(4096)
samples = []
end = time.monotonic() + secs
try:
    while not stop and time.monotonic() < end and len(samples) < 1_000_000:
        t = time.perf_counter()
        os.pwrite(fd, buf, (len(samples) % 256) * 4096)
        os.fdatasync(fd)
        samples.append(time.perf_counter() - t)
        time.sleep(0.005)
finally:
    os.close(fd)
    os.unlink(path)
samples.sort()
def q(p):
    return samples[min(len(samples) - 1, max(0, int(p * len(samples) + 0.999999) - 1))] * 1000
if samples:
    print("fsync n=%d p50_ms=%.3f p99_ms=%.3f max_ms=%.3f" % (len(samples), q(0.5), q(0.99), samples[-1] * 1000))
else:
    print("fsync n=0")
EOF_PY
        PROBE_PID=$!
    else
        say "python3 not found: the fsync probe falls back to dd oflag=dsync (mean only)"
        (
            s="${EPOCHREALTIME/./}"
            dd if=/dev/zero of="$file" bs=4k count=2000 oflag=dsync 2>/dev/null
            e="${EPOCHREALTIME/./}"
            rm -f "$file"
            awk -v us="$((e - s))" 'BEGIN { printf "fsync n=2000 mean_ms=%.3f (dd oflag=dsync; no quantiles)\n", us / 2000 / 1000 }'
        ) >"$PROBE_OUT" 2>&1 &
        PROBE_PID=$!
    fi
}

HALF_LINE="not measured (no with-milter capacity)"
LAT_LINE=""
FSYNC_LINE=""
if [[ "$MILTER_MED" =~ ^[0-9]+$ ]] && [ "$MILTER_MED" -gt 0 ]; then
    target_rate="$(awk -v r="$MILTER_MED" -v f="$HALF_FRACTION" 'BEGIN { printf "%.0f", r * f }')"
    ((target_rate > 0)) || target_rate=1
    drain "$DRAIN_DEADLINE"
    say "half load: $target_rate msg/s offered for ${HALF_SECONDS}s (ticks of ${TICK_MS} ms)"
    milter_report >/dev/null # starts a new latency window
    ingest_before="$(hist_snapshot coffer_ingest_seconds)"
    commit_before="$(hist_snapshot coffer_commit_seconds)"
    start_probe "$((HALF_SECONDS + 30))"
    ticks=$((HALF_SECONDS * 1000 / TICK_MS))
    per_tick_milli=$((target_rate * TICK_MS)) # messages per tick, in thousandths
    acc=0
    sent=0
    skipped=0
    pids=()
    t0="${EPOCHREALTIME/./}"
    for ((i = 0; i < ticks; i++)); do
        acc=$((acc + per_tick_milli))
        n=$((acc / 1000))
        acc=$((acc % 1000))
        if ((n > 0)); then
            # Open loop, but bounded: more than 200 batches in flight means the service
            # is far behind; stop adding and say so.
            if (($(jobs -rp | wc -l) > 200)); then
                skipped=$((skipped + n))
            else
                timeout 300 "$SMTP_SOURCE" -s "$n" -m "$n" -l "$SIZE" \
                    -f bench@example.org -t archive@example.net \
                    "127.0.0.1:$MILTER_PORT" >>"$TMP/half.log" 2>&1 &
                pids+=($!)
                sent=$((sent + n))
            fi
        fi
        next=$((t0 + (i + 1) * TICK_MS * 1000))
        now="${EPOCHREALTIME/./}"
        if ((next > now)); then
            sleep "$(printf '%d.%06d' $(((next - now) / 1000000)) $(((next - now) % 1000000)))"
        fi
    done
    half_failed=0
    for p in "${pids[@]}"; do wait "$p" || half_failed=$((half_failed + 1)); done
    t1="${EPOCHREALTIME/./}"
    MILTER_SENT=$((MILTER_SENT + sent))
    report="$(milter_report)"
    INGEST_LINE="$(hist_quantiles "$ingest_before" "$(hist_snapshot coffer_ingest_seconds)" 1000)"
    COMMIT_LINE="$(hist_quantiles "$commit_before" "$(hist_snapshot coffer_commit_seconds)" 1000)"
    stop_pid "$PROBE_PID" "fsync probe"
    PROBE_PID=""
    achieved="$(awk -v n="$sent" -v us="$((t1 - t0))" 'BEGIN { printf "%.0f", n * 1e6 / us }')"
    HALF_LINE="$target_rate msg/s offered ($HALF_FRACTION of $MILTER_MED) for ${HALF_SECONDS}s, $sent messages sent, $achieved msg/s achieved"
    ((skipped == 0)) || HALF_LINE+=", $skipped NOT sent (overload)"
    ((half_failed == 0)) || HALF_LINE+=", $half_failed smtp-source batches failed"
    ((skipped == 0 && half_failed == 0)) || FAILED=1
    if [ -n "$report" ]; then
        LAT_LINE="p50 $(field p50_ms "$report") ms, p90 $(field p90_ms "$report") ms, p99 $(field p99_ms "$report") ms, max $(field max_ms "$report") ms (n=$(field count "$report"), failed $(field failed "$report"))"
    else
        LAT_LINE="no report"
    fi
    probe="$(grep '^fsync' "$PROBE_OUT" | tail -1 || true)"
    if [[ "$probe" == *p99_ms=* ]]; then
        FSYNC_LINE="p50 $(field p50_ms "$probe") ms, p99 $(field p99_ms "$probe") ms, max $(field max_ms "$probe") ms (n=$(field n "$probe"))"
    else
        FSYNC_LINE="${probe:-no result: $(tail -3 "$PROBE_OUT")}"
    fi
fi

# --- 3. RSS and archive check -----------------------------------------------------------
hwm() { awk '/^VmHWM:/ { print $2, $3 }' "/proc/$1/status" 2>/dev/null || echo "unknown"; }
MILTER_HWM="$(hwm "$MILTER_PID")"
COFFERD_HWM="$(hwm "$COFFERD_PID")"
drain "$DRAIN_DEADLINE"
ARRIVALS="$("$BIN/coffer" --config "$C/coffer.toml" status --json 2>/dev/null |
    sed -n 's/^ *"arrivals": \([0-9]*\).*/\1/p' | head -1)"

# --- report -----------------------------------------------------------------------------
echo
echo "Postfix with and without coffer-milter + cofferd: $SESSIONS sessions, $MESSAGES messages of $SIZE B per run, one message per connection; msg/s (median of $ROUNDS)"
printf '%-34s%10s   %s\n' "postfix alone" "$PLAIN_MED" "runs: ${RESULTS[plain]:-}"
printf '%-34s%10s   %s\n' "postfix + no-op milter" "$NOOP_MED" "runs: ${RESULTS[noop]:-}"
printf '%-34s%10s   %s\n' "postfix + coffer-milter" "$MILTER_MED" "runs: ${RESULTS[milter]:-}"
printf '%-34s%10s   %s\n' "ratio no-op milter / alone" "$(ratio "$NOOP_MED" "$PLAIN_MED")" "the floor: the milter protocol in Postfix"
printf '%-34s%10s   %s\n' "ratio coffer-milter / alone" "$(ratio "$MILTER_MED" "$PLAIN_MED")" "target >= 0.85"
printf '%-34s%10s   %s\n' "ratio coffer-milter / no-op" "$(ratio "$MILTER_MED" "$NOOP_MED")" "what archiving costs beyond the protocol"
printf '%-34s%10s   %s\n' "per round: no-op / alone" "$(median "$ROUND_NOOP" %.2f)" "median of rounds: $ROUND_NOOP"
printf '%-34s%10s   %s\n' "per round: coffer-milter / alone" "$(median "$ROUND_MILTER" %.2f)" "median of rounds: $ROUND_MILTER"
echo
echo "CPU per message, µs (user + system, all $ROUNDS runs of each; $(nproc) CPUs; other = not part of the benchmark):"
printf '%-34s%s\n' "" "postfix  source   no-op  milter cofferd  kernel   total   other"
for t in "${TARGETS[@]}"; do printf '%-34s%s\n' "${LABEL[$t]}" "$(cpu_line "$t")"; done
if ((COMMIT_BATCHES > 0)); then
    printf '%-34s%s\n' "cofferd group commit" "$(awk -v m="$COMMITTED_MESSAGES" -v b="$COMMIT_BATCHES" \
        'BEGIN { printf "%.1f messages per log fdatasync (%d batches in the coffer-milter runs)", m / b, b }')"
    printf '%-34s%s\n' "cofferd bytes written per message" "$(awk -v l="$LOG_WRITTEN" -v i="$INDEX_WRITTEN" -v m="$COMMITTED_MESSAGES" \
        'BEGIN { printf "log stage %.0f, index stage %.0f (index / log %.1f)", l / m, i / m, (l > 0 ? i / l : 0) }')"
fi
echo
echo "half load: $HALF_LINE"
printf '%-34s%s\n' "milter end-of-message latency" "${LAT_LINE:-not measured}  (target p99 < 20 ms)"
printf '%-34s%s\n' "disk fdatasync 4 KiB, same fs" "${FSYNC_LINE:-not measured}"
printf '%-34s%s\n' "cofferd hand-off to answer" "${INGEST_LINE:-not measured}"
printf '%-34s%s\n' "cofferd log commit (write+sync)" "${COMMIT_LINE:-not measured}"
echo
printf '%-34s%s\n' "peak RSS (VmHWM) coffer-milter" "$MILTER_HWM"
printf '%-34s%s\n' "peak RSS (VmHWM) cofferd" "$COFFERD_HWM"
if [ "${ARRIVALS:-x}" = "$MILTER_SENT" ]; then
    printf '%-34s%s\n' "archived" "$ARRIVALS arrivals = messages sent through the milter"
else
    printf '%-34s%s\n' "archived" "${ARRIVALS:-unknown} arrivals, but $MILTER_SENT messages were sent through the milter"
    FAILED=1
fi
exit "$FAILED"
