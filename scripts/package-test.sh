#!/usr/bin/env bash
# The package test (docs/install.md "The package test"), run by .ci/run as root
# after the project's test command. On this machine, and undone at the end:
#
#   1. builds `coffer` and `coffer-milter` (scripts/package.sh), and a second pair with
#      a higher version for the upgrade;
#   2. checks their file lists, conffiles, control fields and maintainer scripts, and
#      lintian (no errors, no warnings);
#   3. starts the system Postfix (a mail host before Coffer: loopback only, relaying
#      to an smtp-sink on a loopback port), then installs both packages with dpkg and
#      checks what the maintainer scripts did (user, group, directories, postfix in
#      group coffer, the file trigger, dpkg-reconfigure); runs `systemd-analyze
#      verify` and `security --offline=true` on the installed units (exposure must be
#      <= 2.0);
#   4. runs ExecStartPre/ExecStart of both units, parsed from the installed unit
#      files, the way systemd would without PID 1 (setpriv to the unit's User= and
#      Group=, its capabilities as ambient and bounding set, no_new_privs, UMask=,
#      LimitNOFILE=, a clean environment, the installed /etc/coffer/coffer.toml);
#      then does what docs/install.md tells an administrator: applies the installed
#      Postfix snippet's commands, `postfix reload`, sends mail with swaks to Postfix
#      on 127.0.0.1:25 and finds it with `coffer search`/`coffer get` (queue id and
#      recipients in the arrival), and sees Postfix deliver it to the sink; the same
#      for a mail submitted with sendmail (non_smtpd_milters); runs both units'
#      ExecReload; stops the milter and sees Postfix tempfail (451); stops Postfix
#      and both daemons by their PIDs;
#   5. reinstalls (changes nothing); upgrades with an edited config while the
#      packaged one changed too (yours kept, the new one as .dpkg-dist); removes
#      (archive, with the mail above, and config kept; a warning that main.cf still
#      names the milter); restores Postfix's main.cf and master.cf byte for byte;
#      purges (config gone, archive kept, and the purge says so).
#
# It holds /run/lock/coffer-package-test.lock while it runs (a package test for another
# format takes the same lock: they install the same paths). A trap stops what the test
# started (by PID), restores Postfix's configuration and purges the packages, removing
# what the test created (the coffer user and group, /var/lib/coffer, postfix's
# membership), even when a step fails. It refuses to run where coffer is installed,
# /etc/coffer or /var/lib/coffer exist, or Postfix runs.
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
# One package test at a time: the .deb and .rpm tests install the same paths, user and
# Postfix configuration on this machine.
exec 9>/run/lock/coffer-package-test.lock
if ! flock -n 9; then
    echo "another package test is running (/run/lock/coffer-package-test.lock); waiting for it" >&2
    flock -w 1800 9 || fail "another package test still holds /run/lock/coffer-package-test.lock"
fi
for tool in dpkg dpkg-deb lintian setpriv prlimit swaks systemd-analyze jq postfix postconf smtp-sink; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (.ci/run installs it)"
done
getent passwd postfix >/dev/null || fail "user postfix is missing (.ci/run installs postfix)"
if dpkg-query -W -f='${Status}' coffer 2>/dev/null | grep -qv "not-installed" ||
    dpkg-query -W -f='${Status}' coffer-milter 2>/dev/null | grep -qv "not-installed"; then
    fail "coffer or coffer-milter is installed on this machine; the test would remove it"
fi
for path in /etc/coffer /var/lib/coffer; do
    [ ! -e "$path" ] || fail "$path exists; the test installs and purges coffer and would touch it"
done
# The test starts the system Postfix with a test configuration and stops it again.
if postfix status >/dev/null 2>&1; then
    fail "Postfix is running on this machine; the test would reconfigure, start and stop it"
fi
if (exec 3<>/dev/tcp/127.0.0.1/25) 2>/dev/null; then
    fail "127.0.0.1:25 is taken on this machine; the test starts Postfix there"
fi

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
postfix_started=0
postfix_master_pid=""
forget_pid() { # forget_pid PID: the process was stopped and waited for
    local p keep=()
    for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    pids=("${keep[@]}")
}

# Postfix's configuration, restored byte for byte (a main.cf that did not exist is
# removed again). Backed up here, before anything can change it.
pf_conf=/etc/postfix
mkdir "$work/postfix-backup"
for f in main.cf master.cf; do
    if [ -e "$pf_conf/$f" ]; then cp -p "$pf_conf/$f" "$work/postfix-backup/$f"; fi
done
restore_postfix_config() {
    local f
    for f in main.cf master.cf; do
        if [ -e "$work/postfix-backup/$f" ]; then
            cmp -s "$work/postfix-backup/$f" "$pf_conf/$f" ||
                cp -p "$work/postfix-backup/$f" "$pf_conf/$f"
        else
            rm -f "$pf_conf/$f"
        fi
    done
}
stop_postfix() { # postfix stop, then wait for the master process to exit
    [ "$postfix_started" = 1 ] || return 0
    postfix stop >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        kill -0 "$postfix_master_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$postfix_master_pid" 2>/dev/null; then
        kill -KILL "$postfix_master_pid" 2>/dev/null || true
        return 1
    fi
    postfix_started=0
}

