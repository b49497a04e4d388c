# Shared by the benchmark scripts (source it; it defines functions only).
#
# Expects, where used: START_DEADLINE (seconds a service gets to greet), POSTFIX (the
# postfix command), POSTFIX_DIR and POSTFIX_STARTED (the throwaway instance), TMP.

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'bench: %s\n' "$*" >&2
    exit 1
}

# Stops a process we started: SIGTERM, wait (bounded), then SIGKILL.
stop_pid() {
    local pid="$1" name="$2" i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name did not stop in 30 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# A port that nothing answers on at $1, picked at random (bounded tries). The service
# that binds it afterwards fails loudly if another process took it meanwhile.
free_port() {
    local ip="$1" port i
    for ((i = 0; i < 100; i++)); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/$ip/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found on $ip"
}

# Waits (bounded by START_DEADLINE) until $1:$2 greets with 220; $3 is a PID that must
# stay alive meanwhile (empty: none).
wait_smtp() {
    local ip="$1" port="$2" pid="${3:-}" end line l
    end=$((SECONDS + START_DEADLINE))
    while ((SECONDS < end)); do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        # In a subshell: a failed `exec` redirection would end this shell.
        line="$( (
            exec 3<>"/dev/tcp/$ip/$port" || exit 1
            read -r -t 5 l <&3 || true
            printf 'QUIT\r\n' >&3 || true
            printf '%s' "$l"
        ) 2>/dev/null || true)"
        case "$line" in 220*) return 0 ;; esac
        sleep 0.1
    done
    return 1
}

# Writes a throwaway Postfix instance into $POSTFIX_DIR (config, queue and data dirs)
# that accepts into its own queue and discards. $1: extra main.cf lines; $2: the smtpd
# service lines of master.cf.
write_postfix() {
    local d="$POSTFIX_DIR" extra_main="$1" smtpd_lines="$2"
    mkdir -p "$d/etc" "$d/spool" "$d/data"
    # Postfix runs its daemons as the postfix user; the temp dir must let them in.
    chmod 755 "$TMP"
    chown postfix: "$d/data"
    cat >"$d/etc/main.cf" <<EOF_MAIN
# Throwaway benchmark instance: accept into the queue, then discard.
compatibility_level = 3.6
queue_directory = $d/spool
data_directory = $d/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = $d/maillog
maillog_file_prefixes = $d
myhostname = bench.invalid
mydomain = bench.invalid
myorigin = bench.invalid
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
default_transport = discard:bench
local_transport = discard:bench
relay_transport = discard:bench
virtual_transport = discard:bench
biff = no
smtputf8_enable = no
$extra_main
EOF_MAIN
    cat >"$d/etc/master.cf" <<EOF_MASTER
# service type  private unpriv  chroot  wakeup  maxproc command
$smtpd_lines
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF_MASTER
    "$POSTFIX" -c "$d/etc" check >"$TMP/postfix-start.log" 2>&1 ||
        die "postfix check failed: $(cat "$TMP/postfix-start.log")"
    POSTFIX_STARTED=1
    "$POSTFIX" -c "$d/etc" start >>"$TMP/postfix-start.log" 2>&1 ||
        die "postfix start failed: $(cat "$TMP/postfix-start.log")"
}

# Stops the throwaway instance and waits for its master, by PID.
stop_postfix() {
    [ "${POSTFIX_STARTED:-0}" = 1 ] || return 0
    POSTFIX_STARTED=0
    local master_pid=""
    [ -f "$POSTFIX_DIR/spool/pid/master.pid" ] &&
        master_pid="$(tr -dc 0-9 <"$POSTFIX_DIR/spool/pid/master.pid")"
    say "stopping the bench Postfix instance"
    "$POSTFIX" -c "$POSTFIX_DIR/etc" stop >/dev/null 2>&1
    # `postfix stop` signals master and returns: wait for it, by PID.
    stop_pid "$master_pid" "postfix master"
}

# Messages still in the instance's queue (incoming, active, deferred, maildrop).
queued() {
    find "$POSTFIX_DIR/spool/incoming" "$POSTFIX_DIR/spool/active" \
        "$POSTFIX_DIR/spool/deferred" "$POSTFIX_DIR/spool/maildrop" -type f 2>/dev/null | wc -l
}

# Waits (bounded by $1 seconds) until the instance has discarded everything it queued.
drain() {
    local end=$((SECONDS + $1))
    while ((SECONDS < end)); do
        [ "$(queued)" -eq 0 ] && return 0
        sleep 0.2
    done
    say "the queue still holds $(queued) messages after $1 s; going on"
}
