#!/usr/bin/env bash
# The RPM package test (docs/install-rpm.md "Building the packages"), run by .ci/run as
# root after the Debian package test. On this machine, and undone at the end:
#
#   1. builds `coffer` and `coffer-milter` (scripts/package-rpm.sh), and a second pair
#      with a higher release for the upgrade;
#   2. checks them with `rpm -qp`: file lists (exact), config files and their
#      noreplace flag, scriptlets (user and socket directory made, nothing enabled,
#      valid sh), requirements (the glibc they need, at most RHEL 9's 2.34);
#   3. runs the packaged binaries from the payload (`--version`, `check-config` on the
#      packaged configuration);
#   4. installs both with Debian's rpm (its own database; --nodeps, since Debian's
#      packages are not in it), so the scriptlets run for real: user, group,
#      /var/lib/coffer, the milter socket directory, postfix in group coffer; then
#      upgrades with an edited config (kept, the new one as .rpmnew) and erases
#      (archive and user kept, the edited config saved as .rpmsave).
#
# A trap erases the packages and removes what the test created, even when a step
# fails. It refuses to run where coffer is installed (dpkg or rpm) or /etc/coffer or
# /var/lib/coffer exist.
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
    echo "scripts/package-rpm-test.sh installs packages and must run as root" >&2
    exit 2
fi
# One package test at a time: the .deb and .rpm tests install the same paths and user.
exec 9>/run/lock/coffer-package-test.lock
flock -n 9 || fail "another package test is running (/run/lock/coffer-package-test.lock)"
for tool in rpm rpm2cpio cpio postconf; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (.ci/run installs rpm)"
done
if dpkg-query -W -f='${Status}' coffer 2>/dev/null | grep -q "installed" ||
    rpm -q coffer >/dev/null 2>&1 || rpm -q coffer-milter >/dev/null 2>&1; then
    fail "coffer is installed on this machine; the test would remove it"
fi
for path in /etc/coffer /var/lib/coffer; do
    [ ! -e "$path" ] || fail "$path exists; the test installs and erases coffer and would touch it"
done

# --- what to undo -----------------------------------------------------------------------
had_user=0
getent passwd coffer >/dev/null && had_user=1
had_group=0
getent group coffer >/dev/null && had_group=1
had_spool_dir=0
[ -e /var/spool/postfix/coffer ] && had_spool_dir=1
work="$(mktemp -d /tmp/coffer-rpm-test.XXXXXX)"
chmod 755 "$work"
# Debian's rpm refuses to install without --force-debian; --nodeps because /bin/sh,
# glibc and shadow-utils are Debian packages, unknown to rpm's database.
rpm_i=(rpm --force-debian --nodeps)

cleanup() {
    local rc=$?
    set +e
    if rpm -q coffer-milter >/dev/null 2>&1 || rpm -q coffer >/dev/null 2>&1; then
        printf '\n==> cleanup: rpm -e coffer-milter coffer\n'
        "${rpm_i[@]}" -e coffer-milter coffer >/dev/null 2>&1
    fi
    rm -rf /var/lib/coffer /etc/coffer
    [ "$had_spool_dir" = 1 ] || rmdir /var/spool/postfix/coffer 2>/dev/null
    if getent passwd postfix >/dev/null && getent group coffer >/dev/null &&
        id -Gn postfix | tr ' ' '\n' | grep -qx coffer && [ "$had_group" = 0 ]; then
        gpasswd -d postfix coffer >/dev/null
    fi
    [ "$had_user" = 1 ] || userdel coffer 2>/dev/null
    [ "$had_group" = 1 ] || groupdel coffer 2>/dev/null
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

# --- 1. build ---------------------------------------------------------------------------
build() {
    if [ -n "${PACKAGE_BUILD_AS:-}" ] && [ "$PACKAGE_BUILD_AS" != root ]; then
        sudo -u "$PACKAGE_BUILD_AS" -H env PATH="$PATH" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-}" \
            bash scripts/package-rpm.sh "$@"
    else
        bash scripts/package-rpm.sh "$@"
    fi
}
say "scripts/package-rpm.sh --release 2 (the upgrade's packages, built first)"
mkdir -p "$work/new"
for f in $(build --release 2); do cp "$f" "$work/new/"; done
say "scripts/package-rpm.sh"
mkdir -p "$work/old"
for f in $(build); do cp "$f" "$work/old/"; done
core="$(ls "$work"/old/coffer-[0-9]*.rpm)"
milter="$(ls "$work"/old/coffer-milter-[0-9]*.rpm)"
ok "$(basename "$core"), $(basename "$milter")"