cleanup() {
    local rc=$?
    set +e
    stop_postfix
    for pid in "${pids[@]}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
    restore_postfix_config
    if dpkg-query -W coffer-milter >/dev/null 2>&1 || dpkg-query -W coffer >/dev/null 2>&1; then
        printf '\n==> cleanup: dpkg --purge coffer-milter coffer\n'
        dpkg --purge coffer-milter coffer >/dev/null 2>&1
    fi
    rm -rf /var/lib/coffer /etc/coffer
    [ "$had_spool_dir" = 1 ] || rm -f /var/spool/postfix/coffer/milter.sock
    [ "$had_spool_dir" = 1 ] || rmdir /var/spool/postfix/coffer 2>/dev/null
    if getent group coffer >/dev/null && id -Gn postfix | tr ' ' '\n' | grep -qx coffer &&
        [ "$had_group" = 0 ]; then
        gpasswd -d postfix coffer >/dev/null
    fi
    [ "$had_user" = 1 ] || userdel coffer 2>/dev/null
    if [ "$had_group" = 0 ] && getent group coffer >/dev/null; then groupdel coffer; fi
    if [ "$rc" -ne 0 ] && [ -s "$work/postfix.log" ]; then
        printf '\n==> the last lines of the Postfix log\n' >&2
        tail -n 30 "$work/postfix.log" >&2
    fi
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
has_file() { grep -qx "$2" <(list "$1"); }
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

# That coffer.toml(5) describes every key of docs/interfaces.md is checked by
# tests/tests/docs_agree.rs (part of the test command).

# Every other test names its configuration (--config, or COFFER_CONFIG set or removed),
# so the /etc/coffer/coffer.toml installed below changes nothing for them: each test
# file that runs one of the binaries passes --config or says which COFFER_CONFIG it runs
# them with.
spawners="$(grep -rlE 'Command::new\(((coffer_e2e|crate)::)?bin\(|CARGO_BIN_EXE_' \
    tests archiver/tests milter/tests 2>/dev/null || true)"
unpinned="$(for f in $spawners; do grep -qE 'COFFER_CONFIG|"--config"' "$f" || echo "$f"; done)"
check "the tests that run the binaries pin COFFER_CONFIG ($(wc -w <<<"$spawners") files)" test -z "$unpinned"
[ -z "$unpinned" ] || echo "    not pinned: $unpinned"

say "lintian"
lintian_out="$(lintian --fail-on error,warning --display-info "$coffer_deb" "$milter_deb" 2>&1 |
    grep -v 'running with root privileges' || true)"
printf '%s\n' "${lintian_out:-    (no tags)}"
if grep -q '^[EW]: ' <<<"$lintian_out"; then fail "lintian reports errors or warnings"; fi
ok "lintian: no errors, no warnings (overrides in packaging/deb/lintian/, each with its reason)"

# --- 3. a Postfix host; install --------------------------------------------------------
# The system Postfix, as on a mail host before Coffer arrives: loopback only, nothing
# local, everything relayed to an smtp-sink on a loopback port (it stores nothing).
# These settings are the test's, not Coffer's; the snippet comes in step 4.
say "the system Postfix, as on a mail host before Coffer"
free_port() { # a loopback port nothing listens on (refused connection)
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p" && return; }
    done
}
greets() ( # greets PORT: an SMTP server on 127.0.0.1:PORT answers 220 (in a subshell)
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    read -r -t 5 line <&3 || true
    printf 'QUIT\r\n' >&3 || true
    [[ "$line" == 220* ]]
) 2>/dev/null
wait_until() { # wait_until DESCRIPTION TEST...: 30 s
    local what="$1"
    shift
    for _ in $(seq 1 150); do
        "$@" && return 0
        sleep 0.2
    done
    fail "$what: not within 30s"
}
sink_port="$(free_port)"
smtp-sink -u nobody "127.0.0.1:$sink_port" 100 >"$work/smtp-sink.log" 2>&1 &
sink_pid=$!
pids+=("$sink_pid")
wait_until "smtp-sink on 127.0.0.1:$sink_port" greets "$sink_port"
ok "smtp-sink on 127.0.0.1:$sink_port (PID $sink_pid)"
pf_settings=(
    "myhostname = mx.coffer-package-test.invalid"
    "mydestination ="
    "alias_maps ="
    "alias_database ="
    "local_recipient_maps ="
    "inet_interfaces = loopback-only"
    "inet_protocols = ipv4"
    "mynetworks = 127.0.0.0/8"
    "smtpd_relay_restrictions = permit_mynetworks, reject"
    "relayhost = [127.0.0.1]:$sink_port"
    "maillog_file = $work/postfix.log"
    "maillog_file_prefixes = $work"
)
if [ ! -e "$pf_conf/main.cf" ]; then
    # Debian's postfix, installed with "No configuration" (as .ci/run does), has none.
    echo "    $pf_conf/main.cf does not exist (Postfix was installed with \"No configuration\"): starting one"
    install -m 0644 /dev/null "$pf_conf/main.cf"
    pf_settings=("compatibility_level = 3.6" "${pf_settings[@]}")
