# coffer-milter %post. $1: 1 on install, 2 on upgrade.
# Postfix on RPM-based systems does not chroot smtpd by default, so main.cf names the
# socket by its absolute path, unix:/var/spool/postfix/coffer/milter.sock, in a
# directory made here coffer:coffer 0750; postfix joins group coffer to reach it (the
# socket is 0660 group coffer). Idempotent. Nothing is enabled or started.
if [ -d /var/spool/postfix ] && [ ! -d /var/spool/postfix/coffer ]; then
    install -d -o coffer -g coffer -m 0750 /var/spool/postfix/coffer
    echo "coffer-milter: created /var/spool/postfix/coffer for the milter socket."
fi
if getent passwd postfix >/dev/null; then
    if ! id -Gn postfix | tr ' ' '\n' | grep -qx coffer; then
        usermod -a -G coffer postfix
        echo "coffer-milter: added user postfix to group coffer (to reach the milter socket)."
        echo "coffer-milter: run 'postfix reload' so Postfix's processes pick it up."
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    echo "coffer-milter: 'systemctl enable --now coffer-milter', then add it to Postfix:"
    echo "coffer-milter: /usr/share/coffer/postfix/main.cf.snippet (SELinux: install-rpm.md)."
fi
exit 0