# --- 2. rpm -qp ---------------------------------------------------------------------------
say "file lists (rpm -qlp)"
expect_files() { # expect_files RPM FILE...
    local rpmf="$1"
    shift
    diff <(printf '%s\n' "$@" | sort) <(rpm -qlp "$rpmf" | sort) >"$work/diff" ||
        { cat "$work/diff" >&2; fail "$(basename "$rpmf"): unexpected file list (< wanted, > packaged)"; }
    ok "$(basename "$rpmf"): exactly the $# expected files"
}
expect_files "$core" \
    /usr/sbin/cofferd /usr/bin/coffer /etc/coffer/coffer.toml \
    /usr/lib/systemd/system/cofferd.service \
    /usr/share/man/man8/cofferd.8 /usr/share/man/man1/coffer.1 /usr/share/man/man5/coffer.toml.5 \
    /usr/share/licenses/coffer/LICENSE \
    /usr/share/doc/coffer/README.md /usr/share/doc/coffer/install-rpm.md \
    /usr/share/doc/coffer/operations.md /usr/share/doc/coffer/interfaces.md \
    /usr/share/doc/coffer/architecture.md /usr/share/doc/coffer/store-format.md \
    /usr/share/doc/coffer/journal-reports.md
expect_files "$milter" \
    /usr/sbin/coffer-milter /usr/lib/systemd/system/coffer-milter.service \
    /usr/share/man/man8/coffer-milter.8 \
    /usr/share/coffer/postfix/main.cf.snippet /usr/share/coffer/sendmail/coffer.mc \
    /usr/share/licenses/coffer-milter/LICENSE \
    /usr/share/doc/coffer-milter/milter.md /usr/share/doc/coffer-milter/install-rpm.md

say "config files and modes"
check "coffer.toml is the only config file" \
    test "$(rpm -qcp "$core")" = /etc/coffer/coffer.toml
check "coffer-milter has no config file" test -z "$(rpm -qcp "$milter")"
flags="$(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$core" | awk '$1 == "/etc/coffer/coffer.toml" { print $2 }')"
check "coffer.toml is %config(noreplace) (flags: $flags)" grep -q 'c.*n\|n.*c' <<<"$flags"
modes="$(rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]' "$core" "$milter")"
for bin in /usr/sbin/cofferd /usr/bin/coffer /usr/sbin/coffer-milter; do
    check "$bin is -rwxr-xr-x root:root" grep -q "^-rwxr-xr-x root:root $bin\$" <<<"$modes"
done
say "the RPM's Postfix snippet, applied to a scratch main.cf (MAIL_CONFIG)"
snippet="$work/root-snippet"
rpm2cpio "$milter" >"$work/milter.cpio" || true # see "the payload" below
mkdir -p "$snippet" && (cd "$snippet" && cpio -idm --quiet <"$work/milter.cpio")
snippet="$snippet/usr/share/coffer/postfix/main.cf.snippet"
mkdir -p "$work/pf"
printf 'smtpd_milters = inet:127.0.0.1:8891\n' >"$work/pf/main.cf"
: >"$work/pf/master.cf"
for round in 1 2; do
    sed -n 's/^#: //p' "$snippet" | MAIL_CONFIG="$work/pf" sh -e ||
        fail "the snippet's commands failed (round $round)"
