#!/usr/bin/env bash
# Builds the RPM packages `coffer` and `coffer-milter` (docs/install-rpm.md): a release
# build of the three binaries, stripped copies staged, then `cargo generate-rpm` for each
# crate from the metadata in archiver/Cargo.toml and milter/Cargo.toml.
#
#   scripts/package-rpm.sh [--release N]
#
# --release N: the RPM release number (default: the metadata's, 1); the package test
# builds a second one to upgrade to. Needs cargo-generate-rpm (.ci/run installs the
# pinned version). Prints the paths of the two .rpm files on stdout, one a line;
# progress goes to stderr. The files land in $CARGO_TARGET_DIR/rpm/generate-rpm/.
set -euo pipefail
cd "$(dirname "$0")/.."

set_release=()
while [ $# -gt 0 ]; do
    case "$1" in
        --release) set_release=(--set-metadata "release = \"$2\""); shift 2 ;;
        *) echo "usage: scripts/package-rpm.sh [--release N]" >&2; exit 2 ;;
    esac
done

if ! cargo generate-rpm --version >/dev/null 2>&1; then
    echo "cargo-generate-rpm is not installed: cargo install cargo-generate-rpm --version 0.21.1 --locked" >&2
    exit 2
fi

target="${CARGO_TARGET_DIR:-target}"
printf '==> cargo build --release --locked -p coffer-archiver -p coffer-milter\n' >&2
cargo build --release --locked -p coffer-archiver -p coffer-milter >&2

# cargo-generate-rpm takes `target/release/X` from `--target-dir DIR` as DIR/release/X:
# stage stripped copies there, so cargo's own artifacts keep their symbols.
stage="$target/rpm"
rm -rf "$stage"
mkdir -p "$stage/release"
for bin in cofferd coffer coffer-milter; do
    strip -o "$stage/release/$bin" "$target/release/$bin"
done

for crate in archiver milter; do
    printf '==> cargo generate-rpm -p %s %s\n' "$crate" "${set_release[*]:-}" >&2
    out=$(cargo generate-rpm -p "$crate" --target-dir "$stage" "${set_release[@]}" 2>&1 >/dev/null) || {
        echo "$out" >&2
        exit 1
    }
done
ls -1 "$stage"/generate-rpm/*.rpm
