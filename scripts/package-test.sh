#!/usr/bin/env bash
# The package test (docs/install.md "Building the packages"), run by .ci/run as root
# after the project's test command. On this machine, and undone at the end:
#
#   1. builds `coffer` and `coffer-milter` (scripts/package.sh), and a second pair with
#      a higher version for the upgrade;
#   2. checks their file lists, conffiles, control fields and maintainer scripts, the
#      man pages' coverage of every config key, and lintian (no errors, no warnings);
#   3. installs both with dpkg and checks what the maintainer scripts did (user, group,
#      directories, postfix in group coffer); runs `systemd-analyze verify` and
#      `security --offline=true` on the installed units (exposure must be <= 2.0);
#   4. runs ExecStartPre/ExecStart/ExecReload of both units the way systemd would,
#      without PID 1 (setpriv to user coffer, the unit's capabilities and umask, a
#      clean environment, the installed config), sends mail with swaks to the
#      packaged listener and finds it with `coffer search`; stops them by PID;
#   5. reinstalls; upgrades with an edited config (kept); removes (archive and config
#      kept); purges (config gone, archive kept, and the purge says so).
#
# A trap purges the packages and removes what the test created (the coffer user and
# group, /var/lib/coffer, postfix's membership) even when a step fails. It refuses to
# run where coffer is already installed or /etc/coffer or /var/lib/coffer exist.
#
# Environment: CARGO_TARGET_DIR as for cargo; PACKAGE_BUILD_AS=USER builds as that
# user (.ci/run under sudo), so the checkout gets no root-owned files.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
fail() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}
check() { # check DESCRIPTION COMMAND...
    local what="$1"
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/package-test.sh installs packages and must run as root" >&2
    exit 2
fi
for tool in dpkg dpkg-deb lintian setpriv swaks systemd-analyze; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (.ci/run installs it)"
done
if dpkg-query -W -f='${Status}' coffer 2>/dev/null | grep -qv "not-installed" ||
    dpkg-query -W -f='${Status}' coffer-milter 2>/dev/null | grep -qv "not-installed"; then
    fail "coffer or coffer-milter is installed on this machine; the test would remove it"
fi
for path in /etc/coffer /var/lib/coffer; do
    [ ! -e "$path" ] || fail "$path exists; the test installs and purges coffer and would touch it"
done

# --- what to undo -----------------------------------------------------------------------
had_user=0
getent passwd coffer >/dev/null && had_user=1
had_group=0
getent group coffer >/dev/null && had_group=1
had_spool_dir=0
[ -e /var/spool/postfix/coffer ] && had_spool_dir=1
work="$(mktemp -d /tmp/coffer-package-test.XXXXXX)"
chmod 755 "$work"
pids=()

cleanup() {
    local rc=$?
    set +e
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
    if dpkg-query -W coffer-milter >/dev/null 2>&1 || dpkg-query -W coffer >/dev/null 2>&1; then
        printf '\n==> cleanup: dpkg --purge coffer-milter coffer\n'
        dpkg --purge coffer-milter coffer >/dev/null 2>&1
    fi
    rm -rf /var/lib/coffer /etc/coffer
    [ "$had_spool_dir" = 1 ] || rmdir /var/spool/postfix/coffer 2>/dev/null
    if getent passwd postfix >/dev/null && getent group coffer >/dev/null &&
        id -Gn postfix | tr ' ' '\n' | grep -qx coffer && [ "$had_group" = 0 ]; then
        gpasswd -d postfix coffer >/dev/null
    fi
    [ "$had_user" = 1 ] || userdel coffer 2>/dev/null
    if [ "$had_group" = 0 ] && getent group coffer >/dev/null; then groupdel coffer; fi
    rm -rf "$work"
    if [ "$rc" -eq 0 ]; then
        printf '\n==> package test passed\n'
    else
        printf '\n==> package test FAILED (exit %s); the machine was cleaned up\n' "$rc" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_builder() {
    if [ -n "${PACKAGE_BUILD_AS:-}" ] && [ "$PACKAGE_BUILD_AS" != root ]; then
        sudo -u "$PACKAGE_BUILD_AS" -H env PATH="$PATH" \
            ${CARGO_TARGET_DIR:+CARGO_TARGET_DIR="$CARGO_TARGET_DIR"} "$@"
    else
        "$@"
    fi
}

# --- 1. build ---------------------------------------------------------------------------
say "scripts/package.sh"
mapfile -t debs < <(as_builder bash scripts/package.sh)
[ "${#debs[@]}" -eq 2 ] || fail "scripts/package.sh printed ${#debs[@]} paths, expected 2"
# cargo-deb removes older versions from its output folder: keep a copy of each pair.
mkdir -p "$work/v1" "$work/v2"
cp "${debs[@]}" "$work/v1/"
coffer_deb="$work/v1/$(basename "${debs[0]}")"
milter_deb="$work/v1/$(basename "${debs[1]}")"
version="$(dpkg-deb -f "$coffer_deb" Version)"
new_version="${version}.1"
dpkg --compare-versions "$new_version" gt "$version" || fail "$new_version is not newer than $version"
say "scripts/package.sh --deb-version $new_version (for the upgrade)"
mapfile -t new_debs < <(as_builder bash scripts/package.sh --deb-version "$new_version" --fast)
[ "${#new_debs[@]}" -eq 2 ] || fail "scripts/package.sh --deb-version printed ${#new_debs[@]} paths"
cp "${new_debs[@]}" "$work/v2/"
new_debs=("$work/v2/$(basename "${new_debs[0]}")" "$work/v2/$(basename "${new_debs[1]}")")
ls -l "$coffer_deb" "$milter_deb" "${new_debs[@]}"

# --- 2. contents ------------------------------------------------------------------------
say "package contents (dpkg-deb -c / -I)"
list() { dpkg-deb -c "$1" | awk '{print $6}' | sed 's|^\./|/|'; }
has_file() { list "$1" | grep -qx "$2"; }
for f in /usr/sbin/cofferd /usr/bin/coffer /etc/coffer/coffer.toml \
    /usr/lib/systemd/system/cofferd.service /usr/share/man/man8/cofferd.8.gz \
    /usr/share/man/man1/coffer.1.gz /usr/share/man/man5/coffer.toml.5.gz \
    /usr/share/doc/coffer/copyright /usr/share/doc/coffer/changelog.Debian.gz \
    /usr/share/doc/coffer/install.md /usr/share/doc/coffer/high-availability.md \
    /usr/share/doc/coffer/examples/coffer-smtp.conf; do
    check "coffer contains $f" has_file "$coffer_deb" "$f"
done
for f in /usr/sbin/coffer-milter /usr/lib/systemd/system/coffer-milter.service \
    /usr/share/man/man8/coffer-milter.8.gz /usr/share/coffer/postfix/main.cf.snippet \
    /usr/share/coffer/sendmail/coffer.mc /usr/share/doc/coffer-milter/copyright \
    /usr/share/doc/coffer-milter/milter.md; do
    check "coffer-milter contains $f" has_file "$milter_deb" "$f"
done
shared="$(comm -12 <(list "$coffer_deb" | grep -v '/$' | sort) <(list "$milter_deb" | grep -v '/$' | sort) |
    grep -v '^/usr/share/doc/' || true)"
check "no file outside /usr/share/doc is in both packages" test -z "$shared"
check "coffer-milter's binary is not in coffer" bash -c "! dpkg-deb -c '$coffer_deb' | grep -q coffer-milter"

ctl="$work/ctl"
mkdir -p "$ctl"
dpkg-deb -e "$coffer_deb" "$ctl/coffer"
dpkg-deb -e "$milter_deb" "$ctl/coffer-milter"
check "coffer: conffiles is exactly /etc/coffer/coffer.toml" \
    test "$(cat "$ctl/coffer/conffiles")" = /etc/coffer/coffer.toml
check "coffer-milter: no conffiles" test ! -e "$ctl/coffer-milter/conffiles"
check "coffer-milter Depends on coffer" \
    bash -c "dpkg-deb -f '$milter_deb' Depends | tr ',' '\n' | sed 's/^ *//' | grep -qx coffer"
check "coffer-milter: file trigger on /var/spool/postfix" \
    grep -qx "interest-noawait /var/spool/postfix" "$ctl/coffer-milter/triggers"
for s in coffer/preinst coffer/postinst coffer/prerm coffer/postrm \
    coffer-milter/postinst coffer-milter/prerm coffer-milter/postrm; do
    check "$s: executable, sh -n clean, no #DEBHELPER# left" \
        bash -c "test -x '$ctl/$s' && sh -n '$ctl/$s' && ! grep -q '#DEBHELPER#' '$ctl/$s'"
done
for s in coffer/postinst coffer/prerm coffer/postrm coffer-milter/postinst coffer-milter/prerm coffer-milter/postrm; do
    check "$s: the systemd section was added" grep -q 'deb-systemd-\(helper\|invoke\)' "$ctl/$s"
done
check "changelog's version is the package's ($version)" \
    test "$(head -1 packaging/deb/changelog | sed 's/.*(\(.*\)).*/\1/')" = "$version"
check "copyright is machine-readable, GPL-3+" bash -c \
    "dpkg-deb --fsys-tarfile '$coffer_deb' | tar -xO ./usr/share/doc/coffer/copyright |
     grep -q '^Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/' &&
     dpkg-deb --fsys-tarfile '$coffer_deb' | tar -xO ./usr/share/doc/coffer/copyright | grep -qx 'License: GPL-3+'"

# Every key of docs/interfaces.md's "Every key" tables is in coffer.toml(5).
keys="$(sed -n '/^### Every key/,/^### The embedded default/p' docs/interfaces.md |
    sed -n 's/^| `\([a-z_]*\)` |.*/\1/p' | sort -u)"