done
want='inet:127.0.0.1:8891, { unix:/var/spool/postfix/coffer/milter.sock, default_action=tempfail }'
check "smtpd_milters: coffer-milter appended last, once, by its absolute path" \
    test "$(postconf -c "$work/pf" -h smtpd_milters)" = "$want"
check "non_smtpd_milters: coffer-milter alone" \
    test "$(postconf -c "$work/pf" -h non_smtpd_milters)" = \
    '{ unix:/var/spool/postfix/coffer/milter.sock, default_action=tempfail }'
check "milter_protocol = 6" test "$(postconf -c "$work/pf" -h milter_protocol)" = 6

say "scriptlets (rpm -qp --scripts)"
rpm -qp --scripts "$core" >"$work/core.scripts"
rpm -qp --scripts "$milter" >"$work/milter.scripts"
for s in preinstall postinstall preuninstall postuninstall; do
    check "coffer has a $s scriptlet" grep -q "^$s scriptlet" "$work/core.scripts"
done
for s in postinstall preuninstall postuninstall; do
    check "coffer-milter has a $s scriptlet" grep -q "^$s scriptlet" "$work/milter.scripts"
done
# No interpreter set (`(none)`) means rpm's default, /bin/sh.
progs="$(rpm -qp --qf '%{PREINPROG} %{POSTINPROG} %{PREUNPROG} %{POSTUNPROG}\n' "$core" "$milter")"
check "every scriptlet runs in /bin/sh" bash -c "! tr ' ' '\n' <<<'$progs' | grep -Ev '^(\(none\)|/bin/sh)?\$' | grep -q ."
check "coffer's %pre creates the coffer user and group" \
    grep -q 'useradd -r -g coffer' "$work/core.scripts"
check "coffer-milter's %post creates the socket directory (absolute path)" \
    grep -q 'install -d -o coffer -g coffer -m 0750 /var/spool/postfix/coffer' "$work/milter.scripts"
# (The echo lines tell the administrator how to enable them; no command does it.)
check "no scriptlet enables or presets a unit" \
    bash -c "! grep -hv '^[[:space:]]*echo' '$work/core.scripts' '$work/milter.scripts' |
        grep -Eq 'systemctl[^|;]*(enable|preset)'"
