#!/usr/bin/env bash
# Install test of the artemis-sync packages, for real, on a throwaway Debian 12 root:
#
#   bash packaging/test-install.sh          (as root; CI runs it from .ci/run)
#
# 1. builds the .deb and .rpm with packaging/build.sh (release 1, and release 2 to upgrade to);
# 2. the .deb, installed with dpkg into a Debian 12 root made by debootstrap (cached as a
#    tarball in /var/cache/artemis-sync-test, so only the first run downloads it), each command
#    run by systemd-nspawn in the root: never the host's own package state. Checks every file
#    with its mode and owner, the conffile, the unit enabled and not started,
#    /sbin/mount.artemis-sync -f -v (alone and through mount(8)), `artemis-sync check-config`
#    on the shipped example, `systemd-analyze verify` of the unit, an upgrade keeping an edited
#    config and an administrator's `disable`, remove, and purge (the share's contents stay;
#    afterwards nothing of the package is left);
# 3. the .rpm: `rpm -qlp` lists the same files with the same modes, agent.toml is
#    %config(noreplace); `rpm -i --root --nodeps` into a second root, `rpm -V`, an upgrade
#    keeping the edited config, `rpm -e`;
# 4. boots the first root with its own systemd (systemd-nspawn --boot), installs the .deb
#    there (enabled, not started), configures a bind share in /etc/fstab and a stand-in
#    node, reboots, and shows: systemd mounted the fstab line of type artemis-sync through
#    /sbin/mount.artemis-sync at boot; artemis-sync.service started after the mount, in the
#    host's mount namespace, hardened, and reached role hot with its node running; an
#    upgrade restarts a running agent and leaves a stopped one stopped; stopping the service
#    stops the node exactly once and releases the lease; a node given as
#    [node] systemd_unit is started and stopped through systemctl from inside the unit's
#    sandbox; remove and purge with the agent running. Then powers the container off.
#
# Every wait is bounded; on any exit the container is powered off (killed if it does not
# go) and the work directory removed. When it cannot run (not root, not a Debian-like host):
# run by hand, it prints `test-install: skipped: <why>` and exits 0; under CI (CI=true) it
# prints why and fails, so that a green CI has run it.
# Environment: ARTEMIS_SYNC_TEST_CACHE (default /var/cache/artemis-sync-test),
# ARTEMIS_SYNC_TEST_MIRROR (default http://deb.debian.org/debian), ARTEMIS_SYNC_TEST_KEEP=1
# keeps the work directory (under /var/tmp) for a look after a failure,
# ARTEMIS_SYNC_TEST_PKGS=DIR tests the packages in DIR/1 and DIR/2 (as build.sh --release 1
# and --release 2 --out put them) instead of building them.
set -euo pipefail
cd "$(dirname "$0")/.."

# This test cannot run here, because "$*": a failure under CI, a skip by hand.
cannot_run() {
    if [[ ${CI:-} == true ]]; then
        echo "test-install: FAIL: cannot run: $* (under CI=true a test that cannot run fails)" >&2
        exit 1
    fi
    echo "test-install: skipped: $*"
    exit 0
}
if [[ $(id -u) != 0 ]]; then
    cannot_run "needs root (debootstrap, systemd-nspawn, dpkg and rpm into a throwaway root, mounts)"
fi
if [[ $(uname -s) != Linux ]] || ! command -v apt-get >/dev/null; then
    cannot_run "needs a Debian-like Linux host (apt-get, dpkg)"
fi