fi
postconf -e "${pf_settings[@]}"
printf '    %s\n' "${pf_settings[@]}"
check "postfix check" postfix check
check "smtpd is chrooted in /var/spool/postfix (master.cf, as Debian ships it)" \
    test "$(postconf -Fh smtp/inet/chroot)" = y
postfix start >"$work/postfix-start.log" 2>&1 || { cat "$work/postfix-start.log"; fail "postfix start"; }
postfix_started=1
postfix_master_pid="$(tr -d ' ' </var/spool/postfix/pid/master.pid)"
kill -0 "$postfix_master_pid" || fail "Postfix's master (PID $postfix_master_pid) is not running"
wait_until "Postfix on 127.0.0.1:25" greets 25
ok "Postfix answers on 127.0.0.1:25 (master PID $postfix_master_pid)"

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
check "/var/spool/postfix/coffer is coffer:coffer 0750" \
    test "$(stat -c '%U:%G %a' /var/spool/postfix/coffer)" = "coffer:coffer 750"
in_group() { id -Gn "$1" | tr ' ' '\n' | grep -qx "$2"; }
check "postfix is in group coffer" in_group postfix coffer
check "the install says 'postfix reload' is needed" grep -q "run 'postfix reload'" "$work/install.log"
check "and that Postfix does not use coffer-milter yet (main.cf is the admin's)" \
    grep -q "Postfix does not use coffer-milter yet" "$work/install.log"
# Postfix installed after coffer-milter: its files under /var/spool/postfix fire
# coffer-milter's file trigger. Undo what the postinst did, then fire it by hand.
rmdir /var/spool/postfix/coffer
gpasswd -d postfix coffer >/dev/null
dpkg-trigger --no-await /var/spool/postfix
dpkg --triggers-only coffer-milter </dev/null 2>&1 | tee "$work/trigger.log"
check "the /var/spool/postfix trigger recreates /var/spool/postfix/coffer" \
    test "$(stat -c '%U:%G %a' /var/spool/postfix/coffer 2>/dev/null)" = "coffer:coffer 750"
check "and puts postfix back in group coffer" in_group postfix coffer
dpkg-trigger --no-await /var/spool/postfix
dpkg --triggers-only coffer-milter </dev/null >"$work/trigger2.log" 2>&1
check "the trigger again (all in place) changes nothing and says nothing about it" bash -c \
    "! grep -q 'created\|added user' '$work/trigger2.log'"
rmdir /var/spool/postfix/coffer
gpasswd -d postfix coffer >/dev/null
dpkg-reconfigure coffer-milter </dev/null >"$work/reconfigure.log" 2>&1 ||
    { cat "$work/reconfigure.log"; fail "dpkg-reconfigure coffer-milter"; }
check "dpkg-reconfigure coffer-milter (install.md's other way) does the same" bash -c \
    "[ \"\$(stat -c '%U:%G %a' /var/spool/postfix/coffer 2>/dev/null)\" = 'coffer:coffer 750' ] &&
     id -Gn postfix | tr ' ' '\n' | grep -qx coffer"
chown root:root /var/spool/postfix/coffer
chmod 0755 /var/spool/postfix/coffer
dpkg-trigger --no-await /var/spool/postfix
dpkg --triggers-only coffer-milter </dev/null 2>&1 | tee "$work/trigger3.log"
check "a socket directory with the wrong owner and mode is put right, and the trigger says so" bash -c \
    "[ \"\$(stat -c '%U:%G %a' /var/spool/postfix/coffer)\" = 'coffer:coffer 750' ] &&
     grep -q 'was root:root 755; set it to coffer:coffer 0750' '$work/trigger3.log'"
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
    echo "    systemd-analyze verify could not complete here (no systemd as PID 1: $(cat /proc/1/comm)); continuing"
fi

say "systemd-analyze security --offline=true"
for u in "${units[@]}"; do
    line="$(systemd-analyze security --offline=true "$u" 2>&1 | grep 'Overall exposure level')"
    echo "    $line"
    score="$(sed -n 's/.*: \([0-9.]*\) .*/\1/p' <<<"$line")"
    check "$(basename "$u") exposure $score <= 2.0" awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }'
done