for f in packaging/rpm/coffer/*.sh packaging/rpm/coffer-milter/*.sh; do
    check "$f is valid sh" sh -n "$f"
done

say "requirements (rpm -qp --requires)"
rpm -qp --requires "$core" >"$work/core.req"
rpm -qp --requires "$milter" >"$work/milter.req"
printf '    coffer requires: %s\n' "$(grep -v '^rpmlib\|GLIBC_\|GCC_' "$work/core.req" | sort -u | tr '\n' ' ')"
check "coffer-milter requires coffer" grep -qx 'coffer' "$work/milter.req"
check "both require /bin/sh for their scriptlets" grep -qx '/bin/sh' "$work/core.req"
check "both require shadow-utils (useradd, usermod)" grep -qx 'shadow-utils' "$work/milter.req"

# --- 3. the payload runs ------------------------------------------------------------------
say "the packaged binaries run"
mkdir -p "$work/root"
# "The payload": Debian 12's rpm2cpio writes the whole archive of a zstd payload and
# then exits 1; cpio's own status, and the files it unpacked, are what count here.
for rpmf in "$core" "$milter"; do
    rpm2cpio "$rpmf" >"$work/payload.cpio" || true
    (cd "$work/root" && cpio -idm --quiet <"$work/payload.cpio") ||
        fail "$(basename "$rpmf"): cpio could not unpack the payload"
done
check "the payload unpacks to the listed files" \
    test "$(cd "$work/root" && find . -type f | sed 's/^\.//' | sort)" = "$(rpm -qlp "$core" "$milter" | sort)"
for bin in usr/sbin/cofferd usr/bin/coffer usr/sbin/coffer-milter; do
    check "$bin --version" "$work/root/$bin" --version
done
glibc="$(objdump -T "$work"/root/usr/sbin/cofferd "$work"/root/usr/bin/coffer \
    "$work"/root/usr/sbin/coffer-milter | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)"
check "glibc symbols found in the binaries (highest: GLIBC_$glibc)" test -n "$glibc"
check "highest glibc symbol version $glibc <= 2.34 (RHEL 9)" \
    test "$(printf '%s\n2.34\n' "$glibc" | sort -V | tail -n 1)" = 2.34
check "cofferd check-config --strict accepts the packaged coffer.toml" \
    "$work/root/usr/sbin/cofferd" check-config --strict --config "$work/root/etc/coffer/coffer.toml"
check "coffer-milter check-config accepts it too" \
    "$work/root/usr/sbin/coffer-milter" check-config --config "$work/root/etc/coffer/coffer.toml"
check "the unit files are the Debian package's" \
    cmp -s "$work/root/usr/lib/systemd/system/cofferd.service" packaging/systemd/cofferd.service

# --- 4. install, upgrade, erase with rpm: the scriptlets run ---------------------------------
say "rpm -i (Debian's rpm; scriptlets run, systemctl skipped without systemd)"
"${rpm_i[@]}" -i "$core" "$milter" 2>&1 | sed 's/^/    rpm: /'
check "both installed" rpm -q coffer coffer-milter
check "user coffer exists, home /var/lib/coffer, no login shell" \
    bash -c "getent passwd coffer | grep -Eq ':/var/lib/coffer:(/usr)?/sbin/nologin\$'"
check "group coffer exists" getent group coffer
check "/var/lib/coffer is coffer:coffer 0700" \
    test "$(stat -c '%U:%G %a' /var/lib/coffer)" = "coffer:coffer 700"
if [ -d /var/spool/postfix ]; then
    check "/var/spool/postfix/coffer is coffer:coffer 0750" \
        test "$(stat -c '%U:%G %a' /var/spool/postfix/coffer)" = "coffer:coffer 750"
fi
if getent passwd postfix >/dev/null; then
    check "postfix is in group coffer" bash -c "id -Gn postfix | tr ' ' '\n' | grep -qx coffer"
fi
check "/usr/sbin/cofferd installed and runs" /usr/sbin/cofferd --version
check "user coffer can read the installed configuration" \
    runuser -u coffer -- /usr/sbin/cofferd check-config --config /etc/coffer/coffer.toml

say "rpm -U to release 2 with an edited coffer.toml"
echo '# edited by the administrator' >>/etc/coffer/coffer.toml
"${rpm_i[@]}" -U "$work"/new/coffer-[0-9]*.rpm "$work"/new/coffer-milter-[0-9]*.rpm 2>&1 | sed 's/^/    rpm: /'
check "release 2 installed" bash -c "rpm -q --qf '%{RELEASE}' coffer | grep -qx 2"
check "the edited coffer.toml is kept" grep -q '^# edited by the administrator' /etc/coffer/coffer.toml
# rpm writes .rpmnew only when the packaged file changed between the two releases; here
# it did not, so there must be none (and the edit still stands).
check "no stray coffer.toml.rpmnew for an unchanged packaged file" test ! -e /etc/coffer/coffer.toml.rpmnew

say "rpm -e (erase)"
"${rpm_i[@]}" -e coffer-milter coffer 2>&1 | tee "$work/erase.out" | sed 's/^/    rpm: /'
check "both erased" bash -c "! rpm -q coffer >/dev/null 2>&1 && ! rpm -q coffer-milter >/dev/null 2>&1"
check "binaries gone" test ! -e /usr/sbin/cofferd -a ! -e /usr/bin/coffer -a ! -e /usr/sbin/coffer-milter
check "the archive /var/lib/coffer is kept" test -d /var/lib/coffer
check "the erase says the archive is kept" grep -q 'archive in /var/lib/coffer is KEPT' "$work/erase.out"
check "the edited config is saved as coffer.toml.rpmsave" \
    grep -q '^# edited by the administrator' /etc/coffer/coffer.toml.rpmsave
check "user coffer is kept (it owns the archive)" getent passwd coffer

say "the RPM package test passed"
