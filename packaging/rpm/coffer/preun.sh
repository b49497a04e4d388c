# coffer %preun. $1: 0 when the package is erased, 1 when it is upgraded.
# On erase, stop and disable cofferd; on upgrade leave it running (%postun restarts it).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now cofferd.service >/dev/null 2>&1 || :
fi
exit 0