START=$SECONDS
SUITE=bookworm
INCLUDE=systemd,systemd-sysv,dbus,man-db
MIRROR=${ARTEMIS_SYNC_TEST_MIRROR:-http://deb.debian.org/debian}
CACHE=${ARTEMIS_SYNC_TEST_CACHE:-/var/cache/artemis-sync-test}
ARCH=$(dpkg --print-architecture)
MACHINE=artemis-sync-test-$$
UNIT=artemis-sync.service
MOUNT_POINT=/var/lib/artemis-sync/share
PATH_IN=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

passed=0
WORK=
root_job=
NSPAWN_PID=
LEADER=
LOG=/dev/null

say() { printf '== [%4ds] %s\n' $((SECONDS - START)) "$*"; }
ok() { passed=$((passed + 1)); printf '   ok   %s\n' "$*"; }
note() { printf '   note %s\n' "$*"; }
fail() {
    printf '   FAIL %s\n' "$*" >&2
    if [[ -s $LOG ]]; then
        echo "   --- last lines of $LOG:" >&2
        tail -n 40 "$LOG" | sed 's/^/   | /' >&2
    fi
    exit 1
}
# check DESCRIPTION COMMAND...: runs COMMAND (output to the log), ok when it succeeds.
check() {
    local what=$1
    shift
    echo "+ $*" >>"$LOG"
    if "$@" >>"$LOG" 2>&1; then ok "$what"; else fail "$what (failed: $*)"; fi
}
# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND every 0.3 s until it succeeds.
wait_for() {
    local what=$1 limit=$2
    shift 2
    local end=$((SECONDS + limit))
    until "$@" >>"$LOG" 2>&1; do
        ((SECONDS < end)) || fail "timed out after ${limit}s waiting for $what"
        sleep 0.3
    done
}
# Drops nspawn's notice about /run on a host whose /run is not a tmpfs.
quiet_nspawn() { grep -v 'Attempted to remove disk file system under' >&2 || true; }

# in_root ROOT COMMAND...: runs COMMAND in a root that is not booted (nspawn, bounded).
in_root() {
    local root=$1
    shift
    timeout 300 systemd-nspawn -q -D "$root" -M "$MACHINE" --register=no --keep-unit --as-pid2 --console=pipe \
        --bind-ro="$PKGS:/pkgs" -E DEBIAN_FRONTEND=noninteractive -E LC_ALL=C -E PATH="$PATH_IN" \
        "$@" </dev/null 2> >(quiet_nspawn)
}
# in_ct COMMAND...: runs COMMAND inside the booted container (its namespaces and root).
in_ct() {
    timeout "${CT_TIMEOUT:-90}" nsenter -t "$LEADER" -a -r -w \
        /usr/bin/env -i PATH="$PATH_IN" LC_ALL=C DEBIAN_FRONTEND=noninteractive "$@" </dev/null
}
# alive PID: whether PID runs in the container.
alive() { in_ct sh -c "kill -0 $1" 2>/dev/null; }
# prop UNIT PROPERTY: one property of a unit in the container.
prop() { in_ct systemctl show -p "$2" --value "$1"; }

boot() {
    local n=$1
    say "boot the root with systemd-nspawn --boot (boot $n)"
    systemd-nspawn -q -D "$ROOT" -M "$MACHINE" --boot --register=no --keep-unit --console=read-only \
        --bind-ro="$PKGS:/pkgs" </dev/null >"$WORK/boot$n.log" 2>&1 &
    NSPAWN_PID=$!
    LEADER=
    local end=$((SECONDS + 20))
    until LEADER=$(pgrep -P "$NSPAWN_PID" -x systemd); do
        kill -0 "$NSPAWN_PID" 2>/dev/null || fail "systemd-nspawn exited at once (see $WORK/boot$n.log): $(tail -n 5 "$WORK/boot$n.log")"
        ((SECONDS < end)) || fail "no systemd in the container after 20s"
        sleep 0.2
    done
    # is-system-running --wait prints nothing when it runs before systemd's bus exists (entered
    # too early); ask again until the deadline rather than failing on that race.
    local state= err=
    end=$((SECONDS + 120))
    while :; do
        state=$(CT_TIMEOUT=$((end - SECONDS > 1 ? end - SECONDS : 1)) in_ct systemctl is-system-running --wait 2>"$WORK/state.err") || true
        [[ -n $state && $state != starting && $state != initializing ]] && break
        ((SECONDS < end)) || break
        sleep 0.5
    done
    err=$(tail -n 2 "$WORK/state.err" 2>/dev/null || true)
    case "$state" in
    running) ok "boot $n: systemd reached its targets (is-system-running: running)" ;;
    degraded)
        in_ct systemctl --no-pager --failed >&2 || true
        fail "boot $n: system degraded (failed units above)"
        ;;
    *) fail "boot $n: is-system-running says '${state:-nothing}' after 120s${err:+ ($err)}" ;;
    esac
}

poweroff() {
    [[ -n $NSPAWN_PID ]] || return 0
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        [[ -n $LEADER ]] && CT_TIMEOUT=10 in_ct systemctl poweroff --no-block >/dev/null 2>&1 || true
        local end=$((SECONDS + 60))
        while kill -0 "$NSPAWN_PID" 2>/dev/null && ((SECONDS < end)); do sleep 0.3; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            echo "   container did not power off in 60s: SIGTERM to systemd-nspawn" >&2
            kill -TERM "$NSPAWN_PID" 2>/dev/null || true
            end=$((SECONDS + 15))
            while kill -0 "$NSPAWN_PID" 2>/dev/null && ((SECONDS < end)); do sleep 0.3; done
            kill -KILL "$NSPAWN_PID" 2>/dev/null || true
        fi
    fi
    local rc=0
    wait "$NSPAWN_PID" 2>/dev/null || rc=$?
    NSPAWN_PID=
    LEADER=
    return "$rc"
}

