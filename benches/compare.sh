#!/usr/bin/env bash
# The full comparison: installs the baselines (rsync, lsyncd from Debian), builds, and runs
# every workload of artemis-sync-bench with its default sizes on tmpfs, printing the table and
# writing bench.json and bench.svg here. Needs root for apt-get and for the FUSE workloads
# (without root they are reported as null with the reason); about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v rsync >/dev/null || missing+=(rsync)
command -v lsyncd >/dev/null || missing+=(lsyncd)
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi
cargo build --release --bins
auth=${AUTH:-psk}
./target/release/artemis-sync-bench --auth "$auth" --json --report bench.svg "$@" > bench.json
./target/release/artemis-sync-bench --table-of bench.json
echo "wrote bench.json and bench.svg"
