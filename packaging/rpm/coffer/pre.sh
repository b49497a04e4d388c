# coffer %pre: the coffer system user and group, before anything is unpacked.
# $1: 1 on install, 2 on upgrade. Idempotent: an existing user or group is left alone.
getent group coffer >/dev/null || groupadd -r coffer
getent passwd coffer >/dev/null || useradd -r -g coffer -d /var/lib/coffer -M \
    -s /sbin/nologin -c "Coffer mail archive" coffer
exit 0
