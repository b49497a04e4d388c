# coffer-milter %preun. $1: 0 when the package is erased, 1 when it is upgraded.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now coffer-milter.service >/dev/null 2>&1 || :
fi
exit 0
