#!/usr/bin/env bash
# Issue 16: the full network fault drills and the soak, as root (network namespaces,
# nftables, tc, FUSE mounts, a throwaway PostgreSQL cluster). CI runs the short versions in
# `cargo test --release`; this runs the long ones:
#
#   tests/drills.sh [SOAK_SECONDS]        # default 1800 (30 minutes)
#   ARTEMIS_SYNC_SOAK_SEED=N tests/drills.sh 600   # replay a soak's random choices
#
# Needs: nftables, iproute2 (ip, tc), util-linux (nsenter, flock), postgresql.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
    echo "drills: run as root (network namespaces, nftables, FUSE mounts)" >&2
    exit 1
fi
soak_seconds=${1:-1800}
if ! [[ $soak_seconds =~ ^[0-9]+$ ]]; then
    echo "drills: SOAK_SECONDS must be a number of seconds, not '$soak_seconds'" >&2
    exit 1
fi
for program in nft tc ip nsenter flock; do
    command -v "$program" >/dev/null || { echo "drills: $program is missing (apt-get install nftables iproute2 util-linux)" >&2; exit 1; }
done

# cargo test builds the package's binaries for its integration tests
# one at a time: each drill measures timings and the machine has few cores
echo "== network drills (full)"
cargo test --release --test integration -- --ignored --nocapture --test-threads=1 \
    issue16_drill_network_faults_full issue16_drill_delay_through_a_proxy_full
echo "== soak, ${soak_seconds} s"
ARTEMIS_SYNC_SOAK_SECONDS=$soak_seconds \
    cargo test --release --test integration -- --ignored --nocapture --test-threads=1 issue16_soak_full
