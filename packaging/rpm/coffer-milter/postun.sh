# coffer-milter %postun. $1: 0 when the package is erased, 1 when it is upgraded.
# main.cf is the administrator's: if it still names the milter socket, Postfix tempfails
# mail until the entry is removed, which this script says but does not do.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart coffer-milter.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    rmdir /var/spool/postfix/coffer 2>/dev/null || :
    if command -v postconf >/dev/null 2>&1 \
        && postconf -h smtpd_milters non_smtpd_milters 2>/dev/null | grep -q 'coffer/milter.sock'; then
        echo "coffer-milter: Postfix still names the coffer milter socket in smtpd_milters or" >&2
        echo "coffer-milter: non_smtpd_milters, and tempfails mail while the milter is gone." >&2
    fi
fi
exit 0
