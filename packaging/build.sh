#!/usr/bin/env bash
# Builds the Debian and RPM packages of artemis-sync from a clean tree:
#
#   bash packaging/build.sh [--release N] [--out DIR]
#
#   target/debian/artemis-sync_<version>-<N>_<arch>.deb      (cargo-deb)
#   target/generate-rpm/artemis-sync-<version>-<N>.<arch>.rpm (cargo-generate-rpm)
#
# (or both in DIR with --out). N, the package release, defaults to 1. What goes into the
# packages, and where, is in Cargo.toml under [package.metadata.deb] and
# [package.metadata.generate-rpm]; the maintainer scripts are in packaging/debian/ and
# packaging/rpm/. Needs cargo; installs cargo-deb and cargo-generate-rpm (from crates.io,
# pinned below) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

release=1
out=
while (($#)); do
    case "$1" in
    --release) release=${2:?--release needs a number}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $release =~ ^[0-9]+$ ]] || { echo "build.sh: --release must be a number, not $release" >&2; exit 2; }

missing=()
cargo deb --version >/dev/null 2>&1 || missing+=("cargo-deb@$CARGO_DEB_VERSION")
cargo generate-rpm --version >/dev/null 2>&1 || missing+=("cargo-generate-rpm@$CARGO_GENERATE_RPM_VERSION")
if ((${#missing[@]})); then
    echo "== cargo install --locked ${missing[*]}"
    # Tools, not shipped: optimised less, they build in half the time.
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_LTO=false \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 cargo install --locked "${missing[@]}"
fi

echo "== cargo build --release (the agent, the mount helper, the tools, and the man page generator)"
cargo build --release --workspace --bins
cargo build --release --example gen-man

# Man pages and completions, generated from the clap definitions the binaries use.
gen=target/packaging
rm -rf "$gen"
echo "== man pages and completions into $gen"
cargo run --quiet --release --example gen-man -- "$gen" >/dev/null
gzip -9n "$gen"/man/*.8
ls "$gen"/man "$gen"/completions | sed 's/^/   /'

# The packaged binaries, without the line tables the release profile keeps for profiles and
# backtraces on a build machine: a fifth of the size (a 60 MB agent), and a package
# compressed in seconds instead of minutes. Symbols stay, so a backtrace names functions.
command -v objcopy >/dev/null || { echo "build.sh: objcopy (Debian: binutils) is needed" >&2; exit 1; }
echo "== the binaries without debug sections into $gen/bin"
mkdir -p "$gen/bin"
for b in artemis-sync artemis-sync-bench artemis-sync-demo mount-artemis-sync; do
    objcopy --strip-debug "target/release/$b" "$gen/bin/$b"
done

deb_args=(--no-build --deb-revision "$release")
rpm_args=(--set-metadata "release = \"$release\"")
if [[ -n $out ]]; then
    mkdir -p "$out"
    deb_args+=(--output "$out")
    rpm_args+=(--output "$out")
fi
echo "== cargo deb"
deb=$(cargo deb "${deb_args[@]}" | tail -n 1)
echo "== cargo generate-rpm"
cargo generate-rpm "${rpm_args[@]}"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
rpm_dir=${out:-target/generate-rpm}
rpm=$(realpath "$(ls -t "$rpm_dir"/artemis-sync-"$version"-"$release".*.rpm | head -n 1)")
echo "built:"
echo "  $deb"
echo "  $rpm"