# --- 4. run as systemd would; the administrator's steps --------------------------------
# Each unit's ExecStartPre=/ExecStart=/ExecReload=, read from the installed unit file,
# run as its User=/Group= (with their supplementary groups, as systemd does), its
# CapabilityBoundingSet=/AmbientCapabilities=, NoNewPrivileges=, UMask= and
# LimitNOFILE=, in /, with the environment systemd gives a service of that user. What
# setpriv cannot do (namespaces, seccomp, ProtectSystem=) is what `systemd-analyze
# security` rated above.
unit_file() { echo "/usr/lib/systemd/system/$1.service"; }
unit_value() { sed -n "s/^$2=//p" "$(unit_file "$1")"; }
unit_last() { unit_value "$1" "$2" | tail -n 1; }
unit_caps() { # unit_caps UNIT KEY: "-all" plus "+cap" for each capability the key grants
    local c out="-all"
    for c in $(unit_last "$1" "$2" | tr '[:upper:]' '[:lower:]'); do out+=",+${c#cap_}"; done
    echo "$out"
}
unit_nofile() { # the unit's LimitNOFILE=, or this machine's hard limit if it cannot grant it
    local n
    n="$(unit_last "$1" LimitNOFILE)"
    [ -n "$n" ] || return 0
    if ! prlimit --nofile="$n:$n" true 2>/dev/null; then
        n="$(ulimit -Hn)"
    fi
    echo "$n"
}
unit_cmd() { # unit_cmd UNIT COMMAND...: sets $cmdline to COMMAND as the unit runs it
    local unit="$1" user group nofile
    shift
    user="$(unit_last "$unit" User)"
    group="$(unit_last "$unit" Group)"
    nofile="$(unit_nofile "$unit")"
    [ "$(unit_last "$unit" NoNewPrivileges)" = yes ] || fail "$unit: NoNewPrivileges= is not yes"
    [ -z "$(unit_value "$unit" WorkingDirectory)$(unit_value "$unit" Environment)$(unit_value "$unit" EnvironmentFile)" ] ||
        fail "$unit: sets WorkingDirectory=/Environment=, which this test does not reproduce"
    case "$1" in
        /*) ;;
        *) fail "$unit: '$1': only plain absolute commands are run here (no -, @, +, ! prefix)" ;;
    esac
    cmdline=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
        HOME="$(getent passwd "$user" | cut -d: -f6)" USER="$user" LOGNAME="$user"
        SHELL="$(getent passwd "$user" | cut -d: -f7)"
        ${nofile:+prlimit --nofile="$nofile:$nofile"}
        setpriv --reuid "$user" --regid "$group" --init-groups
        --inh-caps="$(unit_caps "$unit" AmbientCapabilities)"
        --ambient-caps="$(unit_caps "$unit" AmbientCapabilities)"
        --bounding-set="$(unit_caps "$unit" CapabilityBoundingSet)" --no-new-privs "$@")
}
as_unit() { # as_unit UNIT COMMAND...: in the foreground, with the unit's umask, in /
    unit_cmd "$@"
    (umask "$(unit_last "$1" UMask)" && cd / && exec "${cmdline[@]}")
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
    [ "$(wc -l <<<"$cmd")" = 1 ] || fail "$unit: not exactly one ExecStart="
    echo "    $unit ExecStart: $cmd"
    # shellcheck disable=SC2086
    unit_cmd "$unit" $cmd
    # env, prlimit and setpriv all exec: $! is the daemon's own PID.
    (umask "$(unit_last "$unit" UMask)" && cd / && exec "${cmdline[@]}") >>"$work/$unit.log" 2>&1 &
    pid=$!
    pids+=("$pid")
}
exec_reload() { # exec_reload UNIT MAINPID: each ExecReload=, $MAINPID substituted
    local cmd
    while read -r cmd; do
        [ -n "$cmd" ] || continue
        cmd="${cmd//\$MAINPID/$2}"
        echo "    $1 ExecReload: $cmd"
        # shellcheck disable=SC2086
        as_unit "$1" $cmd >>"$work/$1.log" 2>&1 || { cat "$work/$1.log"; fail "$1 ExecReload: $cmd"; }
    done < <(unit_value "$1" ExecReload)
}
wait_for() { # wait_for DESCRIPTION PID TEST...
    local what="$1" p="$2"
    shift 2
    for _ in $(seq 1 150); do
        "$@" && return 0
        kill -0 "$p" 2>/dev/null || { cat "$work"/*.log; fail "$what: the process exited"; }
        sleep 0.2
    done
    fail "$what: not within 30s"
}
stop_unit() { # stop_unit UNIT PID: SIGTERM (systemd's KillSignal), expect exit 0
    local rc=0
    kill -TERM "$2"
    wait "$2" || rc=$?
    forget_pid "$2"
    check "$1 (PID $2) stopped by SIGTERM with exit 0" test "$rc" -eq 0
}
proc_status() { sed -n "s/^$2:[[:space:]]*//p" "/proc/$1/status"; }
check_process() { # check_process UNIT PID CAPMASK: user, groups, capabilities, no_new_privs
    local unit="$1" p="$2" caps="$3"
    local uid gid
    uid="$(id -u coffer)"
    gid="$(getent group coffer | cut -d: -f3)"
    check "$unit (PID $p) runs as user and group coffer, with coffer's groups" test \
        "$(proc_status "$p" Uid | tr -s '\t ' ' ') / $(proc_status "$p" Gid | tr -s '\t ' ' ') / $(proc_status "$p" Groups | tr ' ' '\n' | sort -n | xargs)" = \
        "$uid $uid $uid $uid / $gid $gid $gid $gid / $(id -G coffer | tr ' ' '\n' | sort -n | xargs)"
    check "$unit: bounding set $caps, ambient $caps, no_new_privs" test \
        "$(proc_status "$p" CapBnd) $(proc_status "$p" CapAmb) $(proc_status "$p" NoNewPrivs)" = \
        "$caps $caps 1"
    if [ "$(unit_nofile "$unit")" != "$(unit_last "$unit" LimitNOFILE)" ]; then
        echo "    this machine cannot raise the open files limit to LimitNOFILE=$(unit_last "$unit" LimitNOFILE) (no CAP_SYS_RESOURCE); $unit runs with its hard limit $(ulimit -Hn)"
    fi
    check "$unit: open files limit $(unit_nofile "$unit")" test \
        "$(awk '/^Max open files/ { print $4 }' "/proc/$p/limits")" = "$(unit_nofile "$unit")"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_coffer() { setpriv --reuid coffer --regid coffer --init-groups "$@"; }
as_postfix() { setpriv --reuid postfix --regid postfix --init-groups "$@"; }
# The arrivals of the message(s) `coffer search ARGS --json` finds, as user coffer.
search_json() { as_coffer /usr/bin/coffer search "$@" --json; }

say "cofferd as systemd would run it"
if port_open 2525; then fail "127.0.0.1:2525 is already taken on this machine"; fi
run_unit cofferd
cofferd_pid=$pid
wait_for "cofferd listening on 127.0.0.1:2525" "$cofferd_pid" port_open 2525
wait_for "cofferd's LMTP socket" "$cofferd_pid" test -S /var/lib/coffer/lmtp.sock
check_process cofferd "$cofferd_pid" 0000000000000400 # CAP_NET_BIND_SERVICE only
check "lmtp.sock is coffer 0600" test "$(stat -c '%U %a' /var/lib/coffer/lmtp.sock)" = "coffer 600"

say "coffer-milter as systemd would run it"
run_unit coffer-milter
milter_pid=$pid
sock=/var/spool/postfix/coffer/milter.sock
wait_for "coffer-milter's socket" "$milter_pid" test -S "$sock"
check_process coffer-milter "$milter_pid" 0000000000000000 # no capability at all
check "milter.sock is coffer:coffer 0660" test "$(stat -c '%U:%G %a' "$sock")" = "coffer:coffer 660"
check "user postfix can reach the milter socket" as_postfix test -w "$sock"
check "user postfix cannot reach cofferd's trusted LMTP socket" \
    bash -c "! setpriv --reuid postfix --regid postfix --init-groups test -w /var/lib/coffer/lmtp.sock"
check "user postfix cannot read the archive" \
    bash -c "! setpriv --reuid postfix --regid postfix --init-groups ls /var/lib/coffer >/dev/null 2>&1"

say "swaks to the packaged journal listener (127.0.0.1:2525), then coffer search"
journal_subject="coffer package test $$ journal"
swaks --server 127.0.0.1:2525 --from pkgtest@example.org --to archive@example.net \
    --header "Subject: $journal_subject" --body "Sent by scripts/package-test.sh." >"$work/swaks.log" 2>&1 ||
    { cat "$work/swaks.log"; fail "swaks to 127.0.0.1:2525"; }
grep -E '^<-  250 2\.0\.0 Ok: [^ ]+ [0-9a-f]{64}' "$work/swaks.log" || cat "$work/swaks.log"
check "cofferd answered 250 with an arrival and message id" \
    grep -Eq '^<-  250 2\.0\.0 Ok: [^ ]+ [0-9a-f]{64}' "$work/swaks.log"
check "coffer search finds it (as coffer, reading /etc/coffer/coffer.toml)" \
    test "$(search_json --subject "$journal_subject" | jq length)" = 1

# docs/install.md, "A Postfix host in five steps": 1 (install) is done, 2 (edit
# coffer.toml) is not needed for the packaged default; 3, 4 and 5 follow, each
# exactly as the installed docs say.
snippet=/usr/share/coffer/postfix/main.cf.snippet
doc=/usr/share/doc/coffer/install.md
apply="sed -n 's/^#: //p' $snippet | sh -e"
say "install.md step 3: $apply"
mapfile -t snippet_cmds < <(sed -n 's/^#: //p' "$snippet")
printf '    | %s\n' "${snippet_cmds[@]}"
check "the snippet's commands set smtpd_milters and non_smtpd_milters" bash -c \
    "grep -q '^add smtpd_milters ' <<<'$(printf '%s\n' "${snippet_cmds[@]}")' &&
     grep -q '^add non_smtpd_milters ' <<<'$(printf '%s\n' "${snippet_cmds[@]}")'"
check "install.md (as installed) tells the administrator to run: $apply" grep -qF "$apply" "$doc"
sed 's/^ *//' "$doc" >"$work/install.md.unindented"
missing_lines=""
for l in "${snippet_cmds[@]}"; do
    grep -qxF "$l" "$work/install.md.unindented" || missing_lines+="    $l"$'\n'
done
[ -z "$missing_lines" ] || printf 'not in install.md:\n%s' "$missing_lines"
check "install.md shows each of the commands, as the snippet has them" test -z "$missing_lines"
# On a copy first: with a milter already configured, coffer-milter goes last.
mkdir "$work/postfix-copy"
cp "$pf_conf/master.cf" "$work/postfix-copy/"
printf 'smtpd_milters = inet:127.0.0.1:8891\n' >"$work/postfix-copy/main.cf"
sed -n 's/^#: //p' "$snippet" | MAIL_CONFIG="$work/postfix-copy" sh -e
check "on a main.cf with a milter already there, coffer-milter is appended after it" test \
    "$(MAIL_CONFIG="$work/postfix-copy" postconf -h smtpd_milters)" = \
    "inet:127.0.0.1:8891, { unix:/coffer/milter.sock, default_action=tempfail }"
# Now for real, in /etc/postfix/main.cf.
sh -ec "$apply"
applied="$(sha256sum <"$pf_conf/main.cf")"
sh -ec "$apply"
check "running the commands again changes nothing" test "$(sha256sum <"$pf_conf/main.cf")" = "$applied"
mapfile -t reference < <(grep -E '^[a-z_]+ = ' "$snippet")
mapfile -t now < <(postconf "${reference[@]%% = *}")
printf '    %s\n' "${now[@]}"
check "main.cf now has the snippet's reference lines" test "${now[*]}" = "${reference[*]}"

say "install.md step 4: postfix reload"
reloads_before="$(grep -c 'reload -- version' "$work/postfix.log" || true)"
postfix reload 2>&1 | sed 's/^/    /'
wait_until "Postfix's reload in its log" \
    test "$(grep -c 'reload -- version' "$work/postfix.log" || true)" -gt "$reloads_before"
check "the master is the same process (PID $postfix_master_pid)" \
    test "$(tr -d ' ' </var/spool/postfix/pid/master.pid)" = "$postfix_master_pid"

say "install.md step 5: a test mail through Postfix (127.0.0.1:25), found in the archive"
subject="coffer package test $$ through Postfix"
helo="client.pkgtest.example.org"
rcpts=(archive-a@example.net archive-b@example.net)
swaks --server 127.0.0.1:25 --helo "$helo" --from pkgtest@example.org --to "$(IFS=,; echo "${rcpts[*]}")" \
    --header "Subject: $subject" --body "Sent through Postfix by scripts/package-test.sh." \
    >"$work/swaks-postfix.log" 2>&1 || { cat "$work/swaks-postfix.log"; fail "swaks to Postfix on 127.0.0.1:25"; }
qid="$(sed -n 's/^<-  250 2\.0\.0 Ok: queued as \([0-9A-Za-z]*\)\r\{0,1\}$/\1/p' "$work/swaks-postfix.log")"
check "Postfix accepted it after the milter's end-of-message (queued as ${qid:-?})" test -n "$qid"
found="$(search_json --subject "$subject")"
id="$(jq -r '.[0].id // empty' <<<"$found")"
arrival="$(jq -c '.[0].arrivals[0] // empty' <<<"$found")"
echo "    $arrival"
check "coffer search --subject finds it, once, with one arrival (as coffer)" \
    test "$(jq '[length, (.[0].arrivals | length)]' -c <<<"$found")" = "[1,1]"
check "the arrival came through the milter listener" test "$(jq -r .listener <<<"$arrival")" = milter
check "the arrival has Postfix's queue id $qid" test "$(jq -r .queue_id <<<"$arrival")" = "$qid"
check "the arrival has both envelope recipients" \
    test "$(jq -c '.rcpt_to | sort' <<<"$arrival")" = "$(printf '%s\n' "${rcpts[@]}" | jq -Rsc 'split("\n")[:-1] | sort')"
check "and the envelope sender" test "$(jq -r .mail_from <<<"$arrival")" = pkgtest@example.org
check "coffer search --to ${rcpts[1]} finds it too" \
    test "$(search_json --to "${rcpts[1]}" | jq -r --arg id "$id" '[.[] | select(.id == $id)] | length')" = 1
envelope="$(as_coffer /usr/bin/coffer get "$id" --envelope)"
check "coffer get --envelope: the client's HELO and address (XCOFFER metadata)" test \
    "$(jq -r '.[0].xcoffer | "\(.helo) \(.client_addr | split(":")[0])"' <<<"$envelope")" = "$helo 127.0.0.1"
check "coffer get $id | sha256sum is the id" \
    test "$(as_coffer /usr/bin/coffer get "$id" | sha256sum | cut -d' ' -f1)" = "$id"
check "and the bytes are the mail swaks sent (its Subject)" \
    bash -c "setpriv --reuid coffer --regid coffer --init-groups /usr/bin/coffer get '$id' | grep -qxF $'Subject: $subject\r'"
check "coffer search as root (beside the daemon) finds it too" \
    bash -c "/usr/bin/coffer search --subject '$subject' | grep -qF '$subject'"
wait_until "Postfix delivering $qid to the sink" \
    grep -q "$qid: to=<${rcpts[1]}>, relay=127.0.0.1\[127.0.0.1\]:$sink_port, .* status=sent" "$work/postfix.log"
ok "Postfix then delivered it to the sink: $(grep -o "$qid: to=<${rcpts[0]}>.*status=sent" "$work/postfix.log" | head -1)"

say "mail submitted on the host (sendmail, through pickup and cleanup: non_smtpd_milters)"
local_subject="coffer package test $$ through sendmail"
printf 'From: pkgtest@example.org\nTo: %s\nSubject: %s\n\nSubmitted with sendmail(1).\n' \
    "${rcpts[0]}" "$local_subject" | /usr/sbin/sendmail -f pkgtest@example.org "${rcpts[0]}"
has_local() { [ "$(search_json --subject "$local_subject" | jq -r '.[0].arrivals[0].listener // empty')" = milter ]; }
wait_until "the sendmail-submitted mail in the archive" has_local
local_qid="$(search_json --subject "$local_subject" | jq -r '.[0].arrivals[0].queue_id')"
check "found, through the milter, with its queue id ($local_qid) and recipient" test \
    "$(search_json --subject "$local_subject" | jq -c '.[0].arrivals[0] | [.queue_id, .rcpt_to]')" = \
    "[\"$local_qid\",[\"${rcpts[0]}\"]]"
wait_until "Postfix delivering $local_qid to the sink" \
    grep -q "$local_qid: to=<${rcpts[0]}>, relay=127.0.0.1\[127.0.0.1\]:$sink_port, .* status=sent" "$work/postfix.log"
ok "and Postfix delivered it to the sink"

say "ExecReload of both units (check-config, then SIGHUP)"
exec_reload cofferd "$cofferd_pid"
exec_reload coffer-milter "$milter_pid"
sleep 1
check "cofferd still runs after the reload" kill -0 "$cofferd_pid"
check "and still answers on 127.0.0.1:2525" port_open 2525
check "coffer-milter still runs after the reload" kill -0 "$milter_pid"

say "stop the milter: Postfix fails closed"
stop_unit coffer-milter "$milter_pid"
check "the milter removed its socket" test ! -e "$sock"
swaks --server 127.0.0.1:25 --from pkgtest@example.org --to "${rcpts[0]}" \
    --header "Subject: $subject, milter stopped" >"$work/swaks-tempfail.log" 2>&1 && {
    cat "$work/swaks-tempfail.log"
    fail "Postfix accepted mail while the milter was stopped"
}
grep -E '^<\*\* ' "$work/swaks-tempfail.log" | sed 's/^/    /'
check "Postfix answered 451 (default_action=tempfail): nothing passes unarchived" \
    grep -Eq '^<\*\* +451 ' "$work/swaks-tempfail.log"

say "stop Postfix and cofferd"
check "postfix stop: master (PID $postfix_master_pid) exited" stop_postfix
check "Postfix's queue is empty (the test mail left for the sink)" \
    test -z "$(find /var/spool/postfix/{incoming,active,deferred,hold,maildrop} -type f 2>/dev/null)"
if kill -TERM "$sink_pid"; then wait "$sink_pid" 2>/dev/null || true; fi
forget_pid "$sink_pid"
stop_unit cofferd "$cofferd_pid"
check "no file in the archive belongs to root" test -z "$(find /var/lib/coffer ! -user coffer)"

# --- 5. reinstall, upgrade, remove, purge ------------------------------------------------
# The packaged coffer, unpacked aside: it reads the archive once the package is gone.
dpkg-deb -x "${new_debs[0]}" "$work/unpacked"
cp /etc/coffer/coffer.toml "$work/coffer.toml"
in_archive() { # in_archive COFFER: the mail sent through Postfix is in /var/lib/coffer
    [ "$(setpriv --reuid coffer --regid coffer --init-groups "$1" --config "$work/coffer.toml" \
        search --subject "$subject" --json | jq -r '.[0].arrivals[0].queue_id')" = "$qid" ]
}
state() { # what the maintainer scripts manage
    getent passwd coffer
    getent group coffer
    stat -c '%n %U:%G %a' /var/lib/coffer /var/spool/postfix/coffer /etc/coffer /etc/coffer/coffer.toml
    sha256sum /etc/coffer/coffer.toml
    for f in /etc/systemd/system/multi-user.target.wants/*coffer*; do echo "$f -> $(readlink "$f")"; done
}

say "reinstall ($version)"
state >"$work/state.before"
dpkg -i "$coffer_deb" "$milter_deb" </dev/null >"$work/reinstall.log" 2>&1 ||
    { cat "$work/reinstall.log"; fail "reinstall"; }
sed 's/^/    /' "$work/reinstall.log"
state >"$work/state.after"
check "reinstalled" bash -c "dpkg-query -W -f='\${Status}\n' coffer coffer-milter | grep -c 'install ok installed' | grep -qx 2"
check "the reinstall left user, group, directories, config and enablement as they were" \
    diff -u "$work/state.before" "$work/state.after"
check "and had nothing to do or say about Postfix (main.cf names the milter now)" bash -c \
    "! grep -q 'created /var/spool/postfix/coffer\|added user postfix\|does not use coffer-milter' '$work/reinstall.log'"
check "the archive survived the reinstall" in_archive /usr/bin/coffer

say "upgrade to $new_version: an edited config, and the packaged one changed too"
# The new coffer's packaged coffer.toml gets one more line, so that dpkg meets both an
# administrator's edit and a package change, the case docs/install.md "Upgrading"
# describes.
dpkg-deb -R "${new_debs[0]}" "$work/v2-coffer"
echo "# (changed in $new_version by the package test)" >>"$work/v2-coffer/etc/coffer/coffer.toml"
dpkg-deb -Zgzip -z1 -b "$work/v2-coffer" "${new_debs[0]}" >/dev/null
sed -i 's/^max_message_size = "50MiB"$/max_message_size = "40MiB"   # edited by the package test/' /etc/coffer/coffer.toml
grep -q 'edited by the package test' /etc/coffer/coffer.toml || fail "could not edit the config"
edited_sum="$(sha256sum </etc/coffer/coffer.toml)"
dpkg -i --force-confold "${new_debs[@]}" </dev/null 2>&1 | tee "$work/upgrade.log"
check "upgraded to $new_version" bash -c \
    "[ \"\$(dpkg-query -W -f='\${Version}' coffer)\" = '$new_version' ] && [ \"\$(dpkg-query -W -f='\${Version}' coffer-milter)\" = '$new_version' ]"
check "the edited config was kept" test "$(sha256sum </etc/coffer/coffer.toml)" = "$edited_sum"
check "the new packaged one is beside it as coffer.toml.dpkg-dist" \
    cmp -s "$work/v2-coffer/etc/coffer/coffer.toml" /etc/coffer/coffer.toml.dpkg-dist
check "and the edited one is still valid" /usr/sbin/cofferd check-config
check "the archive survived the upgrade" in_archive /usr/bin/coffer

say "remove"
dpkg --remove coffer-milter coffer </dev/null 2>&1 | tee "$work/remove.log"
check "removed, config files left" bash -c \
    "dpkg-query -W -f='\${Status}\n' coffer coffer-milter | grep -c 'deinstall ok config-files' | grep -qx 2"
check "binaries gone" bash -c "[ ! -e /usr/sbin/cofferd ] && [ ! -e /usr/bin/coffer ] && [ ! -e /usr/sbin/coffer-milter ]"
check "the edited config is still there" test "$(sha256sum </etc/coffer/coffer.toml)" = "$edited_sum"
check "the remove warns that main.cf still names the milter (Postfix would tempfail)" \
    grep -q "still names unix:/coffer/milter.sock" "$work/remove.log"
check "the archive is still there, with the mail sent through Postfix" in_archive "$work/unpacked/usr/bin/coffer"

say "Postfix's configuration, restored"
restore_postfix_config
for f in main.cf master.cf; do
    if [ -e "$work/postfix-backup/$f" ]; then
        check "$pf_conf/$f is restored byte for byte" cmp -s "$work/postfix-backup/$f" "$pf_conf/$f"
    else
        check "$pf_conf/$f is gone again (there was none)" test ! -e "$pf_conf/$f"
    fi
done


say "purge"
dpkg --purge coffer-milter coffer </dev/null 2>&1 | tee "$work/purge.log"
check "purged" bash -c "! dpkg-query -W -f='\${Status}\n' coffer coffer-milter 2>/dev/null | grep -q 'config-files\|installed'"
check "/etc/coffer is gone" test ! -e /etc/coffer
check "the purge said plainly that the archive in /var/lib/coffer is kept" \
    grep -q "the archive in /var/lib/coffer is KEPT" "$work/purge.log"
check "and it is: the mail sent through Postfix is still in it" in_archive "$work/unpacked/usr/bin/coffer"
check "the units' enable symlinks are gone" bash -c \
    "[ ! -e /etc/systemd/system/multi-user.target.wants/cofferd.service ] &&
     [ ! -e /etc/systemd/system/multi-user.target.wants/coffer-milter.service ]"
not_in_group() { ! in_group "$@"; }
check "postfix left group coffer" not_in_group postfix coffer
if [ "$had_spool_dir" = 0 ]; then
    check "/var/spool/postfix/coffer is gone" test ! -e /var/spool/postfix/coffer
fi