kill_tree() {
    local c
    for c in $(pgrep -P "$1"); do kill_tree "$c"; done
    kill "$1" 2>/dev/null
}
unmount_under() {
    local m
    for m in $(findmnt -rn -o TARGET | awk -v w="$1/" 'index($0, w) == 1' | sort -r); do
        umount -l "$m" && echo "   unmounted leftover $m" >&2
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $root_job ]] && kill -0 "$root_job" 2>/dev/null; then
        kill_tree "$root_job"
        wait "$root_job" 2>/dev/null
        unmount_under "$CACHE/build.$$"
        rm -rf --one-file-system "$CACHE/build.$$"
        echo "   stopped the unfinished debootstrap" >&2
    fi
    if [[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        if ((rc != 0)) && [[ -n $LEADER ]]; then
            echo "   --- container journal (artemis-sync, the share's mount unit):" >&2
            CT_TIMEOUT=10 in_ct journalctl --no-pager -n 60 -u "$UNIT" -u "$MOUNT_UNIT" 2>&1 | sed 's/^/   | /' >&2
        fi
        poweroff
        echo "   container powered off" >&2
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        # nspawn's mounts live in its own namespaces; anything under WORK on the host is a leak.
        unmount_under "$WORK"
        if findmnt -rn -o TARGET | awk -v w="$WORK/" 'index($0, w) == 1 { f = 1 } END { exit !f }'; then
            echo "   mounts remain under $WORK: not removing it" >&2
        elif [[ ${ARTEMIS_SYNC_TEST_KEEP:-} == 1 ]]; then
            echo "   kept $WORK" >&2
        else
            rm -rf --one-file-system "$WORK"
        fi
    fi
    rmdir "/run/systemd/nspawn/propagate/$MACHINE" 2>/dev/null
    if ((rc == 0)); then
        echo "test-install: $passed passed, 0 failed ($((SECONDS - START)) s)"
    else
        echo "test-install: $passed passed, 1 failed ($((SECONDS - START)) s)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools --------------------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v rpm >/dev/null || need+=(rpm)
command -v nsenter >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    say "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${need[@]}" >/dev/null
fi

WORK=$(mktemp -d /var/tmp/artemis-sync-test.XXXXXX)
LOG=$WORK/log
PKGS=$WORK/pkgs
ROOT=$WORK/root
MOUNT_UNIT=$(systemd-escape -p --suffix=mount "$MOUNT_POINT")
mkdir -p "$PKGS"

# --- the Debian root, cached ----------------------------------------------------------------
# debootstrap runs while the packages build (it mostly waits on the network).
tarball=$CACHE/debian-$SUITE-$ARCH-minbase-${INCLUDE//,/-}.tar.gz
make_root_tarball() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock -w 900 9 || { echo "cannot lock $CACHE/.lock" >&2; return 1; }
    [[ -s $tarball ]] && return 0
    local tmp=$CACHE/build.$$
    rm -rf --one-file-system "$tmp"
    if ! timeout 900 debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        unmount_under "$tmp"
        rm -rf --one-file-system "$tmp"
        return 1
    fi
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    echo artemis-sync-test >"$tmp/etc/hostname"
    tar -C "$tmp" -czf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf --one-file-system "$tmp"
}
# A month-old root is made again, with that month's security updates.
if [[ -s $tarball ]] && [[ -n $(find "$tarball" -mtime +30) ]]; then
    rm -f "$tarball"
fi
if [[ -s $tarball ]]; then
    say "Debian root: cached $tarball"
    root_job=
else
    say "Debian root: debootstrap $SUITE ($INCLUDE) from $MIRROR, into the cache (in the background)"
    make_root_tarball &
    root_job=$!
fi

# --- build ----------------------------------------------------------------------------------
if [[ -n ${ARTEMIS_SYNC_TEST_PKGS:-} ]]; then
    say "packages from $ARTEMIS_SYNC_TEST_PKGS (not built)"
    cp -r "$ARTEMIS_SYNC_TEST_PKGS/1" "$ARTEMIS_SYNC_TEST_PKGS/2" "$PKGS/"
else
    say "build the packages (packaging/build.sh), release 1 and release 2"
    echo "+ packaging/build.sh --release 1" >>"$LOG"
    timeout 1800 bash packaging/build.sh --release 1 --out "$PKGS/1" >>"$LOG" 2>&1 || fail "packaging/build.sh --release 1"
    echo "+ packaging/build.sh --release 2" >>"$LOG"
    timeout 1200 bash packaging/build.sh --release 2 --out "$PKGS/2" >>"$LOG" 2>&1 || fail "packaging/build.sh --release 2"
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
DEB1=$(cd "$PKGS" && ls 1/artemis-sync_"$version"-1_*.deb)
DEB2=$(cd "$PKGS" && ls 2/artemis-sync_"$version"-2_*.deb)
RPM1=$(cd "$PKGS" && ls 1/artemis-sync-"$version"-1.*.rpm)
RPM2=$(cd "$PKGS" && ls 2/artemis-sync-"$version"-2.*.rpm)
ok "built $DEB1 $DEB2 $RPM1 $RPM2"

if [[ -n $root_job ]]; then
    wait "$root_job" || fail "debootstrap failed (log: $CACHE/debootstrap.log)"
    ok "debootstrap: root cached as $tarball"
fi

# --- package contents -----------------------------------------------------------------------
say "package contents"
# "perms path" for each non-directory entry.
dpkg-deb -c "$PKGS/$DEB1" | awk '$1 !~ /^d/ { p = $6; sub(/^\./, "", p); print $1, p }' | sort -k2 >"$WORK/deb.files"
rpm -qp --qf '[%{FILEMODES:perms} %{FILENAMES}\n]' "$PKGS/$RPM1" | sort -k2 >"$WORK/rpm.files"
echo "   .deb files:"
sed 's/^/     /' "$WORK/deb.files"
required=(
    /usr/bin/artemis-sync
    /sbin/mount.artemis-sync
    /etc/artemis-sync/agent.toml
    /lib/systemd/system/artemis-sync.service
    /usr/share/man/man8/artemis-sync.8.gz
    /usr/share/man/man8/mount.artemis-sync.8.gz
    /usr/share/bash-completion/completions/artemis-sync
    /usr/share/zsh/vendor-completions/_artemis-sync
    /usr/share/fish/vendor_completions.d/artemis-sync.fish
    /usr/share/doc/artemis-sync/README.md
    /usr/share/doc/artemis-sync/fstab.examples
    /usr/share/doc/artemis-sync/prometheus-rules.yml
    /usr/share/doc/artemis-sync/grafana-dashboard.json
    /usr/share/doc/artemis-sync/copyright
)
# The benchmark and the demo (the workspace's tools package) ship beside the agent.
if grep -q ' /usr/bin/artemis-sync-bench$' "$WORK/deb.files"; then
    required+=(/usr/bin/artemis-sync-bench /usr/bin/artemis-sync-demo)
elif grep -q '^name = "artemis-sync-bench"' tools/Cargo.toml; then
    note "artemis-sync-bench is built but not packaged yet: add it to [package.metadata.deb] assets and [package.metadata.generate-rpm] assets"
fi
for f in "${required[@]}"; do
    grep -q " $f\$" "$WORK/deb.files" || fail ".deb lacks $f"
done
ok ".deb holds all ${#required[@]} required files (binaries, helper in /sbin, conffile, unit, man pages, completions, docs)"
# Man pages for every subcommand too, generated from the clap definitions.
for sub in $(target/release/artemis-sync --help | awk '/^Commands:/ { c = 1; next } c && /^  [a-z]/ { print $1 } /^$/ { c = 0 }'); do
    [[ $sub == help ]] && continue
    grep -q " /usr/share/man/man8/artemis-sync-$sub.8.gz\$" "$WORK/deb.files" || fail "no man page for 'artemis-sync $sub'"
done
ok "a man page for each subcommand of artemis-sync --help"
# The rpm ships the same files with the same modes; the zsh completion goes where each
# distribution's zsh looks (Debian: vendor-completions, Fedora/RHEL: site-functions).
sed 's#/usr/share/zsh/vendor-completions/#/usr/share/zsh/site-functions/#' "$WORK/deb.files" | sort -k2 >"$WORK/deb.files.rpm-paths"
if ! diff -u "$WORK/deb.files.rpm-paths" "$WORK/rpm.files" >"$WORK/files.diff"; then
    cat "$WORK/files.diff" >&2
    fail "rpm -qlp and the .deb list different files or modes"
fi
ok "rpm -qlp lists the same $(wc -l <"$WORK/rpm.files") files with the same modes as the .deb (zsh completion dir aside)"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$PKGS/$RPM1" | grep -qx 'cn /etc/artemis-sync/agent.toml' ||
    fail "agent.toml is not %config(noreplace) in the rpm"
ok "rpm: /etc/artemis-sync/agent.toml is %config(noreplace)"
[[ $(rpm -qp --qf '[%{FILEUSERNAME}:%{FILEGROUPNAME}\n]' "$PKGS/$RPM1" | sort -u) == root:root ]] || fail "rpm files not all root:root"
dpkg-deb -c "$PKGS/$DEB1" | awk '$2 != "0/0" { bad = 1 } END { exit bad }' || fail ".deb entries not all owned by 0/0"
ok "every file owned by root:root in both packages"
[[ $(dpkg-deb -f "$PKGS/$DEB1" Version) == "$version-1" ]] || fail "deb version"
dpkg-deb --ctrl-tarfile "$PKGS/$DEB1" | tar -xO ./conffiles | grep -qx /etc/artemis-sync/agent.toml || fail "agent.toml is not a conffile"
ok ".deb: /etc/artemis-sync/agent.toml is a conffile"

# --- the .deb in a root that is not booted ----------------------------------------------------
say "the .deb, installed with dpkg in a Debian $SUITE root (systemd-nspawn, not booted)"
mkdir "$ROOT"
tar -C "$ROOT" -xzf "$tarball"
[[ $(readlink "$ROOT/sbin") == usr/sbin || -d $ROOT/sbin ]] || fail "unexpected /sbin in the root"
# What is in the root before the package: after purge, this must be all there is.
# (dpkg's and man-db's own records and logs, and the test's /pkgs aside).
snapshot() { (cd "$1" && find . -xdev \( -path ./var/lib/dpkg -o -path ./var/log -o -path ./var/cache -o -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp -o -path ./var/tmp -o -path ./pkgs \) -prune -o -print | sort); }
snapshot "$ROOT" >"$WORK/before.list"

check "dpkg -i $DEB1" in_root "$ROOT" dpkg -i "/pkgs/$DEB1"
# Every file of the package, with its mode and owner, as the installed system resolves it.
awk '{ print $2 }' "$WORK/deb.files" >"$PKGS/files"
in_root "$ROOT" sh -c 'while read -r f; do stat -c "%A %u:%g %n" "$f"; done </pkgs/files' >"$WORK/installed.stat" 2>>"$LOG" ||
    fail "a file of the package is missing after dpkg -i (see $LOG)"
awk '{ print $1, "0:0", $2 }' "$WORK/deb.files" | diff -u - "$WORK/installed.stat" >&2 || fail "installed modes or owners differ from the package's"
ok "all $(wc -l <"$WORK/deb.files") files installed with their modes, owned by 0:0 (/sbin/mount.artemis-sync -rwxr-xr-x, agent.toml -rw-r--r--, ...)"
in_root "$ROOT" stat -c '%F %A %u:%g %n' /var/lib/artemis-sync "$MOUNT_POINT" >"$WORK/dirs.stat" 2>>"$LOG" || fail "/var/lib/artemis-sync not created"
[[ $(awk '{ print $1, $2, $3 }' "$WORK/dirs.stat" | sort -u) == "directory drwxr-xr-x 0:0" ]] || fail "state directories: $(cat "$WORK/dirs.stat")"
ok "/var/lib/artemis-sync and $MOUNT_POINT created, drwxr-xr-x root:root"
in_root "$ROOT" dpkg-query -W -f='${Conffiles}' artemis-sync | grep -q '/etc/artemis-sync/agent.toml [0-9a-f]' ||
    fail "dpkg does not record agent.toml as a conffile"
ok "dpkg records /etc/artemis-sync/agent.toml as a conffile"
[[ $(in_root "$ROOT" systemctl is-enabled "$UNIT" 2>/dev/null) == enabled ]] || fail "$UNIT is not enabled after the first install"
ok "first install: $UNIT enabled (not started: the postinst starts nothing)"
check "man artemis-sync, man mount.artemis-sync and man artemis-sync-agent render" \
    in_root "$ROOT" sh -c 'for p in artemis-sync mount.artemis-sync artemis-sync-agent; do man -P cat "$p" | grep -q "^FILES" || exit 1; done'
out=$(in_root "$ROOT" /sbin/mount.artemis-sync fs-0123abcd.efs.eu-west-1.amazonaws.com:/ "$MOUNT_POINT" -f -v -o backend=efs 2>&1) ||
    fail "mount.artemis-sync -f -v -o backend=efs: $out"
echo "     \$ /sbin/mount.artemis-sync fs-0123abcd.efs.eu-west-1.amazonaws.com:/ $MOUNT_POINT -f -v -o backend=efs"
echo "$out" | sed 's/^/     /'
grep -q -- '-t nfs4 -o nfsvers=4.1,.*hard.*noresvport' <<<"$out" || fail "the helper's plan for efs is not the NFS 4.1 mount expected"
ok "/sbin/mount.artemis-sync -f -v -o backend=efs prints the EFS mount it would run"
out=$(in_root "$ROOT" mount -f -v -t artemis-sync -o backend=efs,_netdev,nofail,x-systemd.mount-timeout=180 fs-0123abcd.efs.eu-west-1.amazonaws.com:/ "$MOUNT_POINT" 2>&1) ||
    fail "mount -f -t artemis-sync: $out"
grep -q -- '-t nfs4' <<<"$out" || fail "mount(8) did not run /sbin/mount.artemis-sync: $out"
ok "mount(8) -f -t artemis-sync finds and runs /sbin/mount.artemis-sync"
in_root "$ROOT" artemis-sync check-config >"$WORK/check-config.out" 2>>"$LOG" || fail "artemis-sync check-config on the shipped example"
grep -q '^# /etc/artemis-sync/agent.toml: valid' "$WORK/check-config.out" || fail "check-config did not say valid"
ok "artemis-sync check-config accepts the shipped /etc/artemis-sync/agent.toml"
out=$(in_root "$ROOT" systemd-analyze verify "/lib/systemd/system/$UNIT" 2>&1) || fail "systemd-analyze verify: $out"
[[ -z $out ]] || fail "systemd-analyze verify warns: $out"
ok "systemd-analyze verify $UNIT: no error, no warning (man pages of Documentation= found)"

say "upgrade to release 2 over an edited config"
printf '\n# edited by the install test\n' >>"$ROOT/etc/artemis-sync/agent.toml"
sed -i 's/^machine_name = ""/machine_name = "edited"/' "$ROOT/etc/artemis-sync/agent.toml"
sum_before=$(sha256sum <"$ROOT/etc/artemis-sync/agent.toml")
check "dpkg -i $DEB2 (upgrade)" in_root "$ROOT" dpkg -i "/pkgs/$DEB2"
[[ $(sha256sum <"$ROOT/etc/artemis-sync/agent.toml") == "$sum_before" ]] || fail "the upgrade changed the edited agent.toml"
[[ ! -e $ROOT/etc/artemis-sync/agent.toml.dpkg-new && ! -e $ROOT/etc/artemis-sync/agent.toml.dpkg-dist ]] || fail "upgrade left agent.toml.dpkg-*"
[[ $(in_root "$ROOT" dpkg-query -W -f='${Version}' artemis-sync) == "$version-2" ]] || fail "not upgraded to $version-2"
[[ $(in_root "$ROOT" systemctl is-enabled "$UNIT" 2>/dev/null) == enabled ]] || fail "not enabled after the upgrade"
ok "upgraded to $version-2: the edited agent.toml kept as it was, no prompt, still enabled"
in_root "$ROOT" systemctl disable "$UNIT" >>"$LOG" 2>&1
check "dpkg -i $DEB2 again (reinstall)" in_root "$ROOT" dpkg -i "/pkgs/$DEB2"
[[ $(in_root "$ROOT" systemctl is-enabled "$UNIT" 2>/dev/null) == disabled ]] || fail "an upgrade re-enabled the unit the administrator had disabled"
ok "an administrator's 'systemctl disable' survives an upgrade"
in_root "$ROOT" systemctl enable "$UNIT" >>"$LOG" 2>&1

say "remove and purge, with data in the share"
mkdir -p "$ROOT$MOUNT_POINT/.artemis-sync" "$ROOT$MOUNT_POINT/journal" "$ROOT/opt/corda"
echo lease >"$ROOT$MOUNT_POINT/.artemis-sync/lease.json"
echo journal >"$ROOT$MOUNT_POINT/journal/activemq-data-1.amq"
ln -s "$MOUNT_POINT" "$ROOT/opt/corda/artemis"
echo "password=secret" >"$ROOT/etc/artemis-sync/azure.cred"
check "dpkg -r artemis-sync" in_root "$ROOT" dpkg -r artemis-sync
for f in /usr/bin/artemis-sync /usr/sbin/mount.artemis-sync "/lib/systemd/system/$UNIT" "/etc/systemd/system/multi-user.target.wants/$UNIT"; do
    [[ ! -e $ROOT$f && ! -L $ROOT$f ]] || fail "$f still there after remove"
done
[[ -f $ROOT/etc/artemis-sync/agent.toml ]] || fail "remove deleted the conffile"
ok "remove: binaries, unit and its enablement link gone; the config stays until purge"
check "dpkg -P artemis-sync" in_root "$ROOT" dpkg -P artemis-sync
[[ ! -e $ROOT/etc/artemis-sync/agent.toml ]] || fail "purge left agent.toml"
[[ -f $ROOT/etc/artemis-sync/azure.cred ]] || fail "purge deleted the administrator's credentials file"
[[ $(cat "$ROOT$MOUNT_POINT/.artemis-sync/lease.json") == lease && $(cat "$ROOT$MOUNT_POINT/journal/activemq-data-1.amq") == journal ]] ||
    fail "purge touched the share's contents"
[[ -L $ROOT/opt/corda/artemis ]] || fail "purge touched \${BASE_DIR}/artemis"
ok "purge: agent.toml gone; the share's lease and journal, \${BASE_DIR}/artemis and an admin's file in /etc/artemis-sync kept"
rm -rf "$ROOT$MOUNT_POINT/.artemis-sync" "$ROOT$MOUNT_POINT/journal" "$ROOT/opt/corda/artemis" "$ROOT/etc/artemis-sync/azure.cred"
rmdir "$ROOT/opt/corda"
check "dpkg -i of a fresh install" in_root "$ROOT" dpkg -i "/pkgs/$DEB1"
check "dpkg -P of it" in_root "$ROOT" dpkg -P artemis-sync
snapshot "$ROOT" >"$WORK/after.list"
if ! diff -u "$WORK/before.list" "$WORK/after.list" >"$WORK/purge.diff"; then
    cat "$WORK/purge.diff" >&2
    fail "after purge the root differs from before the install"
fi
ok "after purge the root holds exactly the files it had before the install"

# --- the .rpm -------------------------------------------------------------------------------
say "the .rpm: rpm -i --root --nodeps into a second root"
RROOT=$WORK/rpmroot
mkdir "$RROOT"
tar -C "$RROOT" -xzf "$tarball"
check "rpm -i --root $RROOT --nodeps $RPM1" rpm -i --root "$RROOT" --nodeps "$PKGS/$RPM1"
check "rpm -V: every file of the rpm installed with its mode, owner and digest" rpm -V --root "$RROOT" --nodeps artemis-sync
[[ -d $RROOT$MOUNT_POINT && -L $RROOT/etc/systemd/system/multi-user.target.wants/$UNIT ]] || fail "rpm %post did not create $MOUNT_POINT or enable $UNIT"
ok "rpm %post: $MOUNT_POINT created, $UNIT enabled"
echo "# edited" >>"$RROOT/etc/artemis-sync/agent.toml"
sum_before=$(sha256sum <"$RROOT/etc/artemis-sync/agent.toml")
check "rpm -U --root --nodeps $RPM2 (upgrade)" rpm -U --root "$RROOT" --nodeps "$PKGS/$RPM2"
[[ $(sha256sum <"$RROOT/etc/artemis-sync/agent.toml") == "$sum_before" ]] || fail "the rpm upgrade changed the edited agent.toml"
ok "rpm upgrade to release 2 kept the edited agent.toml"
check "rpm -e --root" rpm -e --root "$RROOT" --nodeps artemis-sync
[[ ! -e $RROOT/usr/bin/artemis-sync && ! -L $RROOT/etc/systemd/system/multi-user.target.wants/$UNIT && ! -e $RROOT/var/lib/artemis-sync ]] ||
    fail "rpm -e left the binary, the enablement link or /var/lib/artemis-sync"
[[ -f $RROOT/etc/artemis-sync/agent.toml.rpmsave ]] || fail "rpm -e did not keep the edited config as agent.toml.rpmsave"
[[ ! -e $RROOT/usr/share/doc/artemis-sync ]] || fail "rpm -e left /usr/share/doc/artemis-sync"
ok "rpm -e: files, enablement, the doc and empty state directories gone; the edited config saved as agent.toml.rpmsave"
rm -rf --one-file-system "$RROOT"

# --- a real boot ------------------------------------------------------------------------------
boot 1
check "dpkg -i $DEB1 with systemd running" in_ct dpkg -i "/pkgs/$DEB1"
[[ $(in_ct systemctl is-enabled "$UNIT") == enabled ]] || fail "not enabled after install"
[[ $(in_ct systemctl is-active "$UNIT") == inactive ]] || fail "the first install started the agent"
ok "first install under a running systemd: $UNIT enabled, not started"

say "configure: a bind share in /etc/fstab, a stand-in node, short lease intervals"
mkdir -p "$ROOT/srv/share" "$ROOT/opt/corda"
echo "written on the share's source" >"$ROOT/srv/share/marker"
cat >"$ROOT/usr/local/bin/fake-node" <<'EOF'
#!/usr/bin/perl
# The install test's stand-in for the Corda node. It counts every SIGTERM it gets (each
# delivery calls the handler: two SIGTERMs count two, where a shell trap would merge them),
# exits 0.5 s after the first, and logs its start (once the handler is set), one "term" line
# per SIGTERM, and its exit.
use strict;
use warnings;
my $terms = 0;
$SIG{TERM} = sub { $terms++ };
open(my $log, '>>', '/var/log/fake-node.log') or die "fake-node: $!";
$log->autoflush(1);
print $log "start $$ epoch=" . ($ENV{ARTEMIS_SYNC_EPOCH} // '') . " holder=" . ($ENV{ARTEMIS_SYNC_HOLDER} // '') . "\n";
select(undef, undef, undef, 0.1) until $terms;
select(undef, undef, undef, 0.1) for 1 .. 5; # a second SIGTERM in this window counts too
print $log "term $$\n" for 1 .. $terms;
print $log "exit $$\n";
exit 0;
EOF
chmod 755 "$ROOT/usr/local/bin/fake-node"
cat >"$ROOT/etc/artemis-sync/agent.toml" <<EOF
# The install test's config: a bind share (single host, hence allow_local_locks) and short
# intervals so that the agent takes the lease within seconds.
[node]
base_dir = "/opt/corda"
command = ["/usr/local/bin/fake-node"]
stop_timeout_ms = 1000

[storage]
mode = "shared"
backend = "bind"
source = "/srv/share"
mount_point = "$MOUNT_POINT"

[lock]
update_interval_ms = 500
wait_interval_ms = 2000
allow_local_locks = true
EOF
check "the test config is valid" in_ct artemis-sync check-config
echo "/srv/share $MOUNT_POINT artemis-sync backend=bind,nofail 0 0" >>"$ROOT/etc/fstab"
# The helper logs what it runs at info level: show it in the mount unit's journal.
mkdir -p "$ROOT/etc/systemd/system/$MOUNT_UNIT.d"
printf '[Mount]\nEnvironment=ARTEMIS_SYNC_LOG=info\n' >"$ROOT/etc/systemd/system/$MOUNT_UNIT.d/log.conf"
if grep -qa NOTIFY_SOCKET "$ROOT/usr/bin/artemis-sync"; then
    NOTIFY=1
    note "the agent speaks sd_notify: testing the shipped unit as it is (Type=notify, WatchdogSec=30s)"
else
    NOTIFY=0
    mkdir -p "$ROOT/etc/systemd/system/$UNIT.d"
    printf '[Service]\nType=simple\nWatchdogSec=0\n' >"$ROOT/etc/systemd/system/$UNIT.d/no-notify.conf"
    note "this agent build does not send sd_notify READY yet: testing with a drop-in Type=simple, WatchdogSec=0 (the shipped unit stays Type=notify)"
fi
poweroff || true
ok "powered off"

boot 2
mstate="$(prop "$MOUNT_UNIT" ActiveState) $(prop "$MOUNT_UNIT" Result) $(prop "$MOUNT_UNIT" SourcePath)"
[[ $mstate == "active success /etc/fstab" ]] || fail "$MOUNT_UNIT: ActiveState Result SourcePath = $mstate"
# Once mounted, Type= and What= read back what the kernel mounted (the bind's filesystem);
# the unit systemd made from the fstab line says what it asked mount(8) for.
fragment=$(prop "$MOUNT_UNIT" FragmentPath)
in_ct cat "$fragment" >"$WORK/mount.unit"
grep -qx 'Type=artemis-sync' "$WORK/mount.unit" && grep -qx 'What=/srv/share' "$WORK/mount.unit" ||
    fail "$fragment: $(cat "$WORK/mount.unit")"
ok "systemd mounted the fstab line at boot: $MOUNT_UNIT (from /etc/fstab, $fragment: Type=artemis-sync, What=/srv/share) active"
check "the share shows the source's files" in_ct grep -q "written on the share's source" "$MOUNT_POINT/marker"
in_ct journalctl --no-pager -o cat -u "$MOUNT_UNIT" >"$WORK/mount.journal" 2>&1 || true
grep -q "mounted spec=/srv/share dir=$MOUNT_POINT" "$WORK/mount.journal" || {
    cat "$WORK/mount.journal" >&2
    fail "no line from /sbin/mount.artemis-sync in $MOUNT_UNIT's journal"
}
echo "     journal of $MOUNT_UNIT:"
sed 's/^/     | /' "$WORK/mount.journal"
ok "the mount ran through /sbin/mount.artemis-sync (its lines in the mount unit's journal)"

unit_active() { [[ $(CT_TIMEOUT=5 in_ct systemctl is-active "$UNIT") == active ]]; }
wait_for "$UNIT active" 30 unit_active
t_mount=$(prop "$MOUNT_UNIT" ActiveEnterTimestampMonotonic)
t_agent=$(prop "$UNIT" ExecMainStartTimestampMonotonic)
((t_mount > 0 && t_agent >= t_mount)) || fail "the agent started ($t_agent) before the share was mounted ($t_mount)"
prop "$UNIT" Requires | grep -q "sync-share\.mount" && prop "$UNIT" After | grep -q "sync-share\.mount" || fail "$UNIT has no Requires=/After= on $MOUNT_UNIT"
ok "$UNIT started $(((t_agent - t_mount) / 1000)) ms after the mount was active, and Requires=/After= it (RequiresMountsFor=)"
role_is() { CT_TIMEOUT=5 in_ct artemis-sync status --json | tee "$WORK/status.json" | grep -q "\"role\":\"$1\""; }
# hot_with_node: role hot, and its node has logged its start (its SIGTERM handler is set).
hot_with_node() {
    role_is hot || return 1
    node_pid=$(sed -n 's/.*"node_pid":\([0-9]*\).*/\1/p' "$WORK/status.json")
    [[ -n $node_pid ]] && grep -q "^start $node_pid " "$ROOT/var/log/fake-node.log"
}
wait_for "role hot, with its node started" 30 hot_with_node
echo "     artemis-sync status --json: $(cat "$WORK/status.json")"
ok "the agent reached role hot"
if ((NOTIFY)); then
    status_text=$(prop "$UNIT" StatusText)
    [[ -n $status_text ]] || fail "no STATUS= from the agent"
    ok "Type=notify: active after READY=1; StatusText=$status_text"
fi
alive "$node_pid" || fail "node $node_pid is not running"
main_pid=$(prop "$UNIT" MainPID)
[[ $(in_ct readlink /proc/1/ns/mnt) == "$(in_ct readlink "/proc/$main_pid/ns/mnt")" ]] ||
    fail "the agent runs in a mount namespace of its own: its mounts would be invisible"
in_ct grep -q "^NoNewPrivs:[[:space:]]*1" "/proc/$main_pid/status" && in_ct grep -q "^Seccomp:[[:space:]]*2" "/proc/$main_pid/status" ||
    fail "the hardening (NoNewPrivileges, SystemCallFilter) is not in effect"
ok "node $node_pid runs; the agent ($main_pid) shares PID 1's mount namespace, with NoNewPrivs and a seccomp filter"

say "upgrade with the agent running, then stop it"
sum_before=$(sha256sum <"$ROOT/etc/artemis-sync/agent.toml")
check "dpkg -i $DEB2 (upgrade, agent running)" in_ct dpkg -i "/pkgs/$DEB2"
[[ $(sha256sum <"$ROOT/etc/artemis-sync/agent.toml") == "$sum_before" ]] || fail "the upgrade changed the edited agent.toml"
new_pid=$(prop "$UNIT" MainPID)
[[ $new_pid != 0 && $new_pid != "$main_pid" ]] || fail "the upgrade did not restart the running agent (MainPID $main_pid -> $new_pid)"
[[ $(grep -c "^term $node_pid\$" "$ROOT/var/log/fake-node.log") == 1 ]] || fail "the old node $node_pid was not stopped exactly once on restart: $(paste -sd' ' "$ROOT/var/log/fake-node.log")"
wait_for "role hot after the restart, with its node started" 30 hot_with_node
ok "upgrade: running agent restarted ($main_pid -> $new_pid), its node stopped once, hot again; the config kept"

check "systemctl stop $UNIT" in_ct systemctl stop "$UNIT"
terms=$(grep -c "^term $node_pid\$" "$ROOT/var/log/fake-node.log" || true)
[[ $terms == 1 ]] || fail "node $node_pid got $terms SIGTERMs on stop (expected exactly 1): $(paste -sd' ' "$ROOT/var/log/fake-node.log")"
grep -q "^exit $node_pid\$" "$ROOT/var/log/fake-node.log" || fail "node $node_pid did not exit by itself on SIGTERM"
! alive "$node_pid" 2>/dev/null || fail "node $node_pid still runs after stop"
result="$(prop "$UNIT" Result) $(prop "$UNIT" ExecMainStatus) $(prop "$UNIT" ActiveState)"
[[ $result == "success 0 inactive" ]] || fail "after stop: Result ExecMainStatus ActiveState = $result"
CT_TIMEOUT=5 in_ct artemis-sync status --json >"$WORK/status.json" 2>>"$LOG" || true
grep -q '"role":"down"' "$WORK/status.json" && grep -q '"lease_state":"released"' "$WORK/status.json" ||
    fail "after stop the lease is not released: $(cat "$WORK/status.json")"
ok "systemctl stop: node $node_pid got exactly one SIGTERM and exited, the agent exited 0, the lease is released"
echo "     node log:"
sed 's/^/     | /' "$ROOT/var/log/fake-node.log"
check "dpkg -i $DEB2 again with the agent stopped" in_ct dpkg -i "/pkgs/$DEB2"
[[ $(in_ct systemctl is-active "$UNIT") == inactive ]] || fail "an upgrade started a stopped agent"
ok "upgrade with the agent stopped leaves it stopped"

say "[node] systemd_unit: the node as a unit of its own, started and stopped by the agent"
cat >"$ROOT/etc/systemd/system/fake-node.service" <<'EOF'
# The install test's node as a unit: no [Install] section, only the agent starts it.
[Unit]
Description=install test stand-in node (started and stopped by artemis-sync)
[Service]
ExecStart=/usr/local/bin/fake-node
EOF
cp "$ROOT/etc/artemis-sync/agent.toml" "$WORK/agent.toml.command"
sed -i 's#^command = .*#systemd_unit = "fake-node.service"#' "$ROOT/etc/artemis-sync/agent.toml"
check "config with systemd_unit is valid" in_ct artemis-sync check-config
in_ct systemctl daemon-reload
check "systemctl start $UNIT" in_ct systemctl start "$UNIT"
unit_node_started() {
    role_is hot || return 1
    node_pid=$(prop fake-node.service MainPID)
    [[ $node_pid != 0 ]] && grep -q "^start $node_pid " "$ROOT/var/log/fake-node.log"
}
wait_for "role hot, with fake-node.service started" 30 unit_node_started
ok "hot: the agent started fake-node.service (MainPID $node_pid) with systemctl, from inside its sandbox"
check "systemctl stop $UNIT" in_ct systemctl stop "$UNIT"
[[ $(prop fake-node.service ActiveState) == inactive ]] || fail "stopping the agent left fake-node.service $(prop fake-node.service ActiveState)"
[[ $(grep -c "^term $node_pid\$" "$ROOT/var/log/fake-node.log") == 1 ]] ||
    fail "fake-node.service's node $node_pid was not stopped exactly once: $(paste -sd' ' "$ROOT/var/log/fake-node.log")"
result="$(prop "$UNIT" Result) $(prop "$UNIT" ExecMainStatus)"
[[ $result == "success 0" ]] || fail "after stop: Result ExecMainStatus = $result"
ok "systemctl stop: the agent stopped fake-node.service (one SIGTERM to its node) and exited 0"
cp "$WORK/agent.toml.command" "$ROOT/etc/artemis-sync/agent.toml"

say "remove and purge with the agent running"
check "systemctl start $UNIT" in_ct systemctl start "$UNIT"
wait_for "role hot, with its node started" 30 hot_with_node
check "dpkg -r artemis-sync" in_ct dpkg -r artemis-sync
[[ $(in_ct systemctl is-active "$UNIT") != active ]] || fail "remove did not stop the agent"
[[ $(grep -c "^term $node_pid\$" "$ROOT/var/log/fake-node.log") == 1 ]] || fail "remove did not stop node $node_pid exactly once: $(paste -sd' ' "$ROOT/var/log/fake-node.log")"
[[ ! -L $ROOT/etc/systemd/system/multi-user.target.wants/$UNIT ]] || fail "remove did not disable the unit"
ok "remove: agent stopped (its node stopped once), unit disabled"
check "dpkg -P artemis-sync" in_ct dpkg -P artemis-sync
in_ct mountpoint -q "$MOUNT_POINT" || fail "purge unmounted or removed the mounted share"
[[ -f $ROOT/srv/share/marker && -d $ROOT/srv/share/.artemis-sync ]] || fail "purge touched the share's contents"
ok "purge: the mounted share, its lock directory and files untouched"

poweroff || fail "the container did not power off cleanly"
ok "container powered off"