[ "$(wc -l <<<"$keys")" -ge 30 ] || fail "found only $(wc -l <<<"$keys") keys in docs/interfaces.md"
missing_keys=""
for k in $keys; do
    grep -qx "\.B $k" packaging/man/coffer.toml.5 || missing_keys+=" $k"
done
check "coffer.toml(5) lists every key of docs/interfaces.md ($(wc -l <<<"$keys") keys)" test -z "$missing_keys"
[ -z "$missing_keys" ] || echo "    missing:$missing_keys"

say "lintian"
lintian_out="$(lintian --fail-on error,warning --display-info "$coffer_deb" "$milter_deb" 2>&1 |
    grep -v 'running with root privileges' || true)"
printf '%s\n' "${lintian_out:-    (no tags)}"
if grep -q '^[EW]: ' <<<"$lintian_out"; then fail "lintian reports errors or warnings"; fi
ok "lintian: no errors, no warnings (overrides in packaging/deb/lintian/, each with its reason)"

# --- 3. install -------------------------------------------------------------------------
say "dpkg -i coffer coffer-milter ($version)"
dpkg -i "$coffer_deb" "$milter_deb" </dev/null 2>&1 | tee "$work/install.log"
check "both installed" bash -c "dpkg-query -W -f='\${Status}\n' coffer coffer-milter | grep -c 'install ok installed' | grep -qx 2"
check "user coffer: system uid, home /var/lib/coffer, no login shell" bash -c \
    "IFS=: read -r _ _ uid gid _ home shell < <(getent passwd coffer) &&
     [ \"\$uid\" -lt 1000 ] && [ \"\$home\" = /var/lib/coffer ] && [ \"\$shell\" = /usr/sbin/nologin ] &&
     [ \"\$gid\" = \"\$(getent group coffer | cut -d: -f3)\" ]"
check "/var/lib/coffer is coffer:coffer 0700" test "$(stat -c "%U:%G %a" /var/lib/coffer)" = "coffer:coffer 700"
check "/etc/coffer/coffer.toml is root:root 0644" test "$(stat -c '%U:%G %a' /etc/coffer/coffer.toml)" = "root:root 644"
check "cofferd.service enabled (multi-user.target.wants)" test -L /etc/systemd/system/multi-user.target.wants/cofferd.service
check "coffer-milter.service enabled" test -L /etc/systemd/system/multi-user.target.wants/coffer-milter.service
if [ -d /var/spool/postfix ]; then
    check "/var/spool/postfix/coffer is coffer:coffer 0750" \
        test "$(stat -c '%U:%G %a' /var/spool/postfix/coffer)" = "coffer:coffer 750"
fi
if getent passwd postfix >/dev/null; then
    check "postfix is in group coffer" bash -c "id -Gn postfix | tr ' ' '\n' | grep -qx coffer"
    check "the install says 'postfix reload' is needed" grep -q "postfix reload" "$work/install.log"
fi
if [ -d /var/spool/postfix ] && getent passwd postfix >/dev/null; then
    # Postfix installed after coffer-milter: its files under /var/spool/postfix fire
    # coffer-milter's file trigger. Undo what the postinst did, then fire it by hand.
    rmdir /var/spool/postfix/coffer
    gpasswd -d postfix coffer >/dev/null
    dpkg-trigger --no-await /var/spool/postfix
    dpkg --triggers-only coffer-milter </dev/null 2>&1 | tee "$work/trigger.log"
    check "the /var/spool/postfix trigger recreates /var/spool/postfix/coffer" \
        test "$(stat -c '%U:%G %a' /var/spool/postfix/coffer 2>/dev/null)" = "coffer:coffer 750"
    check "and puts postfix back in group coffer" bash -c "id -Gn postfix | tr ' ' '\n' | grep -qx coffer"
fi
check "cofferd check-config picks /etc/coffer/coffer.toml" \
    test "$(env -u COFFER_CONFIG /usr/sbin/cofferd check-config 2>/dev/null)" = "/etc/coffer/coffer.toml: ok"
check "coffer-milter check-config picks /etc/coffer/coffer.toml" \
    test "$(env -u COFFER_CONFIG /usr/sbin/coffer-milter check-config 2>/dev/null)" = "/etc/coffer/coffer.toml: ok"
if grep -rqs '^path-exclude.*/usr/share/man' /etc/dpkg/dpkg.cfg.d/; then
    echo "    dpkg excludes /usr/share/man on this machine: man pages not checked after install"
else
    check "man cofferd, coffer, coffer-milter, coffer.toml are installed" bash -c \
        "man -w 8 cofferd && man -w 1 coffer && man -w 8 coffer-milter && man -w 5 coffer.toml" >/dev/null
fi

say "systemd-analyze verify (installed units)"
units=(/usr/lib/systemd/system/cofferd.service /usr/lib/systemd/system/coffer-milter.service)
if verify_out="$(systemd-analyze verify "${units[@]}" 2>&1)"; then
    printf '%s\n' "${verify_out:-    (no findings)}"
    ok "systemd-analyze verify"
else
    printf '%s\n' "$verify_out"
    # Without systemd as PID 1 verify cannot load the unit graph (it needs a manager
    # and the units the ordering names); say so and go on. Anything about our own
    # files (a bad directive, a missing executable or man page) is still a failure.
    if grep -E '^/usr/lib/systemd/system/coffer' <<<"$verify_out" | grep -qv 'postfix'; then
        fail "systemd-analyze verify reports a problem in our units"
    fi
    echo "    systemd-analyze verify could not complete here (no systemd as PID 1: $(ps -p 1 -o comm=)); continuing"
fi

say "systemd-analyze security --offline=true"
for u in "${units[@]}"; do
    line="$(systemd-analyze security --offline=true "$u" 2>&1 | grep 'Overall exposure level')"
    echo "    $line"
    score="$(sed -n 's/.*: \([0-9.]*\) .*/\1/p' <<<"$line")"
    check "$(basename "$u") exposure $score <= 2.0" awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }'
done

# --- 4. run as systemd would ------------------------------------------------------------
# The unit's User=/Group=, its capabilities and UMask=, a clean environment, / as the
# working directory. What setpriv cannot do (namespaces, seccomp) is what
# `systemd-analyze security` rated above.
unit_value() { sed -n "s/^$2=//p" "/usr/lib/systemd/system/$1.service"; }
unit_cmd() { # unit_cmd UNIT COMMAND...: sets $cmdline to COMMAND as the unit runs it
    local unit="$1" caps
    shift
    caps="$(unit_value "$unit" AmbientCapabilities | tr 'A-Z' 'a-z' | sed 's/cap_/+/g; s/ /,/g')"
    cmdline=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
        setpriv --reuid "$(unit_value "$unit" User)" --regid "$(unit_value "$unit" Group)" --init-groups
        --inh-caps="-all${caps:+,$caps}" --ambient-caps="-all${caps:+,$caps}"
        --bounding-set="-all${caps:+,$caps}" --no-new-privs "$@")
}
as_unit() { # as_unit UNIT COMMAND...: in the foreground, with the unit's umask, in /
    unit_cmd "$@"
    (umask "$(unit_value "$1" UMask)" && cd / && exec "${cmdline[@]}")
}
run_unit() { # run_unit UNIT: ExecStartPre, then ExecStart in the background; sets $pid
    local unit="$1" cmd
    while read -r cmd; do
        [ -n "$cmd" ] || continue
        echo "    $unit ExecStartPre: $cmd"
        # shellcheck disable=SC2086
        as_unit "$unit" $cmd >>"$work/$unit.log" 2>&1 || {
            cat "$work/$unit.log"
            fail "$unit: ExecStartPre failed"
        }
    done < <(unit_value "$unit" ExecStartPre)
    cmd="$(unit_value "$unit" ExecStart)"
    echo "    $unit ExecStart: $cmd"
    # shellcheck disable=SC2086
    unit_cmd "$unit" $cmd
    # One fork, then exec all the way down: $! is the daemon's own PID.
    (umask "$(unit_value "$unit" UMask)" && cd / && exec "${cmdline[@]}") >>"$work/$unit.log" 2>&1 &
    pid=$!
    pids+=("$pid")
}
wait_for() { # wait_for DESCRIPTION PID TEST...
    local what="$1" p="$2" i
    shift 2
    for i in $(seq 1 150); do
        "$@" && return 0
        kill -0 "$p" 2>/dev/null || fail "$what: the process exited"
        sleep 0.2
    done
    fail "$what: not within 30s"
}
stop_unit() { # stop_unit UNIT PID: SIGTERM (systemd's KillSignal), expect exit 0
    local rc=0
    kill -TERM "$2"
    wait "$2" || rc=$?
    pids=("${pids[@]/$2/}")
    check "$1 stopped by SIGTERM with exit 0" test "$rc" -eq 0
}
port_open() { (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null; }
as_coffer() { setpriv --reuid coffer --regid coffer --init-groups "$@"; }

say "cofferd as systemd would run it"
if port_open; then fail "127.0.0.1:2525 is already taken on this machine"; fi
run_unit cofferd
cofferd_pid=$pid
wait_for "cofferd listening on 127.0.0.1:2525" "$cofferd_pid" port_open
wait_for "cofferd's LMTP socket" "$cofferd_pid" test -S /var/lib/coffer/lmtp.sock
check "cofferd runs as coffer" test "$(ps -o user= -p "$cofferd_pid" | tr -d ' ')" = coffer
check "lmtp.sock is coffer 0600" test "$(stat -c '%U %a' /var/lib/coffer/lmtp.sock)" = "coffer 600"

say "coffer-milter as systemd would run it"
run_unit coffer-milter
milter_pid=$pid
if [ -d /var/spool/postfix ]; then
    sock=/var/spool/postfix/coffer/milter.sock
    wait_for "coffer-milter's socket" "$milter_pid" test -S "$sock"
    check "milter.sock is coffer:coffer 0660" test "$(stat -c '%U:%G %a' "$sock")" = "coffer:coffer 660"
    if getent passwd postfix >/dev/null; then
        as_postfix() { setpriv --reuid postfix --regid postfix --init-groups "$@"; }
        check "user postfix can reach the milter socket" as_postfix test -w "$sock"
        check "user postfix cannot reach cofferd's trusted LMTP socket" \
            bash -c "! setpriv --reuid postfix --regid postfix --init-groups test -w /var/lib/coffer/lmtp.sock"
        check "user postfix cannot read the archive" \
            bash -c "! setpriv --reuid postfix --regid postfix --init-groups ls /var/lib/coffer >/dev/null 2>&1"
    fi
else
    echo "    /var/spool/postfix does not exist: the packaged milter socket cannot be created here"
    sleep 2
fi

say "swaks to the packaged listener, then coffer search"
subject="coffer package test $$"
swaks --server 127.0.0.1:2525 --from pkgtest@example.org --to archive@example.net \
    --header "Subject: $subject" --body "Sent by scripts/package-test.sh." >"$work/swaks.log" 2>&1 ||
    { cat "$work/swaks.log"; fail "swaks to 127.0.0.1:2525"; }
grep -E '^<-  250 2\.0\.0 Ok: [^ ]+ [0-9a-f]{64}' "$work/swaks.log" || cat "$work/swaks.log"
check "cofferd answered 250 with an arrival and message id" \
    grep -Eq '^<-  250 2\.0\.0 Ok: [^ ]+ [0-9a-f]{64}' "$work/swaks.log"
found="$(as_coffer /usr/bin/coffer search --config /etc/coffer/coffer.toml --subject "$subject" --json)"
id="$(grep -o '"id": *"[0-9a-f]\{64\}"' <<<"$found" | head -1 | grep -o '[0-9a-f]\{64\}' || true)"
check "coffer search --config /etc/coffer/coffer.toml finds it (as coffer)" test -n "$id"
check "coffer get $id | sha256sum is the id" \
    test "$(as_coffer /usr/bin/coffer get "$id" | sha256sum | cut -d' ' -f1)" = "$id"
check "coffer search as root (beside the daemon) finds it too" \
    bash -c "/usr/bin/coffer search --subject '$subject' | grep -q '$subject'"

say "ExecReload of cofferd (check-config, then SIGHUP)"
while read -r cmd; do
    [ -n "$cmd" ] || continue
    cmd="${cmd//\$MAINPID/$cofferd_pid}"
    echo "    ExecReload: $cmd"
    # shellcheck disable=SC2086
    as_unit cofferd $cmd >>"$work/cofferd.log" 2>&1 || fail "ExecReload: $cmd"
done < <(unit_value cofferd ExecReload)
sleep 1
check "cofferd still runs after the reload" kill -0 "$cofferd_pid"
check "and still answers on 127.0.0.1:2525" port_open
say "ExecReload of coffer-milter (check-config, then SIGHUP)"
while read -r cmd; do
    [ -n "$cmd" ] || continue
    cmd="${cmd//\$MAINPID/$milter_pid}"
    echo "    ExecReload: $cmd"
    # shellcheck disable=SC2086
    as_unit coffer-milter $cmd >>"$work/coffer-milter.log" 2>&1 || fail "ExecReload: $cmd"
done < <(unit_value coffer-milter ExecReload)
sleep 1
check "coffer-milter still runs after the reload" kill -0 "$milter_pid"

stop_unit coffer-milter "$milter_pid"
if [ -d /var/spool/postfix ]; then
    check "the milter removed its socket" test ! -e /var/spool/postfix/coffer/milter.sock
fi
stop_unit cofferd "$cofferd_pid"
check "no file in the archive belongs to root" test -z "$(find /var/lib/coffer ! -user coffer)"

# --- 5. reinstall, upgrade, remove, purge ------------------------------------------------
say "reinstall ($version)"
dpkg -i "$coffer_deb" "$milter_deb" </dev/null >"$work/reinstall.log" 2>&1 ||
    { cat "$work/reinstall.log"; fail "reinstall"; }
check "reinstalled" bash -c "dpkg-query -W -f='\${Status}\n' coffer coffer-milter | grep -c 'install ok installed' | grep -qx 2"
check "the reinstall changed nothing it had done (idempotent)" bash -c \
    "! grep -q 'created /var/spool/postfix/coffer\|added user postfix' '$work/reinstall.log'"
check "the archive survived the reinstall" bash -c \
    "setpriv --reuid coffer --regid coffer --init-groups /usr/bin/coffer search --subject '$subject' | grep -q '$subject'"

say "upgrade to $new_version with an edited config"
sed -i 's/^max_message_size = "50MiB"$/max_message_size = "40MiB"   # edited by the package test/' /etc/coffer/coffer.toml
grep -q 'edited by the package test' /etc/coffer/coffer.toml || fail "could not edit the config"
edited_sum="$(sha256sum </etc/coffer/coffer.toml)"
dpkg -i --force-confold "${new_debs[@]}" </dev/null 2>&1 | tee "$work/upgrade.log"
check "upgraded to $new_version" bash -c \
    "[ \"\$(dpkg-query -W -f='\${Version}' coffer)\" = '$new_version' ] && [ \"\$(dpkg-query -W -f='\${Version}' coffer-milter)\" = '$new_version' ]"
check "the edited config was kept" test "$(sha256sum </etc/coffer/coffer.toml)" = "$edited_sum"
check "and it is still valid" /usr/sbin/cofferd check-config
check "the archive survived the upgrade" bash -c \
    "setpriv --reuid coffer --regid coffer --init-groups /usr/bin/coffer search --subject '$subject' | grep -q '$subject'"

say "remove"
dpkg --remove coffer-milter coffer </dev/null 2>&1 | tee "$work/remove.log"
check "removed, config files left" bash -c \
    "dpkg-query -W -f='\${Status}\n' coffer coffer-milter | grep -c 'deinstall ok config-files' | grep -qx 2"
check "binaries gone" bash -c "[ ! -e /usr/sbin/cofferd ] && [ ! -e /usr/bin/coffer ] && [ ! -e /usr/sbin/coffer-milter ]"
check "the edited config is still there" test "$(sha256sum </etc/coffer/coffer.toml)" = "$edited_sum"
check "the archive is still there" bash -c "ls /var/lib/coffer | grep -q ."

say "purge"
dpkg --purge coffer-milter coffer </dev/null 2>&1 | tee "$work/purge.log"
check "purged" bash -c "! dpkg-query -W -f='\${Status}\n' coffer coffer-milter 2>/dev/null | grep -q 'config-files\|installed'"
check "/etc/coffer is gone" test ! -e /etc/coffer
check "the archive in /var/lib/coffer is kept" bash -c "ls /var/lib/coffer | grep -q ."
check "the purge said so" grep -q "/var/lib/coffer is KEPT" "$work/purge.log"
check "the units' enable symlinks are gone" bash -c \
    "[ ! -e /etc/systemd/system/multi-user.target.wants/cofferd.service ] &&
     [ ! -e /etc/systemd/system/multi-user.target.wants/coffer-milter.service ]"
if getent passwd postfix >/dev/null; then
    check "postfix left group coffer" bash -c "! id -Gn postfix | tr ' ' '\n' | grep -qx coffer"
fi
if [ "$had_spool_dir" = 0 ]; then
    check "/var/spool/postfix/coffer is gone" test ! -e /var/spool/postfix/coffer
fi
