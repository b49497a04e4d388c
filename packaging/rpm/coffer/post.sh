# coffer %post. $1: 1 on install, 2 on upgrade.
# The archive directory (systemd's StateDirectory=coffer makes it too; made here so that
# `coffer` works before the daemon first runs). An existing one is left alone.
if [ ! -d /var/lib/coffer ]; then
    install -d -o coffer -g coffer -m 0700 /var/lib/coffer
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
# Nothing is enabled or started: the administrator decides (RHEL's presets do the same
# for services they do not know).
if [ "$1" -eq 1 ]; then
    echo "coffer: edit /etc/coffer/coffer.toml, check it with 'cofferd check-config',"
    echo "coffer: then 'systemctl enable --now cofferd' (see /usr/share/doc/coffer/install-rpm.md)."
fi
exit 0
