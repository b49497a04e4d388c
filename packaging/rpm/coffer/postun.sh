# coffer %postun. $1: 0 when the package is erased, 1 when it is upgraded.
# RPM has no purge: /etc/coffer/coffer.toml, if edited, is saved as coffer.toml.rpmsave;
# the archive in /var/lib/coffer and the coffer user are always kept.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart cofferd.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ] && [ -d /var/lib/coffer ]; then
    echo "coffer: the archive in /var/lib/coffer is KEPT, and so is the coffer user." >&2
    echo "coffer: delete it yourself once you no longer need it: rm -r /var/lib/coffer" >&2
fi
exit 0
