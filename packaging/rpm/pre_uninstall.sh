# artemis-sync %preun ($1: 0 on erase, 1 on upgrade). On erase: stop the agent (it stops its
# node once and releases the lease) and disable it. On upgrade: nothing.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop artemis-sync.service >/dev/null 2>&1 || :
    fi
    systemctl --no-reload disable artemis-sync.service >/dev/null 2>&1 || :
fi
