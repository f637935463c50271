# artemis-sync %postun ($1: 0 on erase, 1 on upgrade).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        # Upgrade: restart the agent only if it is running (on the hot VM that hands the
        # node to the other VM).
        systemctl try-restart artemis-sync.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    # Erase: rpm itself removes /etc/artemis-sync/agent.toml (kept as agent.toml.rpmsave
    # when it was edited). The directories the %post created go only when empty and not
    # mounted on: rmdir never deletes a file, and a mounted or non-empty share stays.
    for d in /var/lib/artemis-sync/share /var/lib/artemis-sync; do
        if [ -d "$d" ] && [ ! -L "$d" ] && ! mountpoint -q "$d" 2>/dev/null; then
            rmdir "$d" 2>/dev/null || echo "artemis-sync: $d is not empty; kept" >&2
        fi
    done
    # The package's own directories, which this rpm cannot list as its own (cargo-generate-rpm
    # 0.21 fails on directory entries), when empty: not /etc/artemis-sync while it holds
    # agent.toml.rpmsave or your credentials.
    rmdir /usr/share/doc/artemis-sync /etc/artemis-sync 2>/dev/null || :
fi
