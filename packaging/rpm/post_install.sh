# artemis-sync %post ($1: 1 on first install, 2 on upgrade). On first install: enable the
# agent but do not start it (its config must be edited first). Restarting on upgrade is in
# %postun, after the old files are gone.

# The state directory; the share is mounted on share/. Mode 0755: the node's user must be
# able to follow ${BASE_DIR}/artemis -> /var/lib/artemis-sync/share. Created here, not owned
# by the package (as in the .deb), so that removing the package never touches a mounted
# share; left alone when it exists.
[ -d /var/lib/artemis-sync ] || install -d -m 0755 -o root -g root /var/lib/artemis-sync
[ -e /var/lib/artemis-sync/share ] || install -d -m 0755 -o root -g root /var/lib/artemis-sync/share

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    systemctl --no-reload enable artemis-sync.service >/dev/null 2>&1 || :
fi
